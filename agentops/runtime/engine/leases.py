"""Who owns a run: the lease claim, the fence every commit passes, the heartbeat that
renews a lease while a call is out, recovery of a run whose worker stopped, and the
reconnection that carries a write over a database restart."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from agentops import states
from agentops.runtime.engine import waits
from agentops.runtime.engine.context import Context, LeaseLost, clock_added, increments
from lineage.services import event_append
from tasks.models import (
    Run,
    RunStatus,
    Step,
    StepStatus,
)
from tasks.services import (
    run_transition,
    step_transition,
)

logger = logging.getLogger("agentops.engine")


T = TypeVar("T")


def lease_deadline() -> Any:
    return timezone.now() + timedelta(seconds=settings.AGENTOPS_LEASE_SECONDS)


def lease_claim(run_id: uuid.UUID, owner: str) -> bool:
    """Take the run if it is runnable and nobody holds a live lease on it."""
    return lease_claim_run(run_id, owner) is not None


# The waits between tries of a write that met a broken or unreachable database (a
# restart takes seconds): about 8 s in all, well inside a queue job's time limit.
RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)


CONNECTION_ERRORS = (OperationalError, InterfaceError)


class ClaimFailed(Exception):
    """The database could not be reached to claim the run, even after reconnecting: the
    queue's job must hand the run back to the queue, not drop its message."""


def connection_drop() -> None:
    """Close this thread's connection after an error, so its next query opens a fresh
    one: Django never reconnects by itself in the middle of a job or a thread."""
    try:
        connection.close()
    except DatabaseError:  # a broken connection may fail to close; it is dropped anyway
        logger.debug("closing a broken connection failed", exc_info=True)


def reconnecting(
    write: Callable[[], T], *, what: str, run_id: uuid.UUID, done: Callable[[], T | None]
) -> T:
    """``write()``, tried again on a fresh connection after a connection-level error,
    ``RECONNECT_DELAYS`` apart; the last error is raised. Before each new try, ``done()``
    says whether the failed try committed after all (the reply to a COMMIT can be lost):
    its result, or None to try again. Inside a transaction nothing is tried again: the
    connection is not this function's to close."""
    for delay in (*RECONNECT_DELAYS, None):
        try:
            return write()
        except CONNECTION_ERRORS as error:
            if delay is None or connection.in_atomic_block:
                raise
            logger.warning(
                "run %s: %s failed (%s: %s); reconnecting in %.2f s",
                run_id, what, type(error).__name__, str(error).strip(), delay,
            )  # fmt: skip
        connection_drop()
        waits.pause(delay)
        try:
            already = done()
        except CONNECTION_ERRORS:
            connection_drop()  # still unreachable: the next try says so
            continue
        if already is not None:
            return already
    raise AssertionError("unreachable")  # the loop returns or raises


def lease_claim_reconnecting(run_id: uuid.UUID, owner: str) -> Run | None:
    """``lease_claim_run``, surviving a database restart: a claim that meets a broken or
    unreachable database is tried again on a fresh connection (``reconnecting``), and
    ``ClaimFailed`` is raised if it still cannot be made. An error here is outside the
    slice's error handling, and a queue drops a job that fails: without this a run
    whose message came during a restart would wait for the reaper.

    A claim whose reply was lost may have committed: the run then carries this
    worker's name (unique to this call), and is taken as claimed."""

    def claimed_already() -> Run | None:
        return (
            Run.objects.select_related("task_version").filter(pk=run_id, lease_owner=owner).first()
        )

    try:
        return reconnecting(
            lambda: lease_claim_run(run_id, owner),
            what="the lease claim",
            run_id=run_id,
            done=claimed_already,
        )
    except CONNECTION_ERRORS as error:
        if not connection.in_atomic_block:
            connection_drop()  # whoever handles this starts on a fresh connection
        raise ClaimFailed(f"run {run_id}: the lease claim failed: {error}") from error


