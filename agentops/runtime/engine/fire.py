"""Making a call already committed ``started``, and recording its outcome: retries with
the same idempotency key, values made storable and redacted, the outcome recorded even
if the lease moved (the call happened), across a database restart."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from django.utils import timezone

from agentops import telemetry
from agentops.runtime import commits, dispatch
from agentops.runtime.engine import waits
from agentops.runtime.engine.context import (
    OUTCOME_DEPTH,
    Context,
    LeaseLost,
    Outcome,
    clock_added,
    increments,
    normalised,
    with_notes,
)
from agentops.runtime.engine.leases import lease_deadline, lease_held, reconnecting
from agentops.runtime.engine.ledger import retry_note
from agentops.runtime.secrets import config_secrets, redact
from agentops.runtime.tools import ToolContext, ToolResult, executor_for
from agentops.strict_json import json_storable, text_storable
from approvals.services import approvals_withdraw
from lineage.services import event_append
from tasks.models import (
    Run,
    RunStatus,
    Step,
    StepStatus,
    Tool,
)
from tasks.services import (
    run_transition,
    step_moved,
    step_transition,
    step_transition_if_unchanged,
)

logger = logging.getLogger("agentops.engine")


def backoff(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: base, 2 x base, 4 x base..., each from half to
    the whole of it, so retrying workers spread out. Capped at 30 seconds."""
    ceiling = min(30.0, base * 2 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


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
            result = telemetry.tool_traced(
                step,
                tool,
                lambda: waits.tool_execute(executor_for(tool), tool, step.arguments, context),
            )
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
        waits.pause(delay)
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
        dispatch.enqueue(run.pk)
