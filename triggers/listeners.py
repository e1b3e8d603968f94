"""The listeners' process (``manage.py triggers``, which ``serve`` starts beside the
worker): the schedules' tick, a consumer thread for each enabled queue trigger, and the
SMTP listener while any email trigger is enabled.

``Listeners.run`` keeps them going until its stop event is set:

- every ``AGENTOPS_TRIGGER_TICK_SECONDS``, ``triggers.cron.cron_tick`` (a slot fires
  once however many processes tick: its key is accepted once);
- every ``AGENTOPS_TRIGGER_RELOAD_SECONDS``, the triggers read again: a consumer started
  for each new enabled queue trigger, stopped for one removed, disabled or changed (a
  changed config is a new consumer), started again if it ended; the SMTP listener's
  routes replaced, the listener started or stopped.

Nothing ends the process but the stop event. A consumer whose broker or database fails
logs it, closes its database connection and starts again after a backoff (1 s doubling
to ``BACKOFF_MAX_SECONDS``); so do the tick and the reload. Stopping joins every thread
within ``STOP_SECONDS``; a thread still inside a call then is left to end with the
process (the threads are daemons), and its message, not acknowledged, is offered again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import amqp.exceptions
import kombu.exceptions
import redis.exceptions
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from agentops.runtime.secrets import SecretMissing
from tasks.models import Trigger
from triggers.config import config_errors
from triggers.cron import cron_tick
from triggers.inbound_email import (
    EmailRoute,
    InboundEmailController,
    InboundEmailHandler,
    smtp_listener,
)
from triggers.queues import QueueTrigger, queue_consume

logger = logging.getLogger("agentops.triggers.listeners")

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
STOP_SECONDS = 10.0

# Failures that are the far side's, said in one line: no traceback for a broker down.
EXPECTED_ERRORS = (
    DatabaseError,
    OSError,  # sockets: refused, reset, timed out
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ResponseError,
    kombu.exceptions.OperationalError,
    # The broker ending the connection or the consumer: CONNECTION_FORCED (what every
    # client of a RabbitMQ that restarts is sent), a consumer cancelled (its queue
    # deleted), a heartbeat missed.
    amqp.exceptions.ConnectionError,
    SecretMissing,
)


class Backoff:
    """1 s, 2 s, 4 s... up to ``BACKOFF_MAX_SECONDS`` between tries that fail."""

    def __init__(self) -> None:
        self.seconds = BACKOFF_FIRST_SECONDS

    def next(self) -> float:
        seconds = self.seconds
        self.seconds = min(self.seconds * 2, BACKOFF_MAX_SECONDS)
        return seconds

    def reset(self) -> None:
        self.seconds = BACKOFF_FIRST_SECONDS


def error_said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()[:500]


def failure_log(what: str, error: BaseException, retry_in: float) -> None:
    if isinstance(error, EXPECTED_ERRORS):
        logger.warning("%s: %s; trying again in %.0f s", what, error_said(error), retry_in)
    else:
        logger.error("%s failed; trying again in %.0f s", what, retry_in, exc_info=error)


def consumer_keep(
    trigger: QueueTrigger,
    stop: threading.Event,
    consume: Callable[..., str] = queue_consume,
    **options: Any,
) -> None:
    """A consumer thread's life: ``consume`` the trigger's stream or queue until
    ``stop`` is set or the trigger is found disabled; after an error, close this
    thread's database connection and start again after a backoff."""
    backoff = Backoff()
    try:
        while not stop.is_set():
            began = time.monotonic()
            try:
                if consume(trigger, stop=stop, **options) == "disabled":
                    return  # the next reload starts it again if it is enabled again
            except Exception as error:
                # A consumer that ran a while before failing starts from the first pause.
                if time.monotonic() - began > BACKOFF_MAX_SECONDS:
                    backoff.reset()
                retry_in = backoff.next()
                failure_log(str(trigger), error, retry_in)
                connection.close()
                stop.wait(retry_in)
    finally:
        connection.close()


