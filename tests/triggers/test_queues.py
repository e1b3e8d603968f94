"""Queue-message triggers against real brokers: Redis streams on 127.0.0.1:6379 (a
database of their own) and RabbitMQ on 127.0.0.1:5672. A message starts at most one
run, is acknowledged once its firing is recorded, is handled after a consumer stopped
mid-way, and poison lands in the dead-letter place with the reason, never redelivered."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import traceback
import uuid
import zlib
from collections.abc import Callable, Iterator

import amqp.exceptions
import kombu
import pytest
import redis
from django.db import DataError, OperationalError, connection

from tasks.models import Run, Trigger
from tests.conftest import require
from tests.peers.workers import wait_for
from triggers import queues as queues_module
from triggers.models import Firing
from triggers.queues import (
    ATTEMPTS,
    QueueTrigger,
    amqp_consume,
    entry_digest,
    redis_consume,
    redis_consumer_name,
    redis_group_ensure,
)
from triggers.services import trigger_fire

pytestmark = pytest.mark.django_db(transaction=True)

# A Redis database nothing else uses (11 is bench_concurrency's; 12, 13 and 14 the
# bench's, chaos's and Celery's tests'); every stream is named afresh and deleted after.
REDIS_URL = os.environ.get("TEST_TRIGGERS_REDIS_URL", "redis://127.0.0.1:6379/10")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

SCHEMA = {
    "type": "object",
    "required": ["lead"],
    "properties": {"lead": {"type": "string"}, "score": {"type": "number"}},
}


def redis_problem() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        return f"Redis at {REDIS_URL} is not reachable ({error})"
    return ""


def amqp_problem() -> str:
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as probe:
            probe.connect()
    except Exception as error:
        return f"RabbitMQ at {AMQP_URL} is not reachable ({error})"
    return ""


@pytest.fixture
def streams() -> Iterator[tuple[redis.Redis, Callable[[], str]]]:
    """A client of the tests' Redis database and a maker of fresh stream names; every
    stream made (and its dead-letter stream) is deleted after the test."""
    problem = redis_problem()
    require(not problem, problem)
    client = redis.Redis.from_url(REDIS_URL)
    made: list[str] = []

    def fresh() -> str:
        made.append(f"test-leads-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield client, fresh
    for name in made:
        client.delete(name, f"{name}.dead")
    client.close()


@pytest.fixture
def queues() -> Iterator[Callable[[], str]]:
    """A maker of fresh AMQP queue names; each (and its dead-letter queue) deleted after."""
    problem = amqp_problem()
    require(not problem, problem)
    made: list[str] = []

    def fresh() -> str:
        made.append(f"test-leads-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield fresh
    with kombu.Connection(AMQP_URL) as conn:
        for name in made:
            for queue in (name, f"{name}.dead"):
                channel = conn.channel()
                with contextlib.suppress(amqp.exceptions.NotFound):
                    channel.queue_delete(queue)
                with contextlib.suppress(Exception):
                    channel.close()


@contextlib.contextmanager
def consuming(consume: Callable[..., str], trigger: Trigger, **options) -> Iterator[dict]:
    """Run ``consume`` for the trigger in a thread until the block ends; what it
    returned (or raised) is in the yielded dict afterwards."""
    stop = threading.Event()
    ready = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = consume(
                QueueTrigger.of(trigger), stop=stop, ready=ready.set, **options
            )
        except BaseException as error:
            outcome["error"] = error
            traceback.print_exc()  # seen even when the test fails first
        finally:
            connection.close()
            ready.set()

    thread = threading.Thread(target=run, name="test-consumer")
    thread.start()
    ready.wait(20)
    try:
        yield outcome
    finally:
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "the consumer did not stop"
    if "error" in outcome:
        raise outcome["error"]


def redis_trigger(make_trigger, stream: str, **fields) -> Trigger:
    return make_trigger(
        Trigger.Kind.QUEUE,
        config={"transport": "redis", "url": REDIS_URL, "stream": stream},
        input_schema=fields.pop("input_schema", SCHEMA),
        **fields,
    )


def amqp_trigger(make_trigger, queue: str, **fields) -> Trigger:
    return make_trigger(
        Trigger.Kind.QUEUE,
        config={"transport": "amqp", "url": AMQP_URL, "queue": queue},
        input_schema=fields.pop("input_schema", SCHEMA),
        **fields,
    )


def pending(client: redis.Redis, stream: str) -> int:
    return client.xpending(stream, "agentops")["pending"]


def delivered(client: redis.Redis, stream: str) -> bytes:
    """The id of the last entry the group was given."""
    [group] = client.xinfo_groups(stream)
    return group["last-delivered-id"]


def dead_letters(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(f"{stream}.dead")]


# Redis streams ---------------------------------------------------------------------------


def test_a_stream_message_starts_a_run_mapped_from_it_and_is_acknowledged(streams, make_trigger):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream, input_mapping="data")
    entry = client.xadd(stream, {"payload": json.dumps({"data": {"lead": "ACME", "score": 7}})})

    with consuming(redis_consume, trigger):
        wait_for(lambda: Run.objects.exists(), what="the run")
        wait_for(lambda: pending(client, stream) == 0, what="the acknowledgement")

    run = Run.objects.get()
    assert run.input == {"lead": "ACME", "score": 7} and run.trigger == trigger
    assert run.firing_key == f"{trigger.pk}:entry:{stream}:{entry.decode()}"
    assert dead_letters(client, stream) == []


def test_a_message_delivered_twice_starts_one_run(streams, make_trigger):
    """A producer that sends again (its XADD timed out) gives the same id field; the
    second entry is a duplicate, acknowledged, and writes nothing."""
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    for _ in range(2):
        last = client.xadd(stream, {"payload": json.dumps({"lead": "ACME"}), "id": "lead-42"})

    with consuming(redis_consume, trigger):
        wait_for(lambda: delivered(client, stream) == last, what="both to be read")
        wait_for(lambda: pending(client, stream) == 0, what="both to be acknowledged")

    assert Run.objects.count() == 1 and Firing.objects.count() == 1
    assert Firing.objects.get().key == "id:lead-42"


def test_an_entry_read_and_not_acknowledged_before_a_crash_is_handled_once_after_restart(
    streams, make_trigger
):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    name = redis_consumer_name(QueueTrigger.of(trigger))
    first = client.xadd(stream, {"payload": json.dumps({"lead": "read, then a crash"})})
    second = client.xadd(stream, {"payload": json.dumps({"lead": "fired, then a crash"})})
    # What a consumer that died leaves behind: both entries read under its name, the
    # second one's run even recorded, neither acknowledged.
    redis_group_ensure(client, QueueTrigger.of(trigger))
    assert len(client.xreadgroup("agentops", name, {stream: ">"}, count=10)[0][1]) == 2
    fired = trigger_fire(
        trigger_id=trigger.pk,
        key=f"entry:{stream}:{second.decode()}",
        payload={"lead": "fired, then a crash"},
    )
    assert fired.accepted and pending(client, stream) == 2

    with consuming(redis_consume, trigger):  # the same consumer, started again
        wait_for(lambda: pending(client, stream) == 0, what="both to be acknowledged")

    assert Run.objects.count() == 2
    keys = set(Firing.objects.values_list("key", flat=True))
    assert keys == {f"entry:{stream}:{first.decode()}", f"entry:{stream}:{second.decode()}"}
    # Started again, it finds nothing left to do.
    with consuming(redis_consume, trigger):
        pass
    assert Run.objects.count() == 2 and Firing.objects.count() == 2


def test_a_dead_consumers_idle_entries_are_taken_over_by_another(streams, make_trigger):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    redis_group_ensure(client, QueueTrigger.of(trigger))
    client.xadd(stream, {"payload": json.dumps({"lead": "left on another host"})})
    client.xreadgroup("agentops", "a-host-that-died:trigger", {stream: ">"}, count=10)

    with consuming(redis_consume, trigger, claim_idle_seconds=0.2):
        wait_for(lambda: pending(client, stream) == 0, what="the entry to be taken over")

    assert Run.objects.get().input == {"lead": "left on another host"}


def test_a_consumer_stopped_while_holding_a_refused_entry_handles_it_once_on_restart(
    streams, make_trigger
):
    """Over the rate limit the entry is held, not acknowledged, not put aside; the
    consumer stopped mid-way and started again takes it up once there is room."""
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream, max_per_minute=1)
    for lead in ("first", "second"):
        client.xadd(stream, {"payload": json.dumps({"lead": lead})})

    with consuming(redis_consume, trigger, hold_seconds=0.2):
        wait_for(
            lambda: Firing.objects.filter(refusal=Firing.Refusal.RATE).count() >= 2,
            what="the second entry to be refused, held and offered again",
        )
        assert pending(client, stream) == 1
    assert Run.objects.count() == 1 and dead_letters(client, stream) == []

    Trigger.objects.filter(pk=trigger.pk).update(max_per_minute=None)
    trigger.refresh_from_db()
    with consuming(redis_consume, trigger, hold_seconds=0.2):
        wait_for(lambda: pending(client, stream) == 0, what="the held entry")
    assert sorted(Run.objects.values_list("input__lead", flat=True)) == ["first", "second"]
    assert dead_letters(client, stream) == []


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"payload": b"{not json"}, "the message is not JSON: Expecting property name"),
        ({"payload": b'{"lead": NaN}'}, "NaN is not a JSON number"),
        ({"payload": b"\xff\xfe"}, "the message is not UTF-8 text (byte 0)"),
        ({"payload": json.dumps({"lead": "x" * 2000})}, "over max_message_bytes (1024)"),
        ({"body": b"{}"}, "the entry has no field named payload"),
        ({"payload": json.dumps({"lead": 7})}, "lead: 7 is not of type 'string'"),
    ],
)
def test_poison_lands_in_the_dead_letter_stream_with_the_reason_and_is_not_redelivered(
    streams, make_trigger, fields, said
):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    trigger.config["max_message_bytes"] = 1024
    trigger.save()
    entry = client.xadd(stream, fields)

    with consuming(redis_consume, trigger):
        wait_for(lambda: client.exists(f"{stream}.dead"), what="the dead letter")
        wait_for(lambda: pending(client, stream) == 0, what="the acknowledgement")

    [dead] = dead_letters(client, stream)
    assert said in dead[b"dead_reason"].decode()
    assert dead[b"dead_id"] == entry and dead[b"dead_stream"] == stream.encode()
    assert dead[b"dead_trigger"] == str(trigger.pk).encode()
    if "over max_message_bytes" in said:
        # A stub: its size and digest, never a copy of what was too large to take.
        assert b"payload" not in dead and int(dead[b"dead_bytes"]) > 1024
        assert (
            dead[b"dead_sha256"]
            == entry_digest(
                {name.encode(): value.encode() for name, value in fields.items()}
            ).encode()
        )
    else:
        for name, value in fields.items():
            assert dead[name.encode()] == (value if isinstance(value, bytes) else value.encode())
    assert Run.objects.count() == 0
    refused = list(Firing.objects.all())
    if said.startswith("lead:"):  # input refused: trigger_fire recorded its refusal
        assert [f.refusal for f in refused] == [Firing.Refusal.INPUT]
        assert dead[b"dead_firing"] == str(refused[0].pk).encode()
    else:  # it never became a firing
        assert refused == []
    # Never offered again: nothing pending, nothing new on a restart.
    with consuming(redis_consume, trigger):
        pass
    assert len(dead_letters(client, stream)) == 1 and Run.objects.count() == 0


def fire_refusing(monkeypatch, error: Exception, lead: str) -> None:
    """``trigger_fire`` as the consumer calls it, raising ``error`` for the message whose
    lead is ``lead``: the database's fault injected (services.py makes what a message
    carries storable, so no payload makes the database refuse it any more)."""
    real = queues_module.trigger_fire

    def fire(*, trigger_id, key, payload):
        if payload.get("lead") == lead:
            raise error
        return real(trigger_id=trigger_id, key=key, payload=payload)

    monkeypatch.setattr(queues_module, "trigger_fire", fire)


def consumer_rounds(
    trigger: Trigger, client: redis.Redis, stream: str, last: bytes, rounds: int
) -> int:
    """Start the consumer up to ``rounds`` times, each until it fails or has read up to
    ``last`` and has nothing pending; how many rounds ended in an error (the listeners
    would start it again)."""
    failed = 0
    for _ in range(rounds):
        try:
            with consuming(redis_consume, trigger) as outcome:
                wait_for(
                    lambda: (
                        "error" in outcome
                        or (delivered(client, stream) == last and pending(client, stream) == 0)
                    ),
                    what="the consumer to fail or finish",
                )
        except (DataError, OperationalError):
            failed += 1
            continue
        break
    return failed


def test_a_message_the_database_refuses_is_put_aside_after_its_attempts_and_the_next_handled(
    streams, make_trigger, monkeypatch
):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    fire_refusing(monkeypatch, DataError("value too long for type character varying"), "bad")
    bad = client.xadd(stream, {"payload": json.dumps({"lead": "bad"})})
    last = client.xadd(stream, {"payload": json.dumps({"lead": "good"})})

    failed = consumer_rounds(trigger, client, stream, last, ATTEMPTS + 2)

    assert failed == ATTEMPTS - 1  # the ATTEMPTS-th failure puts it aside
    [dead] = dead_letters(client, stream)
    assert dead[b"dead_id"] == bad and b"DataError" in dead[b"dead_reason"]
    assert f"handling it failed {ATTEMPTS} times" in dead[b"dead_reason"].decode()
    assert list(Run.objects.values_list("input__lead", flat=True)) == ["good"]
    assert pending(client, stream) == 0


def test_a_lost_database_connection_is_never_counted_against_the_message(
    streams, make_trigger, monkeypatch
):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    fire_refusing(monkeypatch, OperationalError("server closed the connection"), "unlucky")
    last = client.xadd(stream, {"payload": json.dumps({"lead": "unlucky"})})

    failed = consumer_rounds(trigger, client, stream, last, ATTEMPTS + 1)

    assert failed == ATTEMPTS + 1 and pending(client, stream) == 1
    assert dead_letters(client, stream) == []


def test_the_dead_letter_stream_is_trimmed(streams, make_trigger, monkeypatch):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    monkeypatch.setattr(queues_module, "DEAD_LETTER_MAXLEN", 100)
    with client.pipeline(transaction=False) as pipe:
        for number in range(500):
            pipe.xadd(f"{stream}.dead", {"old": str(number)})
        pipe.execute()
    last = client.xadd(stream, {"payload": b"{not json"})

    with consuming(redis_consume, trigger):
        wait_for(lambda: delivered(client, stream) == last, what="the entry to be read")
        wait_for(lambda: pending(client, stream) == 0, what="the dead letter")

    # Approximately: Redis trims whole nodes of the stream (100 entries by default).
    assert client.xlen(f"{stream}.dead") <= 300
    [(_id, newest)] = client.xrevrange(f"{stream}.dead", count=1)
    assert b"not JSON" in newest[b"dead_reason"]


def test_a_producer_id_that_looks_like_a_derived_key_does_not_suppress_another_message(
    streams, make_trigger
):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    plain = client.xadd(stream, {"payload": json.dumps({"lead": "without an id"})})
    lookalike = f"entry:{stream}:{plain.decode()}"
    last = client.xadd(stream, {"payload": json.dumps({"lead": "with one"}), "id": lookalike})

    with consuming(redis_consume, trigger):
        wait_for(lambda: delivered(client, stream) == last, what="both to be read")
        wait_for(lambda: pending(client, stream) == 0, what="both to be acknowledged")

    assert Run.objects.count() == 2
    keys = set(Firing.objects.values_list("key", flat=True))
    assert keys == {f"entry:{stream}:{plain.decode()}", f"id:{lookalike}"}


def test_a_disabled_trigger_stops_its_consumer_and_leaves_the_entry(streams, make_trigger):
    client, fresh = streams
    stream = fresh()
    trigger = redis_trigger(make_trigger, stream)
    Trigger.objects.filter(pk=trigger.pk).update(enabled=False)
    client.xadd(stream, {"payload": json.dumps({"lead": "later"})})

    with consuming(redis_consume, trigger) as outcome:
        wait_for(lambda: "result" in outcome, what="the consumer to stop by itself")

    assert outcome["result"] == "disabled" and pending(client, stream) == 1
    assert Run.objects.count() == 0 and dead_letters(client, stream) == []


# AMQP (RabbitMQ) -------------------------------------------------------------------------


def publish(queue: str, body: bytes | str, **properties) -> None:
    with kombu.Connection(AMQP_URL) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            declare=[kombu.Queue(queue, durable=True)],
            content_type=properties.pop("content_type", "application/json"),
            content_encoding=properties.pop("content_encoding", "utf-8"),
            **properties,
        )


def messages_ready(queue: str) -> int:
    with kombu.Connection(AMQP_URL) as conn:
        channel = conn.channel()
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        finally:
            channel.close()


def drained(queue: str) -> list[amqp.Message]:
    """Every message in ``queue``, taken off it as the broker holds it."""
    taken = []
    with kombu.Connection(AMQP_URL) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            taken.append(message)
        channel.close()
    return taken


def test_a_rabbitmq_message_starts_a_run_and_is_acknowledged(queues, make_trigger):
    queue = queues()
    trigger = amqp_trigger(make_trigger, queue, input_mapping="{lead: lead.name}")
    publish(queue, json.dumps({"lead": {"name": "ACME"}}), message_id="m-1")

    with consuming(amqp_consume, trigger):
        wait_for(lambda: Run.objects.exists(), what="the run")
    # The consumer's channel is closed: a message not acknowledged would be back.
    assert messages_ready(queue) == 0
    run = Run.objects.get()
    assert run.input == {"lead": "ACME"} and run.firing_key == f"{trigger.pk}:id:m-1"


def test_a_rabbitmq_message_delivered_twice_starts_one_run(queues, make_trigger):
    """By its message_id; without one, by its body's sha256."""
    queue = queues()
    trigger = amqp_trigger(make_trigger, queue)
    for _ in range(2):
        publish(queue, json.dumps({"lead": "with an id"}), message_id="m-7")
        publish(queue, json.dumps({"lead": "without one"}))
    # Handled in order: once the last one's firing is there, the four before it are
    # handled and acknowledged.
    publish(queue, json.dumps({"lead": "the last"}), message_id="z-last")

    with consuming(amqp_consume, trigger):
        wait_for(lambda: Firing.objects.filter(key="id:z-last").exists(), what="the last")
    assert messages_ready(queue) == 0 and Run.objects.count() == 3
    keys = sorted(Firing.objects.values_list("key", flat=True))
    assert keys[0].startswith("body:sha256:") and keys[1] == "id:m-7" and keys[2] == "id:z-last"


