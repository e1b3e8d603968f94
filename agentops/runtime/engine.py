"""The durable step loop.

``advance(run_id)`` claims the run's lease, works a bounded slice, and leaves the run
queued, waiting, or finished. It keeps no state of its own between slices: each slice
reads the run's record once (again when a commit may have met another writer's,
``Context.stale``) and keeps it in step with what it commits (``Context``), so a run
resumes from its record after any stop.

The guarantees (docs/guarantees.md):
- every change to a run commits in one transaction with its lineage events;
- a tool step is committed ``started``, with its idempotency key, before the call fires;
  on resume an idempotent tool is called again with the same key, any other becomes
  ``unknown`` and the run waits for a person: nothing re-fires blindly;
- a recorded model turn is reused, never asked again;
- every commit is fenced by the lease: a worker that lost the run writes nothing, except
  the outcome of a call it already made and the notes of that call's retries;
- budgets are checked before every model and tool call, with the call's projected cost.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Count, F, Max, Q
from django.utils import timezone

from agentops import states
from agentops.runtime import commits
from agentops.runtime.budgets import (
    BudgetBreach,
    Limits,
    Usage,
    budget_check,
    budget_note,
    cost,
    extension_for,
    limits_for,
    tokens_estimate,
)
from agentops.runtime.builtins import (
    ASK_SCHEMA,
    ASK_TOOL,
    CHECK_PROMPT,
    CHECK_TOOL,
    PLAN_TOOL,
    PLANNING_NOTE,
    builtin_spec,
    check_read,
    plan_errors,
)
from agentops.runtime.gates import (
    GateDecision,
    Verdict,
    call_digest,
    confidence_split,
    gate_decide,
    schema_with_confidence,
)
from agentops.runtime.loops import LoopFinding, ToolCallRecord, loop_find
from agentops.runtime.models import ModelError, ModelTurn, client_for
from agentops.runtime.models.base import TOOL_NAME_CHARS, turn_storable
from agentops.runtime.rules import RuleSpec, rules_evaluate
from agentops.runtime.secrets import config_secrets, redact
from agentops.runtime.tools import ToolContext, ToolResult, arguments_errors, executor_for
from agentops.strict_json import json_loads_strict, json_storable, text_storable
from approvals.models import ApprovalKind, ApprovalStatus, Resolution
from approvals.services import approval_request, approvals_withdraw
from lineage.services import event_append
from tasks.models import (
    AutonomyLevel,
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Task,
    Tool,
)
from tasks.services import (
    price_for,
    run_transition,
    step_moved,
    step_transition,
    step_transition_if_unchanged,
    steps_built,
    steps_create,
)

logger = logging.getLogger("agentops.engine")

T = TypeVar("T")

SYSTEM_PREAMBLE = (
    "You are an agent run by agentops. Work towards the objective with the tools you are "
    "given. Call tools when you need information or to act; a person may have to approve "
    "some calls, and may reject one with a reason: then re-plan. With every call, give "
    "_confidence: how sure you are, from 0 to 1, that it is the right next step with the "
    "right arguments. When the work is done, reply with your final answer and no tool calls."
)


class Outcome(Enum):
    NOT_CLAIMED = "not_claimed"  # another worker holds the run, or it is not runnable
    CONTINUE = "continue"
    YIELDED = "yielded"  # the slice ended; the run is queued again
    WAITING = "waiting"  # a person must act
    FINISHED = "finished"  # succeeded, failed, halted
    STOPPED = "stopped"  # the run was cancelled or taken over while this worker worked


class LeaseLost(Exception):
    """This worker no longer owns the run; it must stop without writing."""


class WorkClock:
    """Seconds of work for the time budget: counted while a worker holds the run, and
    added to the run at each commit, so waiting for a person or in the queue is not."""

    def __init__(self) -> None:
        self.mark = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        elapsed, self.mark = now - self.mark, now
        return elapsed

    def pending(self) -> float:
        return time.monotonic() - self.mark


_clock: ContextVar[WorkClock | None] = ContextVar("agentops_work_clock", default=None)
# Reads that cannot change what a slice does, kept for the slice: the granted tools of
# the pinned definition, and the model's price. An edit takes effect at the next slice.
_slice_cache: ContextVar[dict | None] = ContextVar("agentops_slice_cache", default=None)


def slice_cached(key: tuple, load: Callable[[], Any]) -> Any:
    cache = _slice_cache.get()
    if cache is None:
        return load()
    if key not in cache:
        cache[key] = load()
    return cache[key]


def step_derived(step: Step, name: str, derive: Callable[[], Any]) -> Any:
    """What ``derive`` makes of ``step``. A step in a final status never changes again,
    so that is made once per slice and kept; the transcript and the loop check read
    every earlier step each turn, and would otherwise redo it all, O(steps²) a run."""
    if not states.STEP.terminal(step.status):
        return derive()
    return slice_cached((name, step.pk, step.status), derive)


def clock_added(add: dict[str, Any] | None = None) -> dict[str, Any]:
    """``add`` plus the seconds of work since the last commit, for the run's counters."""
    added = dict(add or {})
    clock = _clock.get()
    if clock:
        added["seconds_used"] = added.get("seconds_used", 0.0) + clock.lap()
    return added


