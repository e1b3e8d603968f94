"""The database goes away under a live worker, and the worker carries on.

Faults found by the chaos run (issue 12): after a database restart the lease heartbeat
stopped for good, a committed call's outcome was dropped, and a message delivered during
the restart failed at the claim and was deleted by django-q2. Here the faults are real:
on PostgreSQL the test database's connections are terminated from another connection
(as a restart does to them); on SQLite another connection holds the write lock, so a
write fails with "database is locked". The server itself is never restarted: other
tests use it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from agentops.runtime import engine
from agentops.runtime.engine import LeaseHeartbeat, Outcome, advance, lease_claim, leases
from agentops.runtime.engine.jobs import run_advance_job
from lineage.services import chain_verify
from lineage.verification import conninfo_for
from tasks.models import AutonomyLevel, Run, RunStatus, Step, StepStatus, Task, Tool, ToolGrant
from tasks.services import run_start, tools_sync
from tests.agent_tools import EFFECTS
from tests.crash_tools import AFTER_EFFECT, reached_marker, release_marker
from tests.peers.sink import EffectSink
from tests.peers.workers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="terminates the test database's connections: run with DATABASE_URL=postgres://...",
)
sqlite_only = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="holds a SQLite file's write lock"
)

LEASE_SECONDS = 0.9  # the heartbeat beats every 0.3 s


def backends_terminate() -> int:
    """What a database restart does to every open connection, for this test database
    only: each one is ended by the server. The test's own connection too, so it is
    dropped here and opens afresh at its next query."""
    with psycopg.connect(**conninfo_for(connection), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    connection.close()
    return ended


class WriteLock:
    """Another connection holding the SQLite file's write lock until ``release``."""

    def __init__(self) -> None:
        path = Path(connection.settings_dict["NAME"])
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("BEGIN IMMEDIATE")
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._db.execute("ROLLBACK")
            self._db.close()


@pytest.fixture
def lease_seconds(settings) -> float:
    settings.AGENTOPS_LEASE_SECONDS = LEASE_SECONDS
    return LEASE_SECONDS


def echo_run(make_task, operator) -> Run:
    task = make_task([{"calls": [("test_echo", {"text": "hi"})]}, {"content": "done"}],
                     tools=["test_echo"])  # fmt: skip
    return run_start(task=task, run_input={}, user=operator)


def lease_of(run: Run):
    return Run.objects.values_list("lease_expires_at", flat=True).get(pk=run.pk)


@contextlib.contextmanager
def heartbeat(run: Run, owner: str) -> Iterator[LeaseHeartbeat]:
    beat = LeaseHeartbeat(run.pk, owner).start()
    try:
        yield beat
    finally:
        beat.stop()


# The lease heartbeat -------------------------------------------------------------------


@pytest.mark.postgres
@postgres_only
def test_the_heartbeat_reconnects_after_its_connection_is_terminated(
    make_task, operator, lease_seconds
):
    run = echo_run(make_task, operator)
    assert lease_claim(run.pk, "worker-a")
    with heartbeat(run, "worker-a") as beat:
        first = lease_of(run)
        wait_for(lambda: lease_of(run) > first, timeout=5, what="a first renewal")

        assert backends_terminate() >= 1  # the heartbeat's connection among them
        ended_at = timezone.now()
        wait_for(
            lambda: lease_of(run) > ended_at + timedelta(seconds=lease_seconds),
            timeout=5,
            what="a renewal after the connections were terminated",
        )
        time.sleep(lease_seconds * 2)  # longer than a lease: only the beats keep it

        assert beat._thread.is_alive()
        assert not lease_claim(run.pk, "worker-b")  # the live worker keeps its run
    assert Run.objects.get(pk=run.pk).lease_owner == "worker-a"


@sqlite_only
def test_the_heartbeat_beats_on_after_the_database_was_locked(
    make_task, operator, lease_seconds, busy_timeout
):
    run = echo_run(make_task, operator)
    assert lease_claim(run.pk, "worker-a")
    with heartbeat(run, "worker-a") as beat:
        first = lease_of(run)
        wait_for(lambda: lease_of(run) > first, timeout=5, what="a first renewal")

        lock = WriteLock()
        try:
            time.sleep(lease_seconds)  # three beats fail: "database is locked"
            held = lease_of(run)
        finally:
            lock.release()
        wait_for(lambda: lease_of(run) > held, timeout=5, what="a renewal after the lock")
        time.sleep(lease_seconds * 2)

        assert beat._thread.is_alive()
        assert not lease_claim(run.pk, "worker-b")
    assert Run.objects.get(pk=run.pk).lease_owner == "worker-a"


# A committed call's outcome --------------------------------------------------------------


