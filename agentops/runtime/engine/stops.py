"""How a slice stops: back to the queue (``run_yield``), waiting for a person
(``run_wait``), or ended (``run_end``), each in one fenced commit."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.db import transaction

from agentops import telemetry
from agentops.runtime import dispatch
from agentops.runtime.engine.context import Context, Outcome, text_noted
from agentops.runtime.engine.leases import fence, lease_fence
from approvals.models import ApprovalKind
from approvals.services import approval_request
from tasks.models import (
    Run,
    RunStatus,
    Step,
)
from tasks.services import (
    run_transition,
)

logger = logging.getLogger("agentops.engine")


def run_yield(ctx: Context) -> Outcome:
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


def run_wait(run: Run, why: str) -> None:
    """Inside a step's transaction: the run waits for a person and gives up its lease."""
    telemetry.run_waits(why)
    run_transition(
        run=run,
        to=RunStatus.WAITING,
        actor="engine",
        reason=f"waiting for a person: {why}",
        lease_owner="",
        lease_expires_at=None,
    )