def increments(added: dict[str, Any]) -> dict[str, Any]:
    """``{"steps_used": 1}`` as the UPDATE's ``steps_used = steps_used + 1``."""
    return {name: F(name) + delta for name, delta in added.items()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def advance(
    run_id: uuid.UUID, *, owner: str | None = None, max_seconds: float | None = None
) -> Outcome:
    """Work on the run until it waits, ends, or the slice is spent."""
    owner = owner or worker_name()
    run = lease_claim_reconnecting(run_id, owner)
    if run is None:
        return Outcome.NOT_CLAIMED
    if run.status != RunStatus.RUNNING:  # halted as it was claimed: its worker kept stopping
        return Outcome.FINISHED
    slice_ends = time.monotonic() + (max_seconds or settings.AGENTOPS_SLICE_SECONDS)
    clock = _clock.set(WorkClock())
    cache = _slice_cache.set({})
    heartbeat = LeaseHeartbeat(run_id, owner).start()
    try:
        ctx = context_for(run, owner)
        while True:
            outcome = step_next(ctx)
            if outcome is not Outcome.CONTINUE:
                return outcome
            if time.monotonic() >= slice_ends:
                return run_yield(ctx)
    except (LeaseLost, states.InvalidTransition) as stop:
        logger.info("run %s: worker %s stops: %s", run_id, owner, stop)
        return Outcome.STOPPED
    except Exception as error:
        logger.exception("run %s: the engine failed", run_id)
        return run_fail_on_error(run_id, owner, error)
    finally:
        heartbeat.stop()
        _slice_cache.reset(cache)
        _clock.reset(clock)


# Leases ------------------------------------------------------------------------------


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
        time.sleep(delay)
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
            .update(lease_owner=owner, lease_expires_at=lease_deadline())
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


def run_yield(ctx: Context) -> Outcome:
    from agentops.runtime import dispatch

    with ctx.transaction():
        lease_fence(ctx)
        run_transition(
            run=ctx.run,
            to=RunStatus.QUEUED,
            actor="engine",
            reason="",
            lease_owner="",
            lease_expires_at=None,
            payload={"why": "the slice ended; the run goes back to the queue"},
        )
        dispatch.enqueue(ctx.run.pk)
    return Outcome.YIELDED


def run_end(ctx: Context, *, to: str, reason: str = "", **fields: Any) -> Outcome:
    reason = text_noted(reason, where="reason")  # it may quote a model server's error
    with ctx.transaction():
        lease_fence(ctx)
        run_transition(run=ctx.run, to=to, actor="engine", reason=reason, **fields)
    return Outcome.FINISHED


def run_end_by_id(
    run_id: uuid.UUID, owner: str, *, to: str, reason: str = "", **fields: Any
) -> Outcome:
    reason = text_noted(reason, where="reason")  # it may quote any error's text
    with transaction.atomic():
        fence(run_id, owner)
        run = Run.objects.get(pk=run_id)
        run_transition(run=run, to=to, actor="engine", reason=reason, **fields)
    return Outcome.FINISHED


def run_fail_on_error(run_id: uuid.UUID, owner: str, error: Exception) -> Outcome:
    """A bug or an outage stopped the loop: fail the run with the error if we still own
    it. If even that cannot be written, the lease expires and the run is recovered."""
    try:
        return run_end_by_id(
            run_id,
            owner,
            to=RunStatus.FAILED,
            reason=f"internal error: {type(error).__name__}: {error}",
        )
    except Exception:
        logger.exception("run %s: could not record the failure", run_id)
        return Outcome.STOPPED


# The loop ----------------------------------------------------------------------------


@dataclass
class Context:
    """The slice's view of the run: the run row, its pinned definition, its steps.

    It is read once when the slice starts and then kept in step with what this worker
    commits, since while it holds the lease nobody else writes the run's steps or
    counters: the fence in every transaction proves that it still holds it. Where a
    commit may have met someone else's write, the record is marked ``stale`` and read
    again before the next step."""

    run: Run
    owner: str
    definition: dict
    steps: list[Step]
    stale: bool = False
    _committed: list[Callable[[], None]] | None = field(default=None, repr=False)

    def run_changed(self, added: dict[str, Any], values: dict[str, Any]) -> None:
        """What a committed fence did to the run's row, mirrored in memory."""
        for name, delta in added.items():
            setattr(self.run, name, getattr(self.run, name) + delta)
        for name, value in values.items():
            setattr(self.run, name, value)

    def steps_committed(self, steps: list[Step]) -> None:
        self.steps.extend(steps)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One of the slice's transactions. What it wrote reaches the record in memory
        when the block commits; after an error, nothing does. (Not Django's
        ``on_commit``, which waits for the outermost transaction: a test wraps each test
        in one.) A block inside another leaves it to the outer one."""
        if self._committed is not None:
            with transaction.atomic():
                yield
            return
        self._committed = []
        try:
            with transaction.atomic():
                yield
            applies = self._committed
        finally:
            self._committed = None
        for apply in applies:
            apply()

    def outside_transaction(self) -> bool:
        """Whether a write now would be a commit of its own, not part of a block's."""
        return self._committed is None

    def on_commit(self, apply: Callable[[], None]) -> None:
        if self._committed is None:
            raise RuntimeError("a slice's write must be inside ctx.transaction()")
        self._committed.append(apply)

    def reload(self) -> None:
        fresh = context_load(self.run.pk, self.owner)
        self.run, self.definition, self.steps = fresh.run, fresh.definition, fresh.steps
        self.stale = False

    def setting(self, name: str) -> Any:
        return self.definition.get(name, DEFINITION_DEFAULTS.get(name))

    @property
    def limits(self) -> Limits:
        return limits_for(self.definition, self.run.budget_extra)

    def usage(self) -> Usage:
        clock = _clock.get()
        return Usage(
            steps=self.run.steps_used,
            tokens=self.run.tokens_in + self.run.tokens_out,
            seconds=self.run.seconds_used + (clock.pending() if clock else 0.0),
            spend=self.run.spend,
        )

    @property
    def number(self) -> int:
        """The number the next step gets."""
        return (self.steps[-1].number + 1) if self.steps else 1


# A task version made before a setting existed runs as it did then: without the rail
# (no self-check, no confidence threshold), or with the default the rail had.
DEFINITION_DEFAULTS: dict[str, Any] = {
    "max_tokens": None,
    "max_seconds": None,
    "max_spend": None,
    "on_budget_breach": "halt",
    "loop_repeat_limit": 3,
    "stall_limit": 8,
    "on_loop": "halt",
    "self_check": False,
    "confidence_threshold": 0.0,
    "confidence_gate": False,
    "model_max_attempts": 3,
}


def context_load(run_id: uuid.UUID, owner: str) -> Context:
    """Read the run's record for a slice; stop if this worker does not hold the run."""
    return context_for(Run.objects.select_related("task_version").get(pk=run_id), owner)


def context_for(run: Run, owner: str) -> Context:
    """The slice's record of ``run``, read just now with its pinned version: its steps."""
    if run.status != RunStatus.RUNNING or run.lease_owner != owner:
        raise LeaseLost(f"run {run.pk} is {run.status}, leased to {run.lease_owner or 'nobody'}")
    steps = list(Step.objects.filter(run=run).select_related("tool").order_by("number"))
    return Context(run=run, owner=owner, definition=run.task_version.definition, steps=steps)


def step_next(ctx: Context) -> Outcome:
    """Do the one next thing the run's record calls for."""
    if ctx.stale:
        ctx.reload()
    steps = ctx.steps
    last_model = next((s for s in reversed(steps) if s.kind == StepKind.MODEL), None)
    if last_model is not None:
        answers = {
            s.tool_call_id: s
            for s in steps
            if s.kind in (StepKind.TOOL, StepKind.PLAN) and s.number > last_model.number
        }
        for call in last_model.tool_calls:
            step = answers.get(call["id"])
            if step is None:
                return call_propose(ctx, last_model, call)
            if step.status == StepStatus.PROPOSED:
                return call_after_gate(ctx, step)
            if step.status == StepStatus.STARTED:
                return call_recover(ctx, step)
            if step.status == StepStatus.UNKNOWN:
                return call_after_unknown(ctx, step)
        if not last_model.tool_calls:
            later = [s for s in steps if s.number > last_model.number]
            if not any(s.kind == StepKind.HUMAN for s in later):
                return run_finish(ctx, last_model, later)
    finding = loops_check(ctx)
    if finding is not None:
        return loop_stop(ctx, finding)
    return model_turn(ctx)


def run_finish(ctx: Context, final: Step, later: list[Step]) -> Outcome:
    """The model gave its final answer: check it if the task asks, then finish or ask a
    person to review it."""
    if not ctx.setting("self_check"):
        with ctx.transaction():
            lease_fence(ctx)
            run_succeed(ctx, final.content)
        return Outcome.FINISHED
    check = next((s for s in later if s.kind == StepKind.CHECK), None)
    if check is None:
        return check_turn(ctx, final)
    report = check.result or {}
    threshold = float(ctx.setting("confidence_threshold"))
    if report.get("objective_met") and report.get("confidence", 0) >= threshold:
        with ctx.transaction():
            lease_fence(ctx)
            run_succeed(ctx, final.content, confidence=report["confidence"])
        return Outcome.FINISHED
    why = (
        "the agent says the objective is not met"
        if not report.get("objective_met")
        else f"the agent's confidence {report.get('confidence', 0):.2f} is below {threshold:.2f}"
    )
    return outcome_review(ctx, final, check, why, report)


def run_succeed(ctx: Context, outcome: str, **payload: Any) -> None:
    """Inside a fenced transaction: the final answer is the run's outcome."""
    run_transition(
        run=ctx.run,
        to=RunStatus.SUCCEEDED,
        actor="engine",
        outcome=outcome,
        payload={"outcome": outcome, **payload},
    )


def outcome_review(
    ctx: Context, final: Step, check: Step | None, why: str, report: dict[str, Any]
) -> Outcome:
    """A person decides whether the agent's final answer is the run's outcome."""
    threshold = float(ctx.setting("confidence_threshold"))
    with ctx.transaction():
        lease_fence(ctx)
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.OUTCOME_REVIEW,
            step=check or final,
            gate=why,
            reasoning=report.get("evidence", ""),
            confidence=report.get("confidence"),
            context={"outcome": final.content, "threshold": threshold, **report},
        )
        run_wait(ctx.run, f"review the outcome ({why})")
    return Outcome.WAITING


