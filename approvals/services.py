"""Writes for approvals: opening one (the engine, when it needs a person) and deciding
one (a person). A decision is recorded with its lineage event, and its consequence for
the run (queued again, halted, or finished) in the same transaction."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from agentops import states
from agentops.runtime import dispatch
from agentops.runtime.budgets import extra_add
from agentops.runtime.gates import call_digest
from approvals.models import Approval, ApprovalKind, ApprovalStatus, Resolution
from lineage.services import event_append
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus
from tasks.services import actor_for, run_transition, step_create

# What rejecting means, by kind: the agent re-plans (the run goes on) or the run halts.
REJECTION_CONTINUES = {ApprovalKind.ACTION, ApprovalKind.OUTCOME_REVIEW}


class DecisionError(Exception):
    """The decision cannot be taken; the message says why. Nothing was written."""


def approval_request(
    *,
    run: Run,
    kind: str,
    gate: str,
    step: Step | None = None,
    reasoning: str = "",
    confidence: float | None = None,
    context: dict[str, Any] | None = None,
) -> Approval:
    """Open an approval. Runs inside the engine's step transaction, which also puts the
    run to waiting."""
    approval = Approval.objects.create(
        run=run,
        step=step,
        kind=kind,
        tool_name=step.tool_name if step else "",
        arguments=step.arguments if step else None,
        call_digest=call_digest(step.tool_name, step.arguments) if step and step.tool_name else "",
        side_effect=step.tool.side_effect if step and step.tool else "",
        gate=gate,
        reasoning=reasoning,
        confidence=confidence,
        context=context or {},
    )
    event_append(
        run_uuid=run.pk,
        kind="approval.requested",
        actor="engine",
        payload={
            "approval": approval.pk,
            "kind": kind,
            "step": step.number if step else None,
            "tool": approval.tool_name,
            "arguments": approval.arguments,
            "call_digest": approval.call_digest,
            "gate": gate,
            "confidence": confidence,
            "context": approval.context,
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
    """Decide a pending approval.

    - an action: approved, the engine fires exactly that call; rejected, the reason goes
      back to the agent, which re-plans;
    - an unknown outcome: resolved as ``happened`` (with the result if known) or
      ``refire``; rejected, the run halts;
    - a budget extension: approved, the run's budget grows by the proposed amount;
    - a possible loop: approved, the run goes on past it;
    - an outcome review: approved, the run succeeds with that outcome; rejected, the
      reason goes back to the agent, which keeps working.
    Rejecting always needs a reason."""
    reason = reason.strip()
    unknown = approval.kind == ApprovalKind.UNKNOWN_OUTCOME
    if not approve and not reason:
        if approval.kind in REJECTION_CONTINUES:
            raise DecisionError("say why you reject it: the agent reads the reason to re-plan")
        raise DecisionError("say why you stop the run: the reason is kept in its trail")
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
            when = f" at {approval.decided_at:%Y-%m-%d %H:%M:%S} UTC" if approval.decided_at else ""
            raise DecisionError(f"this approval was already {approval.status} by {who}{when}")
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
        decision_apply(run=run, approval=approval, actor=actor, user=user)
    return approval


def decision_apply(*, run: Run, approval: Approval, actor: str, user: AbstractBaseUser) -> None:
    """What the decision does to the run (inside the decision's transaction)."""
    approved = approval.status == ApprovalStatus.APPROVED
    kind = approval.kind
    if not approved and kind not in REJECTION_CONTINUES:
        run_transition(
            run=run,
            to=RunStatus.HALTED,
            actor=actor,
            reason=f"stopped by {user.get_username()}: {approval.decision_reason}",
        )
        return
    if approved and kind == ApprovalKind.OUTCOME_REVIEW:
        run_transition(
            run=run,
            to=RunStatus.SUCCEEDED,
            actor=actor,
            reason="",
            outcome=approval.context.get("outcome", ""),
            payload={"outcome": approval.context.get("outcome", ""), "reviewed_by": actor},
        )
        return
    fields: dict[str, Any] = {}
    if approved and kind == ApprovalKind.BUDGET_EXTENSION:
        fields["budget_extra"] = extra_add(run.budget_extra, approval.context["extension"])
    if approved and kind == ApprovalKind.LOOP_REVIEW:
        fields["loops_accepted_through"] = approval.context["through_step"]
    if not approved and kind == ApprovalKind.OUTCOME_REVIEW:
        # The person's words join the conversation; the agent keeps working.
        number = (Step.objects.filter(run=run).aggregate(n=Max("number"))["n"] or 0) + 1
        step_create(
            run=run,
            number=number,
            event="human.feedback",
            payload={"approval": approval.pk, "content": approval.decision_reason},
            actor=actor,
            kind=StepKind.HUMAN,
            status=StepStatus.SUCCEEDED,
            content=approval.decision_reason,
            finished_at=timezone.now(),
        )
    run_transition(run=run, to=RunStatus.QUEUED, actor=actor, reason="", **fields)
    dispatch.enqueue(run.pk)


def approvals_cancel_for_run(*, run: Run, actor: str) -> int:
    """Close the run's pending approvals when the run ends without them."""
    return approvals_withdraw(run=run, actor=actor, reason=f"the run ended ({run.status})")


def approvals_withdraw(*, run: Run, actor: str, reason: str, step: Step | None = None) -> int:
    """Cancel pending approvals of the run (of one step, if given): the question is moot."""
    pending = Approval.objects.filter(run=run, status=ApprovalStatus.PENDING)
    if step is not None:
        pending = pending.filter(step=step)
    withdrawn = list(pending)
    for approval in withdrawn:
        states.APPROVAL.check(approval.status, ApprovalStatus.CANCELLED)
        approval.status = ApprovalStatus.CANCELLED
        approval.decided_at = timezone.now()
        approval.decision_reason = reason
        approval.save(update_fields=["status", "decided_at", "decision_reason"])
        event_append(
            run_uuid=run.pk,
            kind="approval.cancelled",
            actor=actor,
            payload={"approval": approval.pk, "reason": reason},
        )
    return len(withdrawn)
