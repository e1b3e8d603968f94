"""Queue-message triggers: a consumer of a Redis stream (through a consumer group) and
one of an AMQP queue (RabbitMQ, through kombu), each handing what it reads to
``trigger_fire``. ``triggers.listeners`` runs one per enabled trigger, in a thread.

What both keep, whatever happens:

- **Acknowledged once recorded.** A message is acknowledged only after ``trigger_fire``
  has returned, so its run or its refusal is committed. A consumer that dies before that
  leaves it unacknowledged, and the broker gives it again: Redis keeps it in the
  consumer's pending list (read first when the consumer starts again; any consumer takes
  over entries idle for ``CLAIM_IDLE_SECONDS``), RabbitMQ requeues it when the channel
  closes. The firing key makes the second delivery a duplicate, never a second run.
- **Poison is put aside, never retried for ever.** A message that cannot become a run
  (not UTF-8 JSON, over ``max_message_bytes``, its input refused) goes to the trigger's
  dead-letter place with the reason beside the original, then is acknowledged. A
  message whose handling fails ``ATTEMPTS`` times in a row for a reason other than the
  database connection (a bug, or a value the database refuses: ``DataError``,
  ``IntegrityError``) goes there too. An entry over ``max_message_bytes`` is put aside
  as a stub (its size, sha256 and id), never copied: the dead-letter place is not a
  second home for what was too large to take. A dead-letter stream is trimmed
  (approximately) to ``DEAD_LETTER_MAXLEN`` entries.
- **A refusal for the moment holds the line.** Over the trigger's rate limit or the
  task's live runs, the message is not acknowledged: the consumer pauses (``hold``,
  doubling up to ``HOLD_MAX_SECONDS``) and offers the same message again, reading
  nothing new meanwhile. The queue is the buffer; each pause costs one recorded
  refusal, not one per message waiting.
- **A disabled trigger stops its consumer**; what it had read stays unacknowledged, for
  when it is enabled again.

Connection errors (the database's ``OperationalError``/``InterfaceError``, the
broker's) are not the message's fault: they end the consumer with the error, and the
listeners start it again after a backoff (the message is offered again, uncounted).

Firing keys say where they came from, so one producer cannot choose an id that reads
as a key derived for another's message: ``id:<the producer's id>`` (a Redis entry's
``id`` field, an AMQP ``message_id``), ``entry:<stream>:<entry id>`` (a Redis entry
without one), ``body:sha256:<hex>`` (an AMQP message without one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp
import amqp.exceptions
import kombu
import redis
from django.db import InterfaceError, OperationalError, close_old_connections
from django.utils import timezone

from agentops.runtime.secrets import config_resolve
from agentops.strict_json import json_loads_strict
from tasks.models import Trigger
from triggers.config import config_of, trigger_secret_refusal
from triggers.models import Firing
from triggers.services import trigger_fire

logger = logging.getLogger("agentops.triggers.queues")

Refusal = Firing.Refusal

# Entries a Redis read takes at once, and the most an AMQP consumer holds unacknowledged.
BATCH = 10
PREFETCH = 10
# How long a read waits for a message before it looks at its stop event again.
BLOCK_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 5.0
# An AMQP heartbeat, so a broker gone without a word is noticed.
HEARTBEAT_SECONDS = 30
# Another consumer's entry unacknowledged this long is taken over: its consumer is
# taken for dead. A live but slow one handling it too is safe: the key is accepted once.
CLAIM_IDLE_SECONDS = 60.0
CLAIM_EVERY_SECONDS = 30.0
# The pause after a refusal for the moment (rate limit, live runs), doubled up to the most.
HOLD_SECONDS = 5.0
HOLD_MAX_SECONDS = 60.0
# Unexpected failures (not the database's) in a row for one message before it is put aside.
ATTEMPTS = 5
# The most of a reason a dead letter carries.
REASON_CHARS = 1000
# A dead-letter stream is trimmed to about this many entries (MAXLEN ~): poison sent
# without end cannot fill Redis's memory.
DEAD_LETTER_MAXLEN = 10_000

# The fields of a Redis stream entry: the message's JSON, and the producer's own id.
PAYLOAD_FIELD = b"payload"
ID_FIELD = b"id"


class Verdict:
    """What a consumer does with a message once it is handled."""

    ACK = "ack"  # its run or its duplicate is recorded
    DEAD = "dead"  # to the dead-letter place with the reason, then acknowledged
    HOLD = "hold"  # refused for the moment: not acknowledged, offered again after a pause
    STOP = "stop"  # the trigger is disabled: not acknowledged, the consumer stops


@dataclass(frozen=True)
class Handled:
    verdict: str
    reason: str = ""
    firing: Firing | None = None
    # Put aside as a stub (size, sha256), without its body: it was over the limit.
    oversize: bool = False


@dataclass(frozen=True)
class QueueTrigger:
    """What a consumer needs of its trigger, read once when it starts (a changed config
    is a new consumer: see ``triggers.listeners``)."""

    pk: int
    name: str
    config: dict[str, Any]  # with its defaults, secrets not yet resolved
    created_at: datetime

    @classmethod
    def of(cls, trigger: Trigger) -> QueueTrigger:
        return cls(trigger.pk, trigger.name, config_of(trigger), trigger.created_at)

    @property
    def place(self) -> str:
        return self.config.get("stream") or self.config.get("queue") or ""

    def url(self) -> str:
        """The broker's URL with its ``{secret:NAME}`` filled in (raises SecretMissing)."""
        resolved, _used = config_resolve(self.config["url"], refusal=trigger_secret_refusal)
        return resolved

    def __str__(self) -> str:
        return (
            f"queue trigger {self.pk} ({self.name!r}: {self.config['transport']} "
            f"{self.place} at {url_shown(self.config['url'])})"
        )