# Budgets and loops -------------------------------------------------------------------


def budget_gate(
    ctx: Context,
    *,
    tokens: int = 0,
    spend: Decimal = Decimal(0),
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> Outcome | None:
    """Before a call: stop the run here if the call could cross a budget (halt, or ask
    a person for more), or hand the breach to ``on_breach``."""
    breach = budget_check(ctx.limits, ctx.usage(), tokens=tokens, spend=spend)
    if breach is None:
        return None
    if on_breach is not None:
        return on_breach(breach)
    payload = {"budget": breach.budget, "limit": breach.limit, "used": breach.used}
    if ctx.setting("on_budget_breach") != "ask":
        return run_end(ctx, to=RunStatus.HALTED, reason=breach.reason, payload=payload)
    extension = extension_for(breach, ctx.limits)
    with ctx.transaction():
        lease_fence(ctx)
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.BUDGET_EXTENSION,
            gate=breach.reason,
            context={**payload, "extension": extension},
        )
        run_wait(ctx.run, f"more budget ({breach.reason})")
    return Outcome.WAITING


OK_STATUSES = (StepStatus.SUCCEEDED, StepStatus.SIMULATED)


def loops_check(ctx: Context) -> LoopFinding | None:
    calls = (
        step_derived(
            s,
            "loop_record",
            lambda s=s: ToolCallRecord(
                number=s.number,
                tool=s.tool_name,
                arguments=s.arguments,
                outcome=s.result if s.status in OK_STATUSES else {"error": s.error},
            ),
        )
        for s in ctx.steps
        if s.kind in (StepKind.TOOL, StepKind.PLAN)  # plans too: plan churn is a stall
        and s.number > ctx.run.loops_accepted_through
        and s.status in (*OK_STATUSES, StepStatus.FAILED, StepStatus.REFUSED)
    )
    return loop_find(
        calls,
        repeat_limit=int(ctx.setting("loop_repeat_limit")),
        stall_limit=int(ctx.setting("stall_limit")),
    )


def loop_stop(ctx: Context, finding: LoopFinding) -> Outcome:
    payload = {"finding": finding.kind, "through_step": finding.through_step}
    if ctx.setting("on_loop") != "ask":
        return run_end(ctx, to=RunStatus.HALTED, reason=finding.reason, payload=payload)
    with ctx.transaction():
        lease_fence(ctx)
        approval_request(
            run=ctx.run, kind=ApprovalKind.LOOP_REVIEW, gate=finding.reason, context=payload
        )
        run_wait(ctx.run, f"decide whether the run goes on ({finding.kind})")
    return Outcome.WAITING


# Model turns -------------------------------------------------------------------------


def model_turn(ctx: Context) -> Outcome:
    # The tools as the model sees them do not change within a slice: made once.
    specs = slice_cached(
        ("specs", tuple(ctx.definition["tools"])),
        lambda: [
            builtin_spec(PLAN_TOOL),
            builtin_spec(ASK_TOOL),
            *(tool_spec(t) for t in granted_tools(ctx.definition).values()),
        ],
    )
    # The first turn drafts the plan before anything else happens.
    first = not any(s.kind == StepKind.MODEL for s in ctx.steps)
    answer = model_call(ctx, transcript(ctx), specs, tool_choice=PLAN_TOOL if first else None)
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    calls = calls_normalise(turn, ctx.steps, ctx.number)
    # The common case, a first call that runs at once, is started in this same commit:
    # the ledger entry still precedes the call, with one commit fewer per agent step.
    doors = None
    if (
        calls
        and calls[0]["name"] != PLAN_TOOL
        and not budget_check(ctx.limits, ctx.usage(), steps=2)
    ):
        doors = call_doors(ctx, calls[0])
        if not doors.runs_now:
            doors = None
    # A final answer that needs no check ends the run in the same commit.
    final = not calls and not ctx.setting("self_check")
    added = usage_added(turn, turn_cost)
    if doors is not None:
        added["steps_used"] = 2
    model_step = step_entry(
        event="model.responded",
        payload={
            "content": turn.content,
            "tool_calls": calls,
            "model": turn.model,
            "tokens_in": turn.tokens_in,
            "tokens_out": turn.tokens_out,
            "cost": str(turn_cost),
            **normalised(turn.normalised),
        },
        kind=StepKind.MODEL,
        status=StepStatus.SUCCEEDED,
        content=turn.content,
        tool_calls=calls,
        result=normalised(turn.normalised) or None,
        tokens_in=turn.tokens_in,
        tokens_out=turn.tokens_out,
        duration_ms=duration_ms,
        finished_at=timezone.now(),
    )
    entries = [model_step]
    if doors is not None:
        entries.append(call_start(ctx, calls[0], doors, ctx.number + 1))
    if final:
        with ctx.transaction():
            lease_fence(ctx, add=added)
            steps_add(ctx, *entries)
            run_succeed(ctx, turn.content)
        return Outcome.FINISHED
    steps = steps_commit(ctx, added, entries)
    if doors is not None:
        return call_fire(ctx, steps[1], doors.tool)
    return Outcome.CONTINUE


def usage_added(turn: ModelTurn, turn_cost: Decimal) -> dict[str, Any]:
    return {
        "steps_used": 1,
        "tokens_in": turn.tokens_in,
        "tokens_out": turn.tokens_out,
        "spend": turn_cost,
    }