def test_an_unacknowledged_rabbitmq_message_is_delivered_again_and_starts_one_run(
    queues, make_trigger
):
    """Held over the rate limit, then the consumer stopped: the message goes back to
    the queue, and the next consumer starts its run once there is room."""
    queue = queues()
    trigger = amqp_trigger(make_trigger, queue, max_per_minute=1)
    publish(queue, json.dumps({"lead": "first"}), message_id="a")
    publish(queue, json.dumps({"lead": "second"}), message_id="b")

    with consuming(amqp_consume, trigger, hold_seconds=0.2):
        wait_for(
            lambda: Firing.objects.filter(refusal=Firing.Refusal.RATE).exists(),
            what="the second message to be refused for the rate",
        )
    assert messages_ready(queue) == 1 and Run.objects.count() == 1

    Trigger.objects.filter(pk=trigger.pk).update(max_per_minute=None)
    with consuming(amqp_consume, trigger, hold_seconds=0.2):
        wait_for(lambda: Run.objects.count() == 2, what="the second run")
    assert messages_ready(queue) == 0 and drained(f"{queue}.dead") == []


@pytest.mark.parametrize(
    ("body", "said", "compression"),
    [
        (b"{not json", "the message is not JSON", None),
        (json.dumps({"lead": 7}).encode(), "lead: 7 is not of type 'string'", None),
        # Never inflated: a small compressed body could be a very large one.
        (zlib.compress(json.dumps({"lead": "x" * 10_000}).encode()), "not UTF-8", "zlib"),
    ],
)
def test_rabbitmq_poison_lands_in_the_dead_letter_queue_with_the_reason_in_its_headers(
    queues, make_trigger, body, said, compression
):
    queue = queues()
    trigger = amqp_trigger(make_trigger, queue)
    headers = {"origin": "crm", **({"compression": compression} if compression else {})}
    publish(queue, body, message_id="poison-1", headers=headers)

    with consuming(amqp_consume, trigger):
        wait_for(lambda: messages_ready(f"{queue}.dead") == 1, what="the dead letter")
    assert messages_ready(queue) == 0  # acknowledged: not delivered again

    [dead] = drained(f"{queue}.dead")
    kept = dead.body if isinstance(dead.body, bytes) else dead.body.encode()
    assert kept == body and dead.properties["message_id"] == "poison-1"
    assert dead.properties["content_type"] == "application/json"
    headers = dead.properties["application_headers"]
    assert said in headers["x-agentops-reason"]
    assert headers["x-agentops-queue"] == queue and headers["x-agentops-key"] == "id:poison-1"
    assert headers["x-agentops-trigger"] == trigger.pk
    assert headers["origin"] == "crm"  # the sender's own headers are kept
    assert Run.objects.count() == 0
    # Started again, the consumer finds nothing.
    with consuming(amqp_consume, trigger):
        pass
    assert Run.objects.count() == 0 and messages_ready(queue) == 0


def test_an_oversize_rabbitmq_message_is_put_aside_as_a_stub(queues, make_trigger):
    queue = queues()
    trigger = amqp_trigger(make_trigger, queue)
    trigger.config["max_message_bytes"] = 1024
    trigger.save()
    body = json.dumps({"lead": "x" * 5000}).encode()
    publish(queue, body, message_id="big-1")

    with consuming(amqp_consume, trigger):
        wait_for(lambda: messages_ready(f"{queue}.dead") == 1, what="the dead letter")

    [dead] = drained(f"{queue}.dead")
    assert dead.body in (b"", "")
    headers = dead.properties["application_headers"]
    assert headers["x-agentops-bytes"] == len(body)
    assert headers["x-agentops-sha256"] == hashlib.sha256(body).hexdigest()
    assert "over max_message_bytes (1024)" in headers["x-agentops-reason"]