@pytest.mark.postgres
@postgres_only
def test_a_calls_outcome_is_recorded_after_the_connections_are_terminated(operator, tmp_path):
    """The call took effect at the far side; then the database dropped every connection
    before the outcome was written. The outcome is written on a new connection: the step
    succeeds, the effect is made once, and the run goes on to its end."""
    tools_sync()
    task = Task.objects.create(
        slug="db-fault-send",
        name="Database fault: send",
        objective_template="Make the one call.",
        model="scripted:crash-agent",
        autonomy_level=AutonomyLevel.AUTONOMOUS,
    )
    ToolGrant.objects.create(task=task, tool=Tool.objects.get(name="crash_send"))
    with EffectSink() as sink:
        arguments = {"sink": sink.url, "markers": str(tmp_path), "pause": AFTER_EFFECT,
                     "text": "pay 42 EUR"}  # fmt: skip
        run = run_start(task=task, run_input={"tool": "crash_send", "arguments": arguments},
                        user=operator)  # fmt: skip
        outcomes: list[Outcome] = []

        def worker() -> None:
            try:
                outcomes.append(advance(run.pk, owner="worker-a"))
            finally:
                connection.close()

        thread = threading.Thread(target=worker)
        thread.start()
        try:
            wait_for(reached_marker(tmp_path, AFTER_EFFECT).exists, what="the call's effect")
            assert sink.effects() == 1
            assert backends_terminate() >= 1  # the worker's connection among them
        finally:
            release_marker(tmp_path, AFTER_EFFECT).write_text("")
            thread.join(timeout=60)

        assert outcomes == [Outcome.FINISHED]
        step = Step.objects.get(run=run, tool_name="crash_send")
        assert step.status == StepStatus.SUCCEEDED, step.error
        assert sink.effects() == 1  # fired once, recorded once
        run.refresh_from_db()
        assert run.status == RunStatus.SUCCEEDED, run.reason
        assert chain_verify(run.pk).intact


# The claim -------------------------------------------------------------------------------


@pytest.mark.postgres
@postgres_only
def test_a_claim_on_a_terminated_connection_reconnects_and_advances_the_run(make_task, operator):
    run = echo_run(make_task, operator)
    connection.ensure_connection()  # the connection the job finds, already open...
    backends_terminate_keeping_none()  # ...and ended by the server, as by a restart

    assert run_advance_job(str(run.pk)) == Outcome.FINISHED.value
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert EFFECTS == {"echo:hi": 1}


def backends_terminate_keeping_none() -> None:
    """``backends_terminate`` that leaves this thread's connection ended and open, as a
    job finds it after a restart: its first query fails."""
    with psycopg.connect(**conninfo_for(connection), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@sqlite_only
def test_a_claim_that_meets_a_locked_database_tries_again_and_advances_the_run(
    make_task, operator, busy_timeout
):
    run = echo_run(make_task, operator)
    lock = WriteLock()
    releaser = threading.Timer(0.6, lock.release)  # within the claim's tries (~8 s)
    releaser.start()
    try:
        assert run_advance_job(str(run.pk)) == Outcome.FINISHED.value
    finally:
        releaser.cancel()
        lock.release()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert EFFECTS == {"echo:hi": 1}


class ReleaseOnRecord(logging.Handler):
    """Releases the lock when a log record says ``marker``: an event, not a timer."""

    def __init__(self, lock: WriteLock, marker: str) -> None:
        super().__init__()
        self.write_lock, self.marker = lock, marker

    def emit(self, record: logging.LogRecord) -> None:
        if self.marker in record.getMessage():
            self.write_lock.release()


@sqlite_only
def test_a_claim_that_never_reaches_the_database_puts_the_run_back_on_the_queue(
    make_task, operator, busy_timeout, monkeypatch
):
    """Every try at the claim fails; the job does not fail (django-q2 would delete its
    message): it queues the run again, and that message advances it."""
    monkeypatch.setattr(leases, "RECONNECT_DELAYS", (0.05, 0.05), raising=False)
    run = echo_run(make_task, operator)
    OrmQ.objects.all().delete()  # run_start's own message: only the job's counts here
    lock = WriteLock()
    handler = ReleaseOnRecord(lock, "queued again")  # the database is back after that
    dispatch_log = logging.getLogger("agentops.dispatch")
    dispatch_log.addHandler(handler)
    try:
        assert run_advance_job(str(run.pk)) == "queued_again"
    finally:
        dispatch_log.removeHandler(handler)
        lock.release()

    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED  # not claimed, not lost
    (message,) = [queued.task for queued in OrmQ.objects.all()]
    assert message["func"] == "agentops.runtime.engine.jobs.run_advance_job"
    assert list(message["args"]) == [str(run.pk)]
    assert message["kwargs"] == {"claim_failures": 1}

    assert run_advance_job(*message["args"], **message["kwargs"]) == Outcome.FINISHED.value
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason


@sqlite_only
def test_the_job_stops_queueing_again_after_its_bound(
    make_task, operator, busy_timeout, monkeypatch
):
    from agentops.runtime import dispatch

    monkeypatch.setattr(leases, "RECONNECT_DELAYS", (0.05,), raising=False)
    run = echo_run(make_task, operator)
    lock = WriteLock()
    try:
        with pytest.raises(engine.ClaimFailed, match="database is locked"):
            run_advance_job(str(run.pk), claim_failures=dispatch.CLAIM_RESENDS - 1)
    finally:
        lock.release()
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED  # the reaper's, at last