def model_call(
    ctx: Context,
    messages: list[dict],
    specs: list[dict],
    *,
    tool_choice: str | None,
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> tuple[ModelTurn, int, Decimal] | Outcome:
    """Ask the model, within budget, retrying transient failures with backoff.

    The call's cost is projected before it is made: the prompt is estimated, the answer
    is capped with max_tokens, so a call that could cross the token or spend budget is
    not made. Returns (turn, milliseconds, cost), or the Outcome that stopped the run."""
    price = slice_cached(("price", ctx.run.model_label), lambda: price_for(ctx.run.model_label))
    limits, usage = ctx.limits, ctx.usage()
    if price is None and limits.spend is not None:
        return run_end(
            ctx,
            to=RunStatus.FAILED,
            reason=f"the model {ctx.run.model_label!r} has no price, so spend cannot be kept",
        )
    price_in, price_out = price or (Decimal(0), Decimal(0))
    prompt = tokens_estimate(messages, specs)
    max_out = settings.AGENTOPS_MAX_OUTPUT_TOKENS
    if limits.tokens is not None:
        max_out = min(max_out, max(0, limits.tokens - usage.tokens - prompt))
        if max_out < MIN_ANSWER_TOKENS:
            # Not even a short answer fits: this always breaches the token budget.
            max_out = MIN_ANSWER_TOKENS
    projected = cost(tokens_in=prompt, tokens_out=max_out, price_in=price_in, price_out=price_out)
    stopped = budget_gate(ctx, tokens=prompt + max_out, spend=projected, on_breach=on_breach)
    if stopped:
        return stopped
    timeout = settings.AGENTOPS_MODEL_TIMEOUT
    if limits.seconds is not None:
        timeout = max(1.0, min(timeout, limits.seconds - usage.seconds))
    client = client_for(ctx.run.model_label)
    attempts = int(ctx.setting("model_max_attempts"))
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            turn = client.complete(
                messages=messages,
                tools=specs,
                tool_choice=tool_choice,
                max_tokens=max_out,
                timeout=timeout,
            )
        except ModelError as error:
            if not error.transient or attempt == attempts:
                tried = f" (tried {attempt} times)" if attempt > 1 else ""
                return run_end(
                    ctx, to=RunStatus.FAILED, reason=f"the model call failed{tried}: {error}"
                )
            # The server's Retry-After where it gave one, within the run's time budget.
            default = backoff(settings.AGENTOPS_MODEL_BACKOFF_SECONDS, attempt)
            delay = error.retry_wait(default, limits, ctx.usage())
            retry_note(ctx, "model.retrying", attempt=attempt, error=str(error), delay=delay)
            time.sleep(delay)
            continue
        duration_ms = int((time.monotonic() - started) * 1000)
        # Everything after reads the turn as stored, so a resumed run acts on the same.
        turn = turn_storable(turn)
        turn_cost = cost(
            tokens_in=turn.tokens_in,
            tokens_out=turn.tokens_out,
            price_in=price_in,
            price_out=price_out,
        )
        return turn, duration_ms, turn_cost
    raise AssertionError("unreachable: the loop returns on its last attempt")


MIN_ANSWER_TOKENS = 64


def backoff(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: base, 2 x base, 4 x base..., each from half to
    the whole of it, so retrying workers spread out. Capped at 30 seconds."""
    ceiling = min(30.0, base * 2 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def retry_note(ctx: Context, kind: str, *, fenced: bool = True, **payload: Any) -> None:
    """Record a retry. Inside a tool call (``fenced=False``) the note is written even if
    the lease moved meanwhile: the call is in flight and its trail must be whole."""
    payload, notes = json_storable(payload)  # an error's text, as the far side wrote it
    payload.update(normalised(notes))
    with ctx.transaction():
        if fenced:
            lease_fence(ctx)
        event_append(run_uuid=ctx.run.pk, kind=kind, actor="engine", payload=payload)


def lease_held(ctx: Context) -> bool:
    return Run.objects.filter(
        pk=ctx.run.pk, status=RunStatus.RUNNING, lease_owner=ctx.owner
    ).exists()


def check_turn(ctx: Context, final: Step) -> Outcome:
    """Ask the model to check its final answer against the objective. If the budget
    leaves no room for the check, the answer exists: a person reviews it unchecked."""
    messages = [*transcript(ctx), {"role": "user", "content": CHECK_PROMPT}]

    def unchecked(breach: BudgetBreach) -> Outcome:
        return outcome_review(
            ctx, final, None, f"the self-check could not run: {breach.reason}", {}
        )

    answer = model_call(
        ctx, messages, [builtin_spec(CHECK_TOOL)], tool_choice=CHECK_TOOL, on_breach=unchecked
    )
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    call = next((c for c in turn.tool_calls if c.name == CHECK_TOOL), None)
    arguments = call_arguments(call.arguments)[0] if call else None
    report, problem = check_read(arguments)
    with ctx.transaction():
        lease_fence(ctx, add=usage_added(turn, turn_cost), confidence=report["confidence"])
        step_add(
            ctx,
            event="check.reported",
            payload={
                **report,
                "problem": problem,
                "tokens_in": turn.tokens_in,
                "tokens_out": turn.tokens_out,
                **normalised(turn.normalised),
            },
            kind=StepKind.CHECK,
            status=StepStatus.SUCCEEDED,
            content=report["evidence"],
            result=report,
            error=problem,
            tokens_in=turn.tokens_in,
            tokens_out=turn.tokens_out,
            duration_ms=duration_ms,
            finished_at=timezone.now(),
        )
    return Outcome.CONTINUE


def calls_normalise(turn: ModelTurn, steps: list[Step], number: int) -> list[dict]:
    """Give every call an id unique in the run: some servers send none, or repeat them."""
    seen = {call["id"] for step in steps for call in step.tool_calls}
    calls = []
    for position, call in enumerate(turn.tool_calls):
        call_id = call.id
        if not call_id or call_id in seen:
            call_id = f"call_{number}_{position}"
        seen.add(call_id)
        calls.append({"id": call_id, "name": call.name, "arguments": call.arguments})
    return calls


def granted_tools(definition: dict) -> dict[str, Tool]:
    names = tuple(definition["tools"])
    return slice_cached(
        ("tools", names),
        lambda: {tool.name: tool for tool in Tool.objects.filter(name__in=names)},
    )


def tool_spec(tool: Tool) -> dict:
    schema = schema_with_confidence(tool.input_schema or {"type": "object", "properties": {}})
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": schema},
    }


def transcript(ctx: Context) -> list[dict]:
    """The conversation as the model sees it, rebuilt from the run's record."""
    run, definition, steps = ctx.run, ctx.definition, ctx.steps
    system = SYSTEM_PREAMBLE + "\n\n" + PLANNING_NOTE
    if definition["instructions"]:
        system += "\n\nInstructions:\n" + definition["instructions"]
    system += "\n\n" + budget_note(ctx.limits, ctx.usage())
    user = f"Objective: {run.objective}"
    if run.input:
        user += "\n\nInput:\n" + json.dumps(run.input, indent=2, sort_keys=True)
    messages: list[dict] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    answers = {s.tool_call_id: s for s in steps if s.kind in (StepKind.TOOL, StepKind.PLAN)}
    for step in steps:
        if step.kind == StepKind.HUMAN:
            messages.append(
                {
                    "role": "user",
                    "content": "A person reviewed your outcome and did not accept it: "
                    f"{step.content}\nKeep working on the objective.",
                }
            )
        if step.kind != StepKind.MODEL:
            continue
        message: dict[str, Any] = {"role": "assistant", "content": step.content or None}
        if step.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in step.tool_calls
            ]
        messages.append(message)
        for call in step.tool_calls:
            answer = answers.get(call["id"])
            if answer is not None:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": tool_message(answer)}
                )
    return messages