def url_shown(url: str) -> str:
    """A broker URL fit for a log line: a password written into it is masked."""
    try:
        parts = urlsplit(url)
        if parts.password and not parts.password.startswith("{secret:"):
            host = parts.netloc.rsplit("@", 1)[1]
            netloc = f"{parts.username or ''}:***@{host}"
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(a URL that does not parse)"
    return url


def message_fire(*, trigger_id: int, key: str, body: bytes, max_bytes: int) -> Handled:
    """Turn one message's ``body`` into a firing of the trigger and say what the consumer
    does with the message. Database errors propagate: the message is offered again."""
    if len(body) > max_bytes:
        return Handled(
            Verdict.DEAD,
            f"the message is {len(body)} bytes, over max_message_bytes ({max_bytes})",
            oversize=True,
        )
    try:
        payload = json_loads_strict(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        return Handled(Verdict.DEAD, f"the message is not UTF-8 text (byte {error.start})")
    except json.JSONDecodeError as error:
        return Handled(
            Verdict.DEAD,
            f"the message is not JSON: {error.msg} (line {error.lineno}, column {error.colno})",
        )
    # A thread that lives for days: a connection past its age or broken is replaced
    # here, as Django does between requests.
    close_old_connections()
    fired = trigger_fire(trigger_id=trigger_id, key=key, payload=payload)
    firing = fired.firing
    if fired.accepted:
        said = "a duplicate of the firing that started" if fired.duplicate else "started"
        return Handled(Verdict.ACK, f"{said} run {firing.run_id}", firing)
    if firing.refusal in (Refusal.RATE, Refusal.LIVE, Refusal.OVERLAP):
        return Handled(Verdict.HOLD, firing.reason, firing)
    if firing.refusal == Refusal.DISABLED:
        return Handled(Verdict.STOP, firing.reason, firing)
    return Handled(Verdict.DEAD, firing.reason, firing)


class Attempts:
    """Unexpected failures in a row per message key, so a message that keeps failing
    for a reason of its own (not the database's) is put aside after ``ATTEMPTS``. Kept
    for the life of the process, which outlives a consumer's restarts."""

    def __init__(self) -> None:
        self._failures: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def failed(self, trigger_id: int, key: str) -> int:
        with self._lock:
            if len(self._failures) > 10_000:  # bounded: a fresh count is only slower
                self._failures.clear()
            count = self._failures.get((trigger_id, key), 0) + 1
            self._failures[(trigger_id, key)] = count
            return count

    def forget(self, trigger_id: int, key: str) -> None:
        with self._lock:
            self._failures.pop((trigger_id, key), None)


ATTEMPTS_SEEN = Attempts()


def message_handle(*, trigger: QueueTrigger, key: str, body: bytes) -> Handled:
    """``message_fire``, with an unexpected error counted: raised again (the consumer
    restarts and the message is offered again) until the ``ATTEMPTS``-th in a row, which
    puts the message aside. A lost or broken database connection (``OperationalError``,
    ``InterfaceError``) is never the message's fault: raised, not counted. Any other
    database error (``DataError``, ``IntegrityError``...) may be the message's own, so
    it is counted: a value the database refuses every time must not stop the line."""
    try:
        handled = message_fire(
            trigger_id=trigger.pk,
            key=key,
            body=body,
            max_bytes=trigger.config["max_message_bytes"],
        )
    except (OperationalError, InterfaceError):
        raise
    except Exception as error:
        count = ATTEMPTS_SEEN.failed(trigger.pk, key)
        if count < ATTEMPTS:
            raise
        logger.exception("%s: the message %s failed %d times; put aside", trigger, key, count)
        ATTEMPTS_SEEN.forget(trigger.pk, key)
        return Handled(Verdict.DEAD, f"handling it failed {count} times: {error!r}")
    ATTEMPTS_SEEN.forget(trigger.pk, key)
    return handled


class Hold:
    """The pause after a refusal for the moment: ``HOLD_SECONDS``, doubling up to
    ``HOLD_MAX_SECONDS`` while the refusals go on, back to the first once one passes."""

    def __init__(self, first: float) -> None:
        self.first = first
        self.seconds = first

    def next(self) -> float:
        seconds = self.seconds
        self.seconds = min(self.seconds * 2, max(HOLD_MAX_SECONDS, self.first))
        return seconds

    def reset(self) -> None:
        self.seconds = self.first


def reason_cut(reason: str) -> str:
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"


# Redis streams ------------------------------------------------------------------------


def redis_consumer_name(trigger: QueueTrigger) -> str:
    """The consumer's name in its group: the same after a restart on the same host, so
    the entries it read and had not acknowledged are its own to read first."""
    return f"{socket.gethostname()}:trigger-{trigger.pk}"


def redis_group_ensure(client: redis.Redis, trigger: QueueTrigger) -> None:
    """Create the consumer group if it is missing, starting at the trigger's creation:
    entries added to the stream since then are read, an older history is not."""
    config = trigger.config
    # The group is given the last id before the trigger's millisecond (Redis delivers
    # ids greater than the one given): "<ms>-0" would skip an entry added in the very
    # millisecond the trigger was created, which is that millisecond's first id.
    created_ms = int(trigger.created_at.timestamp() * 1000)
    start = f"{created_ms - 1}-{2**64 - 1}"
    try:
        client.xgroup_create(config["stream"], config["group"], id=start, mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def redis_consume(
    trigger: QueueTrigger,
    *,
    stop: threading.Event,
    consumer: str | None = None,
    hold_seconds: float = HOLD_SECONDS,
    claim_idle_seconds: float = CLAIM_IDLE_SECONDS,
    ready: Callable[[], None] | None = None,
) -> str:
    """Consume the trigger's stream until ``stop`` is set ("stopped") or the trigger is
    found disabled ("disabled"). First the entries this consumer read and did not
    acknowledge (a crash), then any consumer's entries idle past ``claim_idle_seconds``
    (``XAUTOCLAIM``, again every ``CLAIM_EVERY_SECONDS`` at most), then new ones,
    ``BATCH`` at a time. Broker and database errors propagate."""
    config = trigger.config
    stream, group = config["stream"], config["group"]
    consumer = consumer or redis_consumer_name(trigger)
    client = redis.Redis.from_url(
        trigger.url(),
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=BLOCK_SECONDS + CONNECT_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    try:
        redis_group_ensure(client, trigger)
        logger.info("%s: consuming as %s in group %s", trigger, consumer, group)
        if ready:
            ready()
        backlog: deque[tuple[bytes, dict[bytes, bytes]]] = deque()
        pending_after: bytes | str | None = "0"  # reading this consumer's pending list
        claim_from: bytes | str = "0-0"
        claim_at = 0.0
        hold = Hold(hold_seconds)
        claim_every = min(CLAIM_EVERY_SECONDS, claim_idle_seconds)
        while not stop.is_set():
            if not backlog:
                if pending_after is not None:
                    reply = client.xreadgroup(group, consumer, {stream: pending_after}, count=BATCH)
                    entries = reply[0][1] if reply else []
                    pending_after = entries[-1][0] if entries else None
                elif time.monotonic() >= claim_at:
                    claim_from, entries, _gone = client.xautoclaim(
                        stream,
                        group,
                        consumer,
                        min_idle_time=int(claim_idle_seconds * 1000),
                        start_id=claim_from,
                        count=BATCH,
                    )
                    if claim_from in (b"0-0", "0-0"):
                        claim_at = time.monotonic() + claim_every
                    if entries:
                        logger.info("%s: took over %d idle entries", trigger, len(entries))
                else:
                    block = int(BLOCK_SECONDS * 1000)
                    reply = client.xreadgroup(
                        group, consumer, {stream: ">"}, count=BATCH, block=block
                    )
                    entries = reply[0][1] if reply else []
                backlog.extend(entries)
                continue
            entry_id, fields = backlog[0]
            verdict = redis_entry_handle(client, trigger, entry_id, fields)
            if verdict == Verdict.STOP:
                return "disabled"
            if verdict == Verdict.HOLD:
                # Still ours: claimed again (its idle time reset), so no other consumer
                # takes it over while this one waits for room.
                client.xclaim(stream, group, consumer, 0, [entry_id], justid=True)
                stop.wait(hold.next())
                continue
            hold.reset()
            backlog.popleft()
        return "stopped"
    finally:
        client.close()


def redis_entry_key(stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
    """The firing key: ``id:`` and the producer's ``id`` field when it gives one (a
    producer that retries its XADD makes a second entry, with a new entry id, and the
    same ``id``), else ``entry:``, the stream and the entry's id, which redelivery
    keeps. The prefixes keep a producer's id from ever equalling a derived key."""
    supplied = fields.get(ID_FIELD)
    if supplied:
        return "id:" + supplied.decode("utf-8")  # UnicodeDecodeError: put aside
    return f"entry:{stream}:{entry_id.decode()}"


def redis_entry_handle(
    client: redis.Redis, trigger: QueueTrigger, entry_id: bytes, fields: dict[bytes, bytes]
) -> str:
    """Handle one entry: acknowledge it, put it aside, or leave it (hold, stop)."""
    config = trigger.config
    stream, group = config["stream"], config["group"]
    if not fields:
        # Deleted from the stream (XDEL, a trim) after it was read: nothing to fire.
        client.xack(stream, group, entry_id)
        return Verdict.ACK
    size = entry_size(fields)
    try:
        key = redis_entry_key(stream, entry_id, fields)
    except UnicodeDecodeError:
        handled = Handled(Verdict.DEAD, "the entry's id field is not UTF-8 text")
    else:
        if size > config["max_message_bytes"]:
            handled = Handled(
                Verdict.DEAD,
                f"the entry is {size} bytes, over max_message_bytes "
                f"({config['max_message_bytes']})",
                oversize=True,
            )
        elif PAYLOAD_FIELD not in fields:
            names = ", ".join(sorted(name.decode(errors="replace") for name in fields))
            handled = Handled(
                Verdict.DEAD,
                f"the entry has no field named payload (the message's JSON goes there); "
                f"it has: {names}",
            )
        else:
            handled = message_handle(trigger=trigger, key=key, body=fields[PAYLOAD_FIELD])
    if handled.verdict == Verdict.ACK:
        client.xack(stream, group, entry_id)
    elif handled.verdict == Verdict.DEAD:
        redis_dead_letter(client, trigger, entry_id, fields, handled)
    elif handled.verdict == Verdict.HOLD:
        logger.info(
            "%s: entry %s held, not acknowledged: %s", trigger, entry_id.decode(), handled.reason
        )
    else:
        logger.info("%s: stopping: %s", trigger, handled.reason)
    return handled.verdict


def entry_size(fields: dict[bytes, bytes]) -> int:
    return sum(len(name) + len(value) for name, value in fields.items())


def entry_digest(fields: dict[bytes, bytes]) -> str:
    """The sha256 of an entry's fields, each name and value preceded by its length, so
    the digest names one set of fields only."""
    digest = hashlib.sha256()
    for name, value in fields.items():
        for part in (name, value):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def redis_dead_letter(
    client: redis.Redis,
    trigger: QueueTrigger,
    entry_id: bytes,
    fields: dict[bytes, bytes],
    handled: Handled,
) -> None:
    """Add the entry, its fields as they were and ``dead_*`` fields saying why, to the
    dead-letter stream (trimmed to about ``DEAD_LETTER_MAXLEN``), and acknowledge it,
    in one MULTI/EXEC: both or neither. An oversize entry is a stub: its size and
    digest (``dead_bytes``, ``dead_sha256``) instead of its fields."""
    config = trigger.config
    reason = reason_cut(handled.reason)
    if handled.oversize:
        kept = {
            b"dead_bytes": str(entry_size(fields)).encode(),
            b"dead_sha256": entry_digest(fields).encode(),
        }
    else:
        kept = fields
    dead = {
        **kept,
        b"dead_reason": reason.encode(),
        b"dead_trigger": str(trigger.pk).encode(),
        b"dead_stream": config["stream"].encode(),
        b"dead_id": entry_id,
        b"dead_at": timezone.now().isoformat().encode(),
    }
    if handled.firing is not None:
        dead[b"dead_firing"] = str(handled.firing.pk).encode()
    with client.pipeline(transaction=True) as pipe:
        pipe.xadd(config["dead_letter"], dead, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        pipe.xack(config["stream"], config["group"], entry_id)
        pipe.execute()
    logger.warning(
        "%s: entry %s put aside in %s: %s",
        trigger,
        entry_id.decode(),
        config["dead_letter"],
        reason,
    )


# AMQP (RabbitMQ, through kombu) ---------------------------------------------------------

HEADER_PREFIX = "x-agentops-"


def amqp_connection(url: str) -> kombu.Connection:
    # Publisher confirms: a dead letter is known to be stored before the original is
    # acknowledged.
    return kombu.Connection(
        url,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        heartbeat=HEARTBEAT_SECONDS,
        transport_options={"confirm_publish": True},
    )


def amqp_queue_ensure(connection: kombu.Connection, name: str) -> None:
    """Use the queue as it is if it exists (whatever arguments its owner declared it
    with: declaring it again with others would be refused); else declare it durable."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
    except amqp.exceptions.NotFound:
        # The refusal closed that channel.
        channel = connection.channel()
        channel.queue_declare(queue=name, durable=True, exclusive=False, auto_delete=False)
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def amqp_body(message: amqp.Message) -> bytes:
    """The message's body as it was sent. py-amqp hands over a body it could decode
    by its content_encoding as text: encoded again, it is the same bytes."""
    body = message.body
    if isinstance(body, str):
        return body.encode(message.properties.get("content_encoding") or "utf-8")
    return bytes(body)


def amqp_message_key(message: amqp.Message, body: bytes) -> str:
    """The firing key: ``id:`` and the message's ``message_id`` property when it has
    one, else ``body:sha256:`` and the sha256 of its body. AMQP gives a message no id
    of its own (a delivery tag counts deliveries on one channel), and a redelivery
    carries the same body. The prefixes keep a producer's id from equalling a digest."""
    supplied = message.properties.get("message_id")
    if supplied:
        return f"id:{supplied}"
    return "body:sha256:" + hashlib.sha256(body).hexdigest()


def amqp_consume(
    trigger: QueueTrigger,
    *,
    stop: threading.Event,
    hold_seconds: float = HOLD_SECONDS,
    prefetch: int = PREFETCH,
    ready: Callable[[], None] | None = None,
) -> str:
    """Consume the trigger's AMQP queue until ``stop`` is set ("stopped") or the trigger
    is found disabled ("disabled"), at most ``prefetch`` messages unacknowledged at
    once. Leaving closes the connection, so what was not acknowledged goes back to the
    queue. Broker and database errors propagate.

    Messages are taken from the channel as the broker sent them (``basic_consume``),
    not through kombu's ``Consumer``: kombu decompresses a body whose headers name a
    compression, and decodes it by the content type the sender chose, before any
    callback sees it, so a small message could become a large one before
    ``max_message_bytes`` is checked."""
    config = trigger.config
    with amqp_connection(trigger.url()) as connection:
        connection.connect()
        amqp_queue_ensure(connection, config["queue"])
        amqp_queue_ensure(connection, config["dead_letter"])
        arrived: deque[amqp.Message] = deque()
        channel = connection.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, a_global=False)
        channel.basic_consume(queue=config["queue"], callback=arrived.append, no_ack=False)
        producer = kombu.Producer(connection.channel())
        hold = Hold(hold_seconds)
        logger.info("%s: consuming", trigger)
        if ready:
            ready()
        while not stop.is_set():
            if not arrived:
                amqp_events_drain(connection, BLOCK_SECONDS)
                continue
            verdict = amqp_message_handle(producer, trigger, arrived[0])
            if verdict == Verdict.STOP:
                return "disabled"
            if verdict == Verdict.HOLD:
                deadline = time.monotonic() + hold.next()
                while not stop.is_set() and time.monotonic() < deadline:
                    amqp_events_drain(connection, min(BLOCK_SECONDS, deadline - time.monotonic()))
                continue
            hold.reset()
            arrived.popleft()
        return "stopped"


def amqp_events_drain(connection: kombu.Connection, timeout: float) -> None:
    """Wait up to ``timeout`` for the broker (messages arriving), keeping the heartbeat."""
    with contextlib.suppress(TimeoutError):
        connection.drain_events(timeout=max(timeout, 0.01))
    connection.heartbeat_check()


def amqp_message_handle(producer: kombu.Producer, trigger: QueueTrigger, message) -> str:
    body = amqp_body(message)
    key = amqp_message_key(message, body)
    handled = message_handle(trigger=trigger, key=key, body=body)
    if handled.verdict == Verdict.ACK:
        message.channel.basic_ack(message.delivery_tag)
    elif handled.verdict == Verdict.DEAD:
        amqp_dead_letter(producer, trigger, message, body, key, handled)
        message.channel.basic_ack(message.delivery_tag)
    elif handled.verdict == Verdict.HOLD:
        logger.info("%s: message %s held, not acknowledged: %s", trigger, key, handled.reason)
    else:
        logger.info("%s: stopping: %s", trigger, handled.reason)
    return handled.verdict


def amqp_dead_letter(
    producer: kombu.Producer,
    trigger: QueueTrigger,
    message: amqp.Message,
    body: bytes,
    key: str,
    handled: Handled,
) -> None:
    """Publish the message as it came (body, content type and encoding, headers,
    message id) to the dead-letter queue, with ``x-agentops-*`` headers saying why;
    the broker confirms it before the caller acknowledges the original. An oversize
    message is a stub: an empty body, its size and sha256 in ``x-agentops-bytes`` and
    ``x-agentops-sha256``."""
    config = trigger.config
    reason = reason_cut(handled.reason)
    properties = message.properties
    stub = {}
    if handled.oversize:
        stub = {
            f"{HEADER_PREFIX}bytes": len(body),
            f"{HEADER_PREFIX}sha256": hashlib.sha256(body).hexdigest(),
        }
        body = b""
    headers = {
        **(properties.get("application_headers") or {}),
        f"{HEADER_PREFIX}reason": reason,
        f"{HEADER_PREFIX}trigger": trigger.pk,
        f"{HEADER_PREFIX}queue": config["queue"],
        f"{HEADER_PREFIX}key": key,
        f"{HEADER_PREFIX}dead-at": timezone.now().isoformat(),
        **stub,
    }
    if handled.firing is not None:
        headers[f"{HEADER_PREFIX}firing"] = handled.firing.pk
    kept = {"message_id": properties["message_id"]} if properties.get("message_id") else {}
    producer.publish(
        body,
        exchange="",
        routing_key=config["dead_letter"],
        headers=headers,
        # Given, so kombu sends the bytes as they are instead of serializing them.
        content_type=properties.get("content_type") or "application/octet-stream",
        content_encoding=properties.get("content_encoding") or "binary",
        delivery_mode=2,
        **kept,
    )
    logger.warning(
        "%s: message %s put aside in %s: %s", trigger, key, config["dead_letter"], reason
    )


def queue_consume(trigger: QueueTrigger, *, stop: threading.Event, **options: Any) -> str:
    """Consume the trigger's stream or queue: ``redis_consume`` or ``amqp_consume``."""
    transport = trigger.config["transport"]
    if transport == "redis":
        return redis_consume(trigger, stop=stop, **options)
    return amqp_consume(trigger, stop=stop, **options)