def lease_claim_run(run_id: uuid.UUID, owner: str) -> Run | None:
    """``lease_claim``, returning the run as claimed (with its pinned version), or None.

    The claim is a conditional UPDATE whose row count says who won: two workers racing
    for one run cannot both see 1. A run claimed after its worker stopped (its lease
    expired) is recovered, or halted once that happened ``AGENTOPS_RECOVERY_LIMIT``
    times in a row without the run getting further (``run_recover``)."""
    with transaction.atomic():
        claimed = (
            Run.objects.filter(pk=run_id, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
            .filter(Q(lease_owner="") | Q(lease_expires_at__lt=timezone.now()))
            # A note left by a worker that stopped while it waited goes with its lease.
            .update(lease_owner=owner, lease_expires_at=lease_deadline(), waiting_on="")
        )
        if claimed != 1:
            return None
        run = Run.objects.select_related("task_version").get(pk=run_id)
        if run.status == RunStatus.QUEUED:
            run_transition(
                run=run,
                to=RunStatus.RUNNING,
                actor="engine",
                payload={"worker": owner},
                recoveries=0,
            )
        else:
            run_recover(run, owner)
    return run


def run_recover(run: Run, owner: str) -> None:
    """Inside the claim's transaction: count the recovery, and halt the run if its
    workers stopped ``AGENTOPS_RECOVERY_LIMIT`` times in a row without getting further.
    The work a crash loses (a model answer not yet recorded, the seconds since the last
    commit) is counted against no budget, so without this a run whose call or answer
    kills every worker would be retried, and paid for, without end.

    Getting further is a step recorded or settled (an outcome written: a retried call
    that returned counts, retrying it does not). A claim from the queue, after a slice
    that ended in good order or a person's decision, starts the count again."""
    last, settled = run_progress(run)
    progress = last + settled
    in_a_row = run.recoveries + 1 if progress == run.recovery_progress else 1
    Run.objects.filter(pk=run.pk).update(recoveries=in_a_row, recovery_progress=progress)
    run.recoveries, run.recovery_progress = in_a_row, progress
    limit = settings.AGENTOPS_RECOVERY_LIMIT
    event_append(
        run_uuid=run.pk,
        kind="run.recovered",
        actor="engine",
        payload={
            "worker": owner,
            "reason": "the previous worker's lease expired",
            "in_a_row": in_a_row,
            "last_step": last,
        },
    )
    if in_a_row >= limit:
        where = f"at step {last}" if last else "before its first step"
        # A call in flight when the last worker stopped may or may not have taken effect,
        # and no worker will find out now: it is marked so, not left `started`.
        for step in Step.objects.filter(run=run, status=StepStatus.STARTED):
            step_transition(
                step=step,
                to=StepStatus.UNKNOWN,
                event="tool.unknown",
                payload={"tool": step.tool_name, "idempotency_key": step.idempotency_key},
                error=(
                    f"step #{step.number} ({step.tool_name}) was in flight when the run was "
                    "halted for stopping its workers: whether it took effect is not known"
                ),
            )
        run_transition(
            run=run,
            to=RunStatus.HALTED,
            actor="engine",
            reason=(
                f"its worker stopped {in_a_row} times in a row {where}, with nothing "
                f"recorded in between: halted rather than tried again "
                f"(AGENTOPS_RECOVERY_LIMIT is {limit})"
            ),
            payload={"recoveries": in_a_row, "last_step": last},
        )


STEP_SETTLED = [status for status in StepStatus.values if states.STEP.terminal(status)]


def run_progress(run: Run) -> tuple[int, int]:
    """How far the run has got: its last step's number, and how many steps are settled.
    Neither ever goes down."""
    progress = Step.objects.filter(run=run).aggregate(
        last=Max("number"), settled=Count("pk", filter=Q(status__in=STEP_SETTLED))
    )
    return progress["last"] or 0, progress["settled"]


def fence(
    run_id: uuid.UUID, owner: str, *, add: dict[str, Any] | None = None, **values: Any
) -> dict[str, Any]:
    """Inside a step's transaction: renew the lease, add to counters (and the seconds of
    work since the last commit), set ``values``, and prove this worker still owns a
    running run. Anything else rolls the step back. Returns what was added."""
    added = clock_added(add)
    updated = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING, lease_owner=owner).update(
        lease_expires_at=lease_deadline(), **increments(added), **values
    )
    if updated != 1:
        raise LeaseLost(f"worker {owner} no longer owns run {run_id}")
    return added


def lease_fence(
    ctx: Context, *, add: dict[str, Any] | None = None, **values: Any
) -> dict[str, Any]:
    """``fence`` for the slice's run; its record in memory follows once the transaction
    commits (a rollback ends the slice, and the next one reads the record afresh).
    Returns what it adds to the run's counters, the seconds of work included."""
    added = fence(ctx.run.pk, ctx.owner, add=add, **values)
    ctx.on_commit(lambda: ctx.run_changed(added, values))
    return added


def lease_held(ctx: Context) -> bool:
    return Run.objects.filter(
        pk=ctx.run.pk, status=RunStatus.RUNNING, lease_owner=ctx.owner
    ).exists()


class LeaseHeartbeat:
    """Renews the lease from a thread while the worker works on the run (a long tool or
    model call must not make a healthy worker look dead). It never takes back a lease
    that moved on: the renewal is conditional on this worker still holding it."""

    def __init__(self, run_id: uuid.UUID, owner: str) -> None:
        self.run_id = run_id
        self.owner = owner
        self.interval = settings.AGENTOPS_LEASE_SECONDS / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")

    def _beat(self) -> None:
        wait = self.interval
        try:
            while not self._stop.wait(wait):
                # After a failure, sooner: the lease runs out while the database is away.
                wait = self.interval if self.renew() else min(self.interval, 1.0)
        finally:
            connection_drop()  # this thread's own connection

    def renew(self) -> bool:
        """One beat, on its own: a failure (a database restart) is logged and the
        connection dropped, so the next beat reconnects; the thread beats on until it is
        stopped. A failed renewal only shortens the lease; the fence decides."""
        try:
            Run.objects.filter(
                pk=self.run_id, status=RunStatus.RUNNING, lease_owner=self.owner
            ).update(lease_expires_at=lease_deadline())
        except Exception as error:
            logger.warning(
                "run %s: the lease heartbeat failed (%s: %s); it reconnects at the next beat",
                self.run_id, type(error).__name__, str(error).strip(),
            )  # fmt: skip
            connection_drop()
            return False
        return True

    def start(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