def tool_message(step: Step) -> str:
    """The call's outcome as the model reads it. Keys sorted: PostgreSQL's jsonb keeps
    them in an order of its own, and the transcript rebuilt from the record after a
    restart must read exactly as the one the slice kept in memory."""
    return step_derived(step, "tool_message", lambda: tool_message_made(step))


def tool_message_made(step: Step) -> str:
    if step.status in (StepStatus.SUCCEEDED, StepStatus.SIMULATED):
        return json.dumps(step.result, default=str, sort_keys=True)
    return json.dumps({"error": step.error or f"the call ended {step.status}"})


# Values from the far side ------------------------------------------------------------

# How deep a call's result stands in its event's payload: payload, "result", "value".
OUTCOME_DEPTH = 3
# Step.gate and Approval.gate hold 300 characters (PostgreSQL refuses more).
GATE_CHARS = 300


def normalised(notes: list[str]) -> dict[str, Any]:
    """``{"normalised": notes}`` for a payload or a result, or nothing if none."""
    return {"normalised": list(notes)} if notes else {}


def with_notes(text: str, notes: list[str]) -> str:
    """``text`` with what was changed to store it, so a text field says so too."""
    return f"{text} [normalised: {'; '.join(notes)}]" if notes else text


def text_noted(text: str, *, where: str) -> str:
    """``text`` as both databases store it, ending with a note of any change."""
    stored, notes = text_storable(text, where=where)
    return with_notes(stored, notes)


def clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "…" if it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Tool calls: the four doors, the ledger ----------------------------------------------


@dataclass(frozen=True)
class ParsedCall:
    """A call's arguments as the model sent them, parsed: its own arguments (without
    ``_confidence``), why they cannot be used ("" if they can), and the agent's
    confidence in the call (None if it gave no usable one, and what was wrong)."""

    arguments: Any
    refusal: str = ""
    confidence: float | None = None
    confidence_problem: str = ""


def call_parsed(raw: str) -> ParsedCall:
    try:
        arguments = json_loads_strict(raw or "{}")
    except json.JSONDecodeError as error:
        return ParsedCall(
            raw, f"the arguments are not valid JSON ({error.msg} at position {error.pos})"
        )
    if not isinstance(arguments, dict):
        return ParsedCall(arguments, "the arguments must be a JSON object")
    # Every call is asked for a confidence, the builtins' and ungranted tools' included:
    # it is never an argument of the call itself.
    own, confidence, problem = confidence_split(arguments)
    return ParsedCall(own, "", confidence, problem)


def call_arguments(raw: str) -> tuple[Any, str]:
    """A call's own arguments, and why they cannot be used ("" if they can)."""
    parsed = call_parsed(raw)
    return parsed.arguments, parsed.refusal


