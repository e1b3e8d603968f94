"""Writes for approvals: opening one (the engine, when a gate holds a call) and deciding
one (a person). A decision is recorded with its lineage event and hands the run back to
the queue in the same transaction."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from agentops import states
from agentops.runtime import dispatch
from agentops.runtime.gates import call_digest
from approvals.models import Approval, ApprovalKind, ApprovalStatus, Resolution
from lineage.services import event_append
from tasks.models import Run, RunStatus, Step
from tasks.services import actor_for, run_transition


class DecisionError(Exception):
    """The decision cannot be taken; the message says why. Nothing was written."""


def approval_request_action(*, run: Run, step: Step, gate: str, reasoning: str) -> Approval:
    """Open an approval for a held tool call. Runs inside the engine's step transaction."""
    approval = Approval.objects.create(
        run=run,
        step=step,
        kind=ApprovalKind.ACTION,
        tool_name=step.tool_name,
        arguments=step.arguments,
        call_digest=call_digest(step.tool_name, step.arguments),
        side_effect=step.tool.side_effect if step.tool else "",
        gate=gate,
        reasoning=reasoning,
    )
    event_append(
        run_uuid=run.pk,
        kind="approval.requested",
        actor="engine",
        payload={
            "approval": approval.pk,
            "kind": approval.kind,
            "step": step.number,
            "tool": step.tool_name,
            "arguments": step.arguments,
            "call_digest": approval.call_digest,
            "gate": gate,
        },
    )
    return approval


def approval_request_unknown(*, run: Run, step: Step, reason: str) -> Approval:
    """Ask a person what became of an interrupted call. Runs in the engine's transaction."""
    approval = Approval.objects.create(
        run=run,
        step=step,
        kind=ApprovalKind.UNKNOWN_OUTCOME,
        tool_name=step.tool_name,
        arguments=step.arguments,
        call_digest=call_digest(step.tool_name, step.arguments),
        side_effect=step.tool.side_effect if step.tool else "",
        gate=reason,
    )
    event_append(
        run_uuid=run.pk,
        kind="approval.requested",
        actor="engine",
        payload={
            "approval": approval.pk,
            "kind": approval.kind,
            "step": step.number,
            "tool": step.tool_name,
            "idempotency_key": step.idempotency_key,
            "gate": reason,
        },
    )
    return approval


def approval_decide(
    *,
    approval: Approval,
    user: AbstractBaseUser,
    approve: bool,
    reason: str = "",
    resolution: str = "",
    result: object = None,
) -> Approval:
    """Decide a pending approval and hand its run back to the queue.

    An action is approved (the engine fires exactly that call) or rejected with a reason
    (returned to the agent). An unknown outcome is resolved: ``happened`` (with the
    result if known) or ``refire`` approve it; rejecting it stops the run."""
    reason = reason.strip()
    unknown = approval.kind == ApprovalKind.UNKNOWN_OUTCOME
    if not approve and not reason:
        raise DecisionError(
            "say why you stop the run: the reason is kept in its trail"
            if unknown
            else "say why you reject the call: the agent reads the reason to re-plan"
        )
    if unknown and approve and resolution not in (Resolution.HAPPENED, Resolution.REFIRE):
        raise DecisionError("say whether the call happened or should be made")
    if not unknown and resolution:
        raise DecisionError("only an unknown outcome takes a resolution")
    if not user.has_perm("approvals.decide_approval"):
        raise DecisionError("you do not hold the permission to decide approvals")
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=approval.run_id)
        approval = Approval.objects.select_for_update().get(pk=approval.pk)
        if approval.status != ApprovalStatus.PENDING:
            who = approval.decided_by.get_username() if approval.decided_by else "the system"
            raise DecisionError(
                f"this approval was already {approval.status} by {who}"
                + (
                    f" at {approval.decided_at:%Y-%m-%d %H:%M:%S} UTC"
                    if approval.decided_at
                    else ""
                )
            )
        if run.status != RunStatus.WAITING:
            raise DecisionError(f"the run is {run.status}, so it no longer waits for this decision")
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
        states.APPROVAL.check(approval.status, status)
        approval.status = status
        approval.decided_by = user
        approval.decided_at = timezone.now()
        approval.decision_reason = reason
        if unknown:
            approval.resolution = resolution if approve else Resolution.STOP
            approval.resolution_result = result if approve else None
        approval.save(
            update_fields=[
                "status",
                "decided_by",
                "decided_at",
                "decision_reason",
                "resolution",
                "resolution_result",
            ]
        )
        actor = actor_for(user)
        event_append(
            run_uuid=run.pk,
            kind=f"approval.{status}",
            actor=actor,
            payload={
                "approval": approval.pk,
                "kind": approval.kind,
                "step": approval.step.number if approval.step else None,
                "tool": approval.tool_name,
                "call_digest": approval.call_digest,
                "reason": reason,
                **({"resolution": approval.resolution, "result": result} if unknown else {}),
            },
        )
        if unknown and not approve:
            run_transition(
                run=run,
                to=RunStatus.HALTED,
                actor=actor,
                reason=f"stopped by {user.get_username()}: {reason}",
            )
            return approval
        run_transition(run=run, to=RunStatus.QUEUED, actor=actor, reason="")
        dispatch.enqueue(run.pk)
    return approval


def approvals_cancel_for_run(*, run: Run, actor: str) -> int:
    """Close the run's pending approvals when the run ends without them."""
    pending = list(Approval.objects.filter(run=run, status=ApprovalStatus.PENDING))
    for approval in pending:
        states.APPROVAL.check(approval.status, ApprovalStatus.CANCELLED)
        approval.status = ApprovalStatus.CANCELLED
        approval.decided_at = timezone.now()
        approval.save(update_fields=["status", "decided_at"])
        event_append(
            run_uuid=run.pk,
            kind="approval.cancelled",
            actor=actor,
            payload={"approval": approval.pk, "reason": f"the run ended ({run.status})"},
        )
    return len(pending)