@dataclass
class Consumer:
    trigger: QueueTrigger
    fingerprint: str
    stop: threading.Event
    thread: threading.Thread


def fingerprint(trigger: Trigger) -> str:
    """What a consumer was started with: a change to it means a new consumer."""
    return json.dumps([trigger.kind, trigger.config], sort_keys=True, default=str)


class Listeners:
    """The tick, the queue consumers and the SMTP listener of one process."""

    def __init__(
        self,
        *,
        stop: threading.Event | None = None,
        tick_seconds: float | None = None,
        reload_seconds: float | None = None,
        smtp_host: str | None = None,
        smtp_port: int | None = None,
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.stop = stop or threading.Event()
        self.tick_seconds = tick_seconds or settings.AGENTOPS_TRIGGER_TICK_SECONDS
        self.reload_seconds = reload_seconds or settings.AGENTOPS_TRIGGER_RELOAD_SECONDS
        self.smtp_host = settings.AGENTOPS_SMTP_LISTEN_HOST if smtp_host is None else smtp_host
        self.smtp_port = smtp_port or settings.AGENTOPS_SMTP_LISTEN_PORT
        self.consumer_options = consumer_options or {}
        self.consumers: dict[int, Consumer] = {}
        self.email_handler = InboundEmailHandler()
        self.smtp: InboundEmailController | None = None
        self.next_tick = self.next_reload = 0.0
        self.tick_backoff, self.reload_backoff, self.smtp_backoff = Backoff(), Backoff(), Backoff()
        self.smtp_next_try = 0.0
        self.smtp_host_missing_said = False
        self.refused_said: set[tuple[int, str]] = set()
        self.ready = threading.Event()  # set after the first reload: for tests and logs

    def run(self) -> None:
        """Tick and reload until the stop event is set; then stop everything."""
        logger.info(
            "triggers' listeners: tick every %.1f s, triggers read every %.1f s",
            self.tick_seconds,
            self.reload_seconds,
        )
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= self.next_reload:
                    self.reload()
                    self.ready.set()
                if now >= self.next_tick:
                    self.tick()
                wake = min(self.next_reload, self.next_tick)
                self.stop.wait(max(0.01, wake - time.monotonic()))
        finally:
            self.close()

    def tick(self) -> None:
        """The schedules' tick: ``triggers.cron.cron_tick``."""
        try:
            close_old_connections()
            cron_tick()
        except Exception as error:
            retry_in = min(self.tick_backoff.next(), self.tick_seconds * 4)
            failure_log("the schedules' tick", error, retry_in)
            connection.close()
            self.next_tick = time.monotonic() + retry_in
            return
        self.tick_backoff.reset()
        self.next_tick = time.monotonic() + self.tick_seconds

    def reload(self) -> None:
        """Read the enabled queue and email triggers; start, stop and restart to match."""
        try:
            close_old_connections()
            triggers = list(
                Trigger.objects.filter(
                    enabled=True, kind__in=[Trigger.Kind.QUEUE, Trigger.Kind.EMAIL]
                ).order_by("pk")
            )
        except Exception as error:
            retry_in = min(self.reload_backoff.next(), self.reload_seconds)
            failure_log("reading the triggers", error, retry_in)
            connection.close()
            self.next_reload = time.monotonic() + retry_in
            return
        self.reload_backoff.reset()
        self.next_reload = time.monotonic() + self.reload_seconds
        triggers = [trigger for trigger in triggers if self.config_passes(trigger)]
        self.consumers_match([t for t in triggers if t.kind == Trigger.Kind.QUEUE])
        self.smtp_match([t for t in triggers if t.kind == Trigger.Kind.EMAIL])

    def config_passes(self, trigger: Trigger) -> bool:
        """A config written around the admin's checks is not listened for; said once
        for each config it had, until it is fixed."""
        errors = config_errors(
            kind=trigger.kind, config=trigger.config, input_mapping=trigger.input_mapping
        )
        if not errors:
            return True
        said = (trigger.pk, fingerprint(trigger))
        if said not in self.refused_said:
            self.refused_said.add(said)
            logger.warning(
                "trigger %s (%r) is not listened for: its config is refused: %s",
                trigger.pk,
                trigger.name,
                "; ".join(errors),
            )
        return False

    def consumers_match(self, triggers: list[Trigger]) -> None:
        wanted = {trigger.pk: trigger for trigger in triggers}
        for pk, consumer in list(self.consumers.items()):
            trigger = wanted.get(pk)
            changed = trigger is not None and fingerprint(trigger) != consumer.fingerprint
            if trigger is None or changed or not consumer.thread.is_alive():
                if consumer.thread.is_alive():
                    said = "changed" if changed else "disabled or removed"
                    logger.info("%s: %s; stopping its consumer", consumer.trigger, said)
                consumer.stop.set()
                del self.consumers[pk]
        for pk, trigger in wanted.items():
            if pk not in self.consumers:
                self.consumer_start(trigger)

    def consumer_start(self, trigger: Trigger) -> None:
        snapshot = QueueTrigger.of(trigger)
        stop = threading.Event()
        thread = threading.Thread(
            target=consumer_keep,
            args=(snapshot, stop),
            kwargs=self.consumer_options,
            name=f"trigger-{trigger.pk}-consumer",
            daemon=True,
        )
        self.consumers[trigger.pk] = Consumer(snapshot, fingerprint(trigger), stop, thread)
        thread.start()

    def smtp_match(self, triggers: list[Trigger]) -> None:
        self.email_handler.routes_set([EmailRoute.of(trigger) for trigger in triggers])
        if not triggers:
            if self.smtp is not None:
                logger.info("no email trigger is enabled: the SMTP listener stops")
                self.smtp_stop()
            return
        if self.smtp is not None or time.monotonic() < self.smtp_next_try:
            return
        if not self.smtp_host:
            if not self.smtp_host_missing_said:
                logger.warning("email triggers are enabled, but AGENTOPS_SMTP_LISTEN_HOST is empty")
                self.smtp_host_missing_said = True
            return
        listener = smtp_listener(self.email_handler, host=self.smtp_host, port=self.smtp_port)
        try:
            listener.start()
        except Exception as error:
            # Not bound (the port taken...): end what start() began, its loop too.
            with contextlib.suppress(Exception):
                listener.stop(no_assert=True)
            with contextlib.suppress(Exception):
                listener.loop.close()
            retry_in = self.smtp_backoff.next()
            failure_log(f"the SMTP listener on {self.smtp_host}:{self.smtp_port}", error, retry_in)
            self.smtp_next_try = time.monotonic() + retry_in
            return
        self.smtp_backoff.reset()
        self.smtp = listener
        logger.info(
            "SMTP listener on %s:%d for %s",
            self.smtp_host,
            self.smtp_port,
            ", ".join(sorted(self.email_handler.routes)) or "no address (two triggers claim it)",
        )

    def smtp_stop(self) -> None:
        if self.smtp is not None:
            try:
                self.smtp.stop()
            except Exception as error:
                logger.warning("stopping the SMTP listener: %s", error_said(error))
            self.smtp = None

    def close(self) -> None:
        """Stop every consumer and the SMTP listener; join the threads, all within
        ``STOP_SECONDS``."""
        for consumer in self.consumers.values():
            consumer.stop.set()
        self.smtp_stop()
        deadline = time.monotonic() + STOP_SECONDS
        for consumer in self.consumers.values():
            consumer.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if consumer.thread.is_alive():
                logger.warning("%s: its consumer did not stop in time", consumer.trigger)
        self.consumers.clear()
        connection.close()
        logger.info("triggers' listeners stopped")


def listeners_run(*, stop: threading.Event, **options: Any) -> None:
    """Run the listeners in this thread until ``stop`` is set."""
    Listeners(stop=stop, **options).run()