def plan_record(ctx: Context, call: dict) -> Outcome:
    """The agent drafted or revised its plan: keep it on the run, as a step."""
    arguments, refusal = call_arguments(call["arguments"])
    if not refusal:
        errors = plan_errors(arguments)
        if errors:
            refusal = "the plan does not match plan_update's schema: " + "; ".join(errors)
    version = (
        sum(1 for s in ctx.steps if s.kind == StepKind.PLAN and s.status == StepStatus.SUCCEEDED)
        + 1
    )
    fields = {
        "kind": StepKind.PLAN,
        "tool_name": PLAN_TOOL,
        "tool_call_id": call["id"],
        "arguments": arguments,
    }
    with ctx.transaction():
        if refusal:
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="plan.refused",
                payload={"error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
            return Outcome.CONTINUE
        plan = arguments["steps"]
        lease_fence(ctx, add={"steps_used": 1}, plan=plan)
        step_add(
            ctx,
            event="plan.drafted" if version == 1 else "plan.revised",
            payload={"version": version, "steps": plan, "reason": arguments.get("reason", "")},
            status=StepStatus.SUCCEEDED,
            content=arguments.get("reason", ""),
            result={"recorded": True, "version": version},
            finished_at=timezone.now(),
            **fields,
        )
    return Outcome.CONTINUE


@dataclass(frozen=True)
class Doors:
    """What the doors say of one requested call, before anything is written."""

    tool: Tool | None
    arguments: Any
    refusal: str
    decision: GateDecision | None
    # The agent's confidence in the call, taken out of its arguments (None: none given).
    confidence: float | None = None

    def step_fields(self, call: dict) -> dict[str, Any]:
        return {
            "kind": StepKind.TOOL,
            "tool": self.tool,
            "tool_name": call["name"][:TOOL_NAME_CHARS],
            "tool_call_id": call["id"],
            "arguments": self.arguments,
            "confidence": self.confidence,
        }

    @property
    def runs_now(self) -> bool:
        return self.decision is not None and self.decision.verdict is Verdict.RUN


def call_doors(ctx: Context, call: dict) -> Doors:
    """Granted, valid JSON, valid against the schema, (rules), and the gate."""
    tools = granted_tools(ctx.definition)
    tool = tools.get(call["name"])
    parsed = call_parsed(call["arguments"])
    arguments, refusal, confidence = parsed.arguments, parsed.refusal, parsed.confidence
    if tool is None:
        granted = ", ".join(sorted(tools)) or "none"
        refusal = f"the tool {call['name']!r} is not granted to this task (granted: {granted})"
    elif not refusal:
        errors = executor_for(tool).validate(tool, arguments)
        if errors:
            refusal = f"{tool.name} refused the arguments: " + "; ".join(errors)
    if refusal or tool is None:
        return Doors(tool, arguments, refusal, None, confidence)
    rules = [
        RuleSpec(number, rule["expression"], rule["effect"], rule.get("description", ""))
        for number, rule in enumerate(ctx.definition.get("rules", {}).get(tool.name, []), 1)
    ]
    verdict = rules_evaluate(rules, arguments)
    if verdict.effect == "deny":
        return Doors(tool, arguments, verdict.reason, None, confidence)
    level, pinned = autonomy_level(ctx), ctx.definition["autonomy_level"]
    decision = gate_decide(
        autonomy_level=level,
        side_effect=tool.side_effect,
        always_approve=tool.always_approve,
        confidence=confidence,
        threshold=confidence_threshold(ctx),
        confidence_problem=parsed.confidence_problem,
    )
    if level < pinned and decision.verdict is not Verdict.RUN:
        decision = replace(
            decision, reason=f"{decision.reason} (the dial was turned down after this run started)"
        )
    if verdict.effect == "approve" and decision.verdict is Verdict.RUN:
        decision = GateDecision(Verdict.HOLD, verdict.reason)
    return Doors(tool, arguments, "", decision, confidence)


def confidence_threshold(ctx: Context) -> float:
    """The confidence a call needs to run by itself at Guarded: the task's threshold, for
    a version made since the gate weighs confidence (an older one runs as it did)."""
    return float(ctx.setting("confidence_threshold")) if ctx.setting("confidence_gate") else 0.0


def autonomy_level(ctx: Context) -> int:
    """The level the gate applies: the one the run started with, or the task's dial now
    if it was turned down since (a step-down after a rejection or an incident reaches a
    run already going at its next slice; turning the dial up never does). A run that
    started making real calls is not switched to simulated ones: turned down to Shadow,
    its calls wait for a person, as at Supervised."""
    live = slice_cached(("autonomy", ctx.run.task_id), lambda: task_autonomy(ctx.run.task_id))
    pinned = ctx.definition["autonomy_level"]
    if live is None:
        return pinned
    return min(pinned, max(live, AutonomyLevel.SUPERVISED))


def task_autonomy(task_id: int) -> int | None:
    return Task.objects.filter(pk=task_id).values_list("autonomy_level", flat=True).first()


def question_ask(ctx: Context, model_step: Step, call: dict) -> Outcome:
    """The agent asks a person: the run waits, and the answer is the call's result."""
    arguments, refusal = call_arguments(call["arguments"])
    if not refusal:
        errors = arguments_errors(ASK_SCHEMA, arguments)
        refusal = (
            "the question does not match ask_person's schema: " + "; ".join(errors)
            if errors
            else ""
        )
    fields = {
        "kind": StepKind.TOOL,
        "tool_name": ASK_TOOL,
        "tool_call_id": call["id"],
        "arguments": arguments,
    }
    with ctx.transaction():
        added = lease_fence(ctx, add={"steps_used": 1})
        if refusal:
            step_add(
                ctx,
                event="tool.refused",
                payload={"tool": ASK_TOOL, "error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
            return Outcome.CONTINUE
        step = step_add(
            ctx,
            event="question.asked",
            payload={"question": arguments["question"]},
            status=StepStatus.PROPOSED,
            gate="the agent asks a person",
            **fields,
        )
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.QUESTION,
            step=step,
            gate=clipped(f"the agent asks: {arguments['question']}", GATE_CHARS),
            reasoning=model_step.content,
            context=budget_context(ctx, added),
        )
        run_wait(ctx.run, "answer the agent's question")
    return Outcome.WAITING


def call_propose(ctx: Context, model_step: Step, call: dict) -> Outcome:
    """Put one requested call through the doors, and act on what they say."""
    stopped = budget_gate(ctx)
    if stopped:
        return stopped
    if call["name"] == PLAN_TOOL:
        return plan_record(ctx, call)
    if call["name"] == ASK_TOOL:
        return question_ask(ctx, model_step, call)
    run, number = ctx.run, ctx.number
    doors = call_doors(ctx, call)
    tool, arguments, refusal, decision = doors.tool, doors.arguments, doors.refusal, doors.decision
    fields = doors.step_fields(call)
    if refusal:
        with ctx.transaction():
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="tool.refused",
                payload={"tool": call["name"], "arguments": arguments, "error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE

    if decision.verdict is Verdict.SIMULATE:
        result = {"simulated": True, "note": "Shadow mode: this call was recorded, not made."}
        with ctx.transaction():
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="tool.simulated",
                payload={"tool": tool.name, "arguments": arguments, "gate": decision.reason},
                status=StepStatus.SIMULATED,
                result=result,
                gate=clipped(decision.reason, GATE_CHARS),
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE
    if decision.verdict is Verdict.HOLD:
        with ctx.transaction():
            added = lease_fence(ctx, add={"steps_used": 1})
            step = step_add(
                ctx,
                event="tool.proposed",
                payload={
                    "tool": tool.name,
                    "arguments": arguments,
                    "confidence": doors.confidence,
                    "gate": decision.reason,
                },
                status=StepStatus.PROPOSED,
                gate=clipped(decision.reason, GATE_CHARS),
                **fields,
            )
            context = budget_context(ctx, added)
            if decision.by_confidence:
                context["threshold"] = confidence_threshold(ctx)
            approval_request(
                run=run,
                kind=ApprovalKind.ACTION,
                step=step,
                gate=clipped(decision.reason, GATE_CHARS),
                reasoning=model_step.content,
                confidence=doors.confidence,
                context=context,
            )
            run_wait(run, f"approve {tool.name}")
        return Outcome.WAITING

    step = steps_commit(ctx, {"steps_used": 1}, [call_start(ctx, call, doors, number)])[0]
    return call_fire(ctx, step, tool)


def call_start(ctx: Context, call: dict, doors: Doors, number: int) -> dict[str, Any]:
    """The ledger entry for ``steps_add``: the step ``number``, to be committed
    ``started`` with its idempotency key before the call fires."""
    key = idempotency_key(ctx.run, number)
    return step_entry(
        event="tool.started",
        payload={
            "tool": doors.tool.name,
            "arguments": doors.arguments,
            "confidence": doors.confidence,
            "idempotency_key": key,
        },
        status=StepStatus.STARTED,
        idempotency_key=key,
        **doors.step_fields(call),
    )


def step_entry(*, event: str, payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """One new step for ``steps_add``: its fields, its event and the event's payload."""
    return {"event": event, "payload": payload, **fields}


def steps_add(ctx: Context, *entries: dict[str, Any]) -> list[Step]:
    """Inside a fenced transaction: new steps, numbered on from the run's last, with
    their events. The slice's record gains them when the transaction commits."""
    steps = steps_create(run=ctx.run, entries=entries_numbered(ctx, entries))
    ctx.on_commit(lambda: ctx.steps_committed(steps))
    return steps


def entries_numbered(ctx: Context, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """New steps' entries, numbered on from the run's last step."""
    return [{**entry, "number": ctx.number + offset} for offset, entry in enumerate(entries)]


def steps_commit(ctx: Context, add: dict[str, Any], entries: list[dict[str, Any]]) -> list[Step]:
    """One commit of its own: the fence, adding ``add`` to the run's counters, and new
    steps with their events. On PostgreSQL, one statement (agentops.runtime.commits);
    where that does not apply or its checks fail, having written nothing, a transaction."""
    added = clock_added(add)
    steps, events = steps_built(run=ctx.run, entries=entries_numbered(ctx, entries))
    if ctx.outside_transaction() and commits.steps_insert_commit(
        run=ctx.run,
        owner=ctx.owner,
        lease_expires_at=lease_deadline(),
        added=added,
        steps=steps,
        events=events,
    ):
        ctx.run_changed(added, {})
        ctx.steps_committed(steps)
        return steps
    with ctx.transaction():
        lease_fence(ctx, add=added)
        return steps_add(ctx, *entries)


def step_add(ctx: Context, **entry: Any) -> Step:
    return steps_add(ctx, step_entry(**entry))[0]


def budget_context(ctx: Context, added: dict[str, Any]) -> dict[str, Any]:
    """Budget used and limits, for a person deciding on the run: as this transaction
    leaves them, with ``added`` (what its fence adds, which reaches ``ctx.run`` only once
    it commits)."""
    limits, usage = ctx.limits, ctx.usage()
    used = {
        "steps": usage.steps + added.get("steps_used", 0),
        "tokens": usage.tokens + added.get("tokens_in", 0) + added.get("tokens_out", 0),
        "seconds": usage.seconds + added.get("seconds_used", 0.0),
        "spend": usage.spend + added.get("spend", 0),
    }
    return {
        "budgets": {
            budget: {"limit": str(limits.get(budget)), "used": str(used[budget])}
            for budget in used
            if limits.get(budget) is not None
        }
    }


def step_move(ctx: Context, step: Step, **transition: Any) -> None:
    """One fenced transaction that moves one step (``step_transition``'s arguments)."""
    with ctx.transaction():
        lease_fence(ctx)
        step_transition(step=step, **transition)


def idempotency_key(run: Run, number: int) -> str:
    return f"{run.pk}:{number}"


def call_after_gate(ctx: Context, step: Step) -> Outcome:
    """A held call whose approval was decided: fire exactly what was approved, or
    return the person's reason to the model."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status == ApprovalStatus.PENDING:
        # Still pending (a stale queue message woke the run): back to waiting.
        with ctx.transaction():
            lease_fence(ctx)
            run_wait(ctx.run, f"approve {step.tool_name}")
        return Outcome.WAITING
    if approval.status == ApprovalStatus.APPROVED and approval.kind == ApprovalKind.QUESTION:
        who = approval.decided_by.get_username() if approval.decided_by else "a person"
        answer = {"answer": approval.decision_reason, "answered_by": who}
        step_move(
            ctx,
            step,
            to=StepStatus.SUCCEEDED,
            event="question.answered",
            payload={"answer": approval.decision_reason, "approval": approval.pk},
            result=answer,
            finished_at=timezone.now(),
        )
        return Outcome.CONTINUE
    if approval.status == ApprovalStatus.APPROVED:
        if approval.call_digest != call_digest(step.tool_name, step.arguments):
            refusal = "the approval does not match this exact call; it was not made"
        else:
            return call_fire_approved(
                ctx, step, approval, key=idempotency_key(ctx.run, step.number)
            )
    elif approval.status == ApprovalStatus.EXPIRED:
        refusal = f"the approval expired ({approval.decision_reason}); the call was not made"
    else:
        who = approval.decided_by.get_username() if approval.decided_by else "the system"
        refusal = f"{who} {approval.status} this call" + (
            f": {approval.decision_reason}" if approval.decision_reason else ""
        )
    step_move(
        ctx,
        step=step,
        to=StepStatus.REFUSED,
        event="tool.refused",
        payload={"tool": step.tool_name, "error": refusal, "approval": approval.pk},
        error=refusal,
        finished_at=timezone.now(),
    )
    return Outcome.CONTINUE


def call_recover(ctx: Context, step: Step) -> Outcome:
    """A call committed ``started`` by a worker that stopped before its outcome was
    recorded. It may or may not have taken effect."""
    if step.tool is not None and step.tool.idempotent:
        with ctx.transaction():
            lease_fence(ctx)
            event_append(
                run_uuid=ctx.run.pk,
                kind="tool.retried",
                actor="engine",
                payload={
                    "step": step.number,
                    "tool": step.tool_name,
                    "idempotency_key": step.idempotency_key,
                    "reason": "interrupted before its outcome was recorded; the tool is idempotent",
                },
            )
        return call_fire(ctx, step, step.tool)
    reason = (
        f"step #{step.number} ({step.tool_name}) was interrupted after it was started; "
        "the tool is not idempotent, so it was not called again: did it take effect?"
    )
    with ctx.transaction():
        added = lease_fence(ctx)
        step_transition(
            step=step,
            to=StepStatus.UNKNOWN,
            event="tool.unknown",
            payload={"tool": step.tool_name, "idempotency_key": step.idempotency_key},
            error=reason,
        )
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.UNKNOWN_OUTCOME,
            step=step,
            gate=reason,
            context=budget_context(ctx, added),
        )
        run_wait(ctx.run, f"the outcome of {step.tool_name} is unknown")
    return Outcome.WAITING


def run_wait(run: Run, why: str) -> None:
    """Inside a step's transaction: the run waits for a person and gives up its lease."""
    run_transition(
        run=run,
        to=RunStatus.WAITING,
        actor="engine",
        reason=f"waiting for a person: {why}",
        lease_owner="",
        lease_expires_at=None,
    )


def call_fire_approved(
    ctx: Context, step: Step, approval: Any, *, key: str, why: str = ""
) -> Outcome:
    """A person's decision lets this exact call go: commit it started, then make it."""
    payload = {
        "tool": step.tool_name,
        "arguments": step.arguments,
        "confidence": step.confidence,
        "idempotency_key": key,
        "approval": approval.pk,
        **({"why": why} if why else {}),
    }
    step_move(
        ctx, step, to=StepStatus.STARTED, event="tool.started", payload=payload, idempotency_key=key
    )
    return call_fire(ctx, step, step.tool)


def call_after_unknown(ctx: Context, step: Step) -> Outcome:
    """A person said what became of an interrupted call: record it, or make the call."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status != ApprovalStatus.APPROVED:
        # Still pending (a stale queue message woke the run): back to waiting.
        with ctx.transaction():
            lease_fence(ctx)
            run_wait(ctx.run, f"the outcome of {step.tool_name} is unknown")
        return Outcome.WAITING
    who = approval.decided_by.get_username() if approval.decided_by else "a person"
    if approval.resolution == Resolution.REFIRE:
        return call_fire_approved(
            ctx,
            step,
            approval,
            key=step.idempotency_key,
            why=f"{who} said the interrupted call did not happen",
        )
    result = approval.resolution_result
    if result is None:
        result = {"note": f"{who} confirmed the call took effect; its result is not known"}
    step_move(
        ctx,
        step=step,
        to=StepStatus.SUCCEEDED,
        event="tool.succeeded",
        payload={"tool": step.tool_name, "result": result, "approval": approval.pk},
        result=result,
        finished_at=timezone.now(),
    )
    return Outcome.CONTINUE


def call_fire(ctx: Context, step: Step, tool: Tool) -> Outcome:
    """Make the call of a step already committed ``started``, then record its outcome.

    A transient failure (one the tool reports as safe to try again) is retried with
    backoff under the tool's retry policy, with the same idempotency key. The lease is
    renewed while the call runs. The outcome is recorded even if the run was cancelled or
    taken over meanwhile: the call happened, and the trail must say so."""
    context = ToolContext(
        run_id=ctx.run.pk, step_number=step.number, idempotency_key=step.idempotency_key
    )
    started = time.monotonic()
    result, attempt = call_attempts(ctx, step, tool, context)
    duration_ms = int((time.monotonic() - started) * 1000)
    # The call happened: its outcome is recorded whatever it holds. What no database
    # stores (NaN, NUL, a lone surrogate, nesting past MAX_DEPTH...) is changed, and the
    # record says how: the result becomes {"value": ..., "normalised": [...]}, an error
    # ends with the notes. Normalised first, so redaction walks a bounded value.
    if result.ok:
        # Counted from where the value stands in the event's payload ({"result":
        # {"value": ...}}), so the event's copy is cut nowhere the step's is not.
        value, notes = json_storable(result.value, depth=OUTCOME_DEPTH)
        if notes:
            value = {"value": value, "normalised": notes}
        result = ToolResult(ok=True, value=value)
    else:
        error, notes = text_storable(str(result.error or ""), where="error")
        if attempt > 1:
            error = f"{error} (tried {attempt} times)"
        result = ToolResult(ok=False, error=with_notes(error, notes))
    # Whatever the far side echoed of a credential stays out of the record and the model
    # (the notes name keys, which may hold it too).
    secrets = config_secrets(tool.config)
    result = ToolResult(
        ok=result.ok, value=redact(result.value, secrets), error=redact(result.error, secrets)
    )
    call_outcome_record(ctx, step, tool, result, duration_ms, notes=redact(notes, secrets))
    return Outcome.CONTINUE


def call_attempts(
    ctx: Context, step: Step, tool: Tool, context: ToolContext
) -> tuple[ToolResult, int]:
    """Make the call, retrying transient failures with backoff under the tool's policy."""
    for attempt in range(1, tool.retry_max_attempts + 1):
        try:
            result: ToolResult = executor_for(tool).execute(tool, step.arguments, context)
        except Exception as error:  # an executor's bug: the call may have gone out
            logger.exception("run %s: the %s executor raised", ctx.run.pk, tool.kind)
            result = ToolResult(
                ok=False,
                error=f"the {tool.kind} tool failed unexpectedly ({type(error).__name__}: "
                f"{error}); it may have taken effect",
            )
        if result.ok or not result.transient or attempt == tool.retry_max_attempts:
            break
        if not lease_held(ctx):
            break  # the run was cancelled or taken over: record what happened, stop
        delay = backoff(tool.retry_backoff_seconds, attempt)
        retry_note(
            ctx,
            "tool.retrying",
            fenced=False,
            step=step.number,
            tool=tool.name,
            attempt=attempt,
            error=redact(result.error, config_secrets(tool.config)),
            delay=delay,
        )
        time.sleep(delay)
    return result, attempt


def call_outcome_record(
    ctx: Context,
    step: Step,
    tool: Tool,
    result: ToolResult,
    duration_ms: int,
    *,
    notes: list[str] = (),
) -> None:
    """Record a call's outcome on its ``started`` step: first as one statement
    (agentops.runtime.commits), else in a transaction that records it even if this
    worker lost the run meanwhile (the call happened), and then stops the slice with
    ``LeaseLost``. If another worker took the run over and marked the step ``unknown``
    (this worker looked dead), the late outcome settles it: the person's pending
    question is withdrawn and the run goes on.

    The call has happened, so its outcome outlives a database restart: a write that
    meets a broken connection is tried again on a fresh one (``reconnecting``)."""
    status, event = (
        (StepStatus.SUCCEEDED, "tool.succeeded")
        if result.ok
        else (StepStatus.FAILED, "tool.failed")
    )
    payload: dict[str, Any] = {"tool": tool.name, "duration_ms": duration_ms}
    payload.update({"result": result.value} if result.ok else {"error": result.error})
    payload.update(normalised(notes))
    fields: dict[str, Any] = {"duration_ms": duration_ms, "finished_at": timezone.now()}
    fields.update({"result": result.value} if result.ok else {"error": result.error})
    added = clock_added()
    if not ctx.outside_transaction():  # part of a caller's transaction: theirs to retry
        call_outcome_write(ctx, step, status, event, payload, fields, added)
        return

    def recorded_already() -> bool | None:
        # ``finished_at`` is this outcome's own: a step that has it was written by the
        # try whose reply was lost. The record in memory is read again before going on.
        if not Step.objects.filter(
            pk=step.pk, status=status, finished_at=fields["finished_at"]
        ).exists():
            return None
        step_moved(step, status, fields)
        ctx.stale = True
        return True

    reconnecting(
        lambda: call_outcome_write(ctx, step, status, event, payload, fields, added),
        what=f"recording step #{step.number}'s outcome",
        run_id=ctx.run.pk,
        done=recorded_already,
    )


def call_outcome_write(
    ctx: Context,
    step: Step,
    status: str,
    event: str,
    payload: dict[str, Any],
    fields: dict[str, Any],
    added: dict[str, Any],
) -> bool:
    """``call_outcome_record``'s writes, once. Returns True (for ``reconnecting``)."""
    if ctx.outside_transaction() and commits.outcome_commit(
        run=ctx.run,
        owner=ctx.owner,
        lease_expires_at=lease_deadline(),
        added=added,
        step=step,
        to=status,
        fields=fields,
        event=(event, "engine", {"step": step.number, **payload}),
    ):
        # The common case in one statement: this worker holds the run, the step is still
        # ``started``. Otherwise nothing was written and the transaction below decides.
        step_moved(step, status, fields)
        ctx.run_changed(added, {})
        return True
    with ctx.transaction():
        # Renew the lease if this worker still holds the run; record the outcome regardless.
        added = clock_added(added)
        held = Run.objects.filter(
            pk=ctx.run.pk, status=RunStatus.RUNNING, lease_owner=ctx.owner
        ).update(lease_expires_at=lease_deadline(), **increments(added))
        # The common case: the step is still ``started``, as this worker left it.
        recorded = step_transition_if_unchanged(
            step=step, to=status, event=event, payload=payload, **fields
        )
        if not recorded:
            call_outcome_settle(ctx, step, status, event, payload, fields)
        if held:
            ctx.on_commit(lambda: ctx.run_changed(added, {}))
    if not recorded:
        ctx.stale = True  # someone else wrote the step: read the record again
    if not held:
        raise LeaseLost(f"run {ctx.run.pk} is no longer held by {ctx.owner}")
    return True


def call_outcome_settle(
    ctx: Context,
    step: Step,
    status: str,
    event: str,
    payload: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    """Inside ``call_outcome_record``'s transaction, for a step that is no longer
    ``started``: someone else settled it, or marked it ``unknown`` while this worker
    looked dead."""
    current = Step.objects.select_for_update().get(pk=step.pk)
    if current.status != StepStatus.UNKNOWN:
        # Settled by someone else already (a person, or a retry): keep this answer in
        # the trail beside theirs, change nothing.
        event_append(
            run_uuid=ctx.run.pk,
            kind="tool.late_outcome",
            actor="engine",
            payload={"step": step.number, "status_now": current.status, **payload},
        )
        return
    step_transition(
        step=current, to=status, event=event, payload={**payload, "late": True}, **fields
    )
    run = Run.objects.select_for_update().get(pk=ctx.run.pk)
    approvals_withdraw(
        run=run,
        step=current,
        actor="engine",
        reason="the interrupted call's outcome arrived: it is recorded on the step",
    )
    if run.status == RunStatus.WAITING:
        run_transition(run=run, to=RunStatus.QUEUED, actor="engine", reason="")
        from agentops.runtime import dispatch

        dispatch.enqueue(run.pk)


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
