"""Writes for approvals: opening one (the engine, when it needs a person) and deciding
one (a person). A decision is recorded with its lineage event, and its consequence for
the run (queued again, halted, or finished) in the same transaction."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, Group, Permission
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Max, Q, QuerySet
from django.utils import timezone

from agentops import background, states
from agentops.runtime import dispatch
from agentops.runtime.budgets import extra_add
from agentops.runtime.gates import call_digest
from approvals.models import Approval, ApprovalKind, ApprovalStatus, Resolution
from approvals.selectors import four_eyes_barred
from lineage.services import event_append
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus, Task
from tasks.services import actor_for, run_transition, step_create

logger = logging.getLogger("agentops.approvals")

# What rejecting means, by kind: the agent re-plans (the run goes on) or the run halts.
REJECTION_CONTINUES = {ApprovalKind.ACTION, ApprovalKind.OUTCOME_REVIEW, ApprovalKind.QUESTION}


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
    """Open an approval, routed to the task's approver group with the task's deadline.
    Runs inside the engine's step transaction, which also puts the run to waiting; the
    group is told by email once that transaction commits."""
    task = Task.objects.only("approver_group_id", "approval_timeout_minutes").get(pk=run.task_id)
    context = {**(context or {}), "recent_steps": recent_steps(run)}
    approval = Approval.objects.create(
        run=run,
        step=step,
        kind=kind,
        group_id=task.approver_group_id,
        expires_at=timezone.now() + timedelta(minutes=task.approval_timeout_minutes),
        tool_name=step.tool_name if step else "",
        arguments=step.arguments if step else None,
        call_digest=call_digest(step.tool_name, step.arguments) if step and step.tool_name else "",
        side_effect=step.tool.side_effect if step and step.tool else "",
        gate=gate,
        reasoning=reasoning,
        confidence=confidence,
        context=context,
    )
    approval_id = approval.pk
    transaction.on_commit(lambda: background.soon(lambda: approval_notify(approval_id)))
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


RECENT_STEPS = 6


def recent_steps(run: Run) -> list[dict[str, Any]]:
    """The run's last steps, as a person deciding needs them: what the agent did so far."""
    steps = Step.objects.filter(run=run).order_by("-number")[:RECENT_STEPS]
    summary = []
    for step in reversed(list(steps)):
        what = step.tool_name or (step.content[:160] if step.content else "")
        summary.append(
            {"number": step.number, "kind": step.kind, "status": step.status, "what": what}
        )
    return summary


def approval_decide(
    *,
    approval: Approval,
    user: AbstractBaseUser,
    approve: bool,
    reason: str = "",
    resolution: str = "",
    result: object = None,
    arguments: dict | None = None,
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
    if approval.kind == ApprovalKind.QUESTION and approve and not reason:
        raise DecisionError("write your answer: the agent reads it")
    if unknown and approve and resolution not in (Resolution.HAPPENED, Resolution.REFIRE):
        raise DecisionError("say whether the call happened or should be made")
    if not unknown and resolution:
        raise DecisionError("only an unknown outcome takes a resolution")
    if arguments is not None and approval.kind != ApprovalKind.ACTION:
        raise DecisionError("only an action's arguments can be edited")
    if arguments is not None and not approve:
        raise DecisionError("edited arguments go with an approval, not a rejection")
    with transaction.atomic():
        run = Run.objects.select_for_update().select_related("task").get(pk=approval.run_id)
        approval = Approval.objects.select_for_update().get(pk=approval.pk)
        refusal = decider_refusal(user, approval)
        if refusal:
            raise DecisionError(refusal)
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
        edits = arguments_edit(approval, arguments) if arguments is not None else {}
        approval.save(
            update_fields=[
                "status",
                "decided_by",
                "decided_at",
                "decision_reason",
                "resolution",
                "resolution_result",
                "edited_arguments",
                "call_digest",
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
                **edits,
            },
        )
        decision_apply(run=run, approval=approval, actor=actor, user=user)
    return approval


def approval_reassign(
    *, approval: Approval, user: AbstractBaseUser, group: Group, reason: str
) -> Approval:
    """Hand a pending approval to another group, as someone who may decide it: the new
    group sees it, is emailed, and is reminded before the deadline, which does not move.
    The change and its reason are kept on the approval and in the run's trail."""
    reason = reason.strip()
    if not reason:
        raise DecisionError("say why you reassign it: the other group reads the reason")
    with transaction.atomic():
        run = Run.objects.select_for_update().select_related("task").get(pk=approval.run_id)
        approval = Approval.objects.select_for_update().get(pk=approval.pk)
        refusal = decider_refusal(user, approval)
        if refusal:
            raise DecisionError(refusal)
        if approval.status != ApprovalStatus.PENDING:
            raise DecisionError(f"this approval was already {approval.status}")
        if run.status != RunStatus.WAITING:
            raise DecisionError(f"the run is {run.status}, so it no longer waits for this decision")
        if approval.group_id == group.pk:
            raise DecisionError(f"this approval is already routed to {group}")
        barred = run.started_by_id if run.task.four_eyes else None
        if not deciders_in(group, excluding=barred).exists():
            who = "nobody but the run's starter" if barred else "nobody"
            raise DecisionError(
                f"{who} in {group} may decide approvals, so it would wait there unseen"
            )
        from_group = str(approval.group) if approval.group else ""
        actor = actor_for(user)
        approval.context = {
            **approval.context,
            "reassigned": [
                *approval.context.get("reassigned", []),
                {
                    "by": user.get_username(),
                    "from": from_group,
                    "to": str(group),
                    "reason": reason,
                    "at": timezone.now().isoformat(),
                },
            ],
        }
        approval.group = group
        # The new group is reminded in its turn; late in the window, the notice it gets
        # now is its reminder.
        now = timezone.now()
        approval.reminded_at = now if reminder_due(approval, now) else None
        approval.save(update_fields=["group", "reminded_at", "context"])
        event_append(
            run_uuid=run.pk,
            kind="approval.reassigned",
            actor=actor,
            payload={
                "approval": approval.pk,
                "from_group": from_group,
                "to_group": str(group),
                "reason": reason,
            },
        )
        approval_id = approval.pk
        transaction.on_commit(
            lambda: background.soon(lambda: approval_notify(approval_id, notice=REASSIGNED))
        )
    return approval


def deciding(prefix: str = "") -> Q:
    """Users, or with ``prefix`` ("user__") the groups of users, who may decide
    approvals: active, and superusers or holding the permission, themselves or through
    a group."""
    permission = Permission.objects.filter(
        codename="decide_approval", content_type__app_label="approvals"
    )
    return Q(**{f"{prefix}is_active": True}) & (
        Q(**{f"{prefix}is_superuser": True})
        | Q(**{f"{prefix}user_permissions__in": permission})
        | Q(**{f"{prefix}groups__permissions__in": permission})
    )


def deciders_in(group: Group, *, excluding: int | None = None) -> QuerySet:
    """The members of ``group`` who may decide approvals, but the user ``excluding``."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects.filter(deciding(), groups=group)
    if excluding is not None:
        users = users.exclude(pk=excluding)
    return users.distinct()


def groups_deciding() -> QuerySet[Group]:
    """The groups an approval can be handed to: those with someone who may decide it."""
    return Group.objects.filter(deciding("user__")).distinct().order_by("name")


OPENED, REMINDER, ESCALATED, REASSIGNED = "opened", "reminder", "escalated", "reassigned"


def approval_notify(approval_id: int, *, notice: str = OPENED) -> int:
    """Email the approval's group that something waits for them: it opened, it expires
    soon (a reminder), or it was escalated or reassigned to them. When it opened, also
    POST it to the approvals webhook if one is set. A failure is logged, never raised:
    the approval stands in the inbox either way."""
    approval = Approval.objects.select_related("run__task", "group").get(pk=approval_id)
    reminder = notice == REMINDER
    if notice == OPENED:
        approval_webhook_post(approval)
    if approval.group is None:
        return 0
    recipients = sorted(
        email for email in approval.group.user_set.values_list("email", flat=True) if email
    )
    if not recipients:
        return 0
    subject = f"[agentops] {approval.get_kind_display()}: {approval.run.task.name}"
    if approval.tool_name:
        subject += f" wants to call {approval.tool_name}"
    if reminder:
        subject = "[agentops] Reminder, expires soon: " + subject.removeprefix("[agentops] ")
    lines = [
        f"{approval.get_kind_display()} for the run of {approval.run.task.name}.",
        f"Why it stopped: {approval.gate}",
        f"Objective: {approval.run.objective}",
    ]
    if notice == REASSIGNED:
        handed = approval.context["reassigned"][-1]
        lines.append(f"{handed['by']} handed it to {handed['to']}: {handed['reason']}")
    if approval.expires_at:
        lines.append(f"It expires at {approval.expires_at:%Y-%m-%d %H:%M} UTC.")
    lines.append("Decide it in the approval inbox: /approvals/")
    try:
        return send_mail(subject, "\n".join(lines), None, recipients)
    except OSError:
        logger.exception("approval %s: the notification was not sent", approval_id)
        return 0


def approval_webhook_body(approval: Approval) -> bytes:
    document = {
        "approval": approval.pk,
        "kind": approval.kind,
        "run": str(approval.run_id),
        "task": approval.run.task.slug,
        "tool": approval.tool_name,
        "arguments": approval.arguments,
        "gate": approval.gate,
        "reasoning": approval.reasoning,
        "confidence": approval.confidence,
        "expires_at": approval.expires_at.isoformat() if approval.expires_at else None,
        "group": approval.group.name if approval.group else None,
    }
    return json.dumps(document, sort_keys=True, default=str).encode()


def approval_webhook_post(approval: Approval) -> int | None:
    """POST the approval as JSON, signed: X-Agentops-Signature: sha256=HMAC(secret, body)."""
    url = settings.AGENTOPS_APPROVAL_WEBHOOK_URL
    if not url:
        return None
    body = approval_webhook_body(approval)
    signature = hmac.new(
        settings.AGENTOPS_APPROVAL_WEBHOOK_SECRET.encode(), body, hashlib.sha256
    ).hexdigest()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Agentops-Signature": f"sha256={signature}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except (OSError, ValueError):
        logger.exception("approval %s: the webhook post failed", approval.pk)
        return None


BULK_EFFECTS = ("read", "reversible")


def approvals_bulk_approve(
    *, approval_ids: list[int], user: AbstractBaseUser
) -> tuple[list[Approval], list[str]]:
    """Approve several actions at once: only read or reversible ones; an irreversible
    action is decided on its own. Returns what was approved and why the rest were not."""
    approved, refused = [], []
    approvals = Approval.objects.filter(pk__in=approval_ids).select_related("run__task")
    for approval in approvals.order_by("pk"):
        if approval.kind != ApprovalKind.ACTION or approval.side_effect not in BULK_EFFECTS:
            refused.append(f"#{approval.pk} {approval.tool_name}: decide it on its own")
            continue
        try:
            approved.append(approval_decide(approval=approval, user=user, approve=True))
        except DecisionError as error:
            refused.append(f"#{approval.pk} {approval.tool_name}: {error}")
    return approved, refused


def decider_refusal(user: AbstractBaseUser, approval: Approval) -> str:
    """Why this person may not decide this approval, or "" if they may."""
    if not user.has_perm("approvals.decide_approval"):
        return "you do not hold the permission to decide approvals"
    if (
        approval.group_id
        and not user.is_superuser
        and not user.groups.filter(pk=approval.group_id).exists()
    ):
        return f"this approval is routed to the group {approval.group}, and you are not in it"
    # The one four-eyes rule, as the inbox reads it; the run is locked, so it holds.
    if Approval.objects.filter(pk=approval.pk).filter(four_eyes_barred(user)).exists():
        return "four eyes: you started this run, so someone else must decide its approvals"
    return ""


def arguments_edit(approval: Approval, arguments: dict) -> dict[str, Any]:
    """Approve with edited arguments: checked against the tool's schema, the step and the
    approval's call digest moved to the edited call (the engine fires exactly that), and
    the difference returned for the trail."""
    from agentops.runtime.tools import executor_for

    step = approval.step
    if not isinstance(arguments, dict):
        raise DecisionError("the edited arguments must be a JSON object")
    errors = executor_for(step.tool).validate(step.tool, arguments) if step.tool else []
    if errors:
        raise DecisionError(
            f"the edited arguments do not match {step.tool_name}'s schema: " + "; ".join(errors)
        )
    from agentops.runtime.rules import RuleSpec, rules_evaluate

    pinned = approval.run.task_version.definition.get("rules", {}).get(step.tool_name, [])
    rules = [
        RuleSpec(number, rule["expression"], rule["effect"], rule.get("description", ""))
        for number, rule in enumerate(pinned, 1)
    ]
    verdict = rules_evaluate(rules, arguments)
    if verdict.effect == "deny":
        raise DecisionError(f"the edited call is {verdict.reason}")
    original = step.arguments or {}
    changed = {
        key: {"from": original.get(key), "to": arguments.get(key)}
        for key in sorted(set(original) | set(arguments))
        if original.get(key) != arguments.get(key)
    }
    approval.edited_arguments = arguments
    approval.call_digest = call_digest(step.tool_name, arguments)
    Step.objects.filter(pk=step.pk, status=StepStatus.PROPOSED).update(arguments=arguments)
    return {"edited": changed}


def approvals_expire(*, now: datetime | None = None) -> list[int]:
    """Act on every pending approval past its deadline, as its task says: pass it once to
    the escalation group with a fresh deadline, or expire it, which rejects an action (the
    agent re-plans) and halts the run for every other kind, or halts the run outright."""
    now = now or timezone.now()
    approvals_remind(now=now)
    acted = []
    due = Approval.objects.filter(status=ApprovalStatus.PENDING, expires_at__lte=now)
    for approval_id, run_id in due.values_list("pk", "run_id"):
        with transaction.atomic():
            # The run first, then the approval, as a decision locks them: the other way
            # round, a decision and the expirer could each wait for the other.
            run = Run.objects.select_for_update().filter(pk=run_id).first()
            approval = (
                Approval.objects.select_for_update()
                .filter(pk=approval_id, status=ApprovalStatus.PENDING, expires_at__lte=now)
                .select_related("run__task")
                .first()
            )
            if run is None or approval is None:
                continue  # decided or escalated meanwhile, or another expirer had it
            approval_expire(approval, run, now)
            acted.append(approval.pk)
    return acted


def approvals_remind(*, now: datetime) -> list[int]:
    """Remind the group once of each pending approval with under a quarter of its time
    left. ``reminded_at`` is claimed with a conditional UPDATE, so two schedulers remind
    once."""
    reminded = []
    pending = Approval.objects.filter(
        status=ApprovalStatus.PENDING, reminded_at__isnull=True, expires_at__gt=now
    ).select_related("run__task")
    for approval in pending:
        if not reminder_due(approval, now):
            continue
        claimed = Approval.objects.filter(pk=approval.pk, reminded_at__isnull=True).update(
            reminded_at=now
        )
        if claimed:
            approval_notify(approval.pk, notice=REMINDER)
            reminded.append(approval.pk)
    return reminded


def reminder_due(approval: Approval, now: datetime) -> bool:
    """Whether a quarter or less of the approval's own window is left (its deadline set
    it: the task's timeout may have changed since it opened)."""
    if approval.expires_at is None:
        return False
    return approval.expires_at - now <= (approval.expires_at - approval.created_at) / 4


def approval_expire(approval: Approval, run: Run, now: datetime) -> None:
    task = run.task
    minutes = task.approval_timeout_minutes
    if (
        task.on_approval_expiry == "escalate"
        and task.escalation_group_id
        and not approval.escalated
    ):
        approval.group_id = task.escalation_group_id
        approval.escalated = True
        approval.expires_at = now + timedelta(minutes=minutes)
        approval.save(update_fields=["group", "escalated", "expires_at"])
        event_append(
            run_uuid=run.pk,
            kind="approval.escalated",
            actor="system",
            payload={"approval": approval.pk, "to_group": str(task.escalation_group)},
        )
        approval_id = approval.pk
        transaction.on_commit(
            lambda: background.soon(lambda: approval_notify(approval_id, notice=ESCALATED))
        )
        return
    approval.status = ApprovalStatus.EXPIRED
    approval.decided_at = now
    approval.decision_reason = f"no decision within {approval_window(approval)}"
    approval.save(update_fields=["status", "decided_at", "decision_reason"])
    event_append(
        run_uuid=run.pk,
        kind="approval.expired",
        actor="system",
        payload={"approval": approval.pk, "kind": approval.kind, "then": task.on_approval_expiry},
    )
    if run.status != RunStatus.WAITING:
        return
    if task.on_approval_expiry != "halt" and approval.kind == ApprovalKind.ACTION:
        run_transition(run=run, to=RunStatus.QUEUED, actor="system", reason="")
        dispatch.enqueue(run.pk)
        return
    run_transition(
        run=run,
        to=RunStatus.HALTED,
        actor="system",
        reason=f"the approval expired: {approval.decision_reason}",
    )


def approval_window(approval: Approval) -> str:
    """How long the approval waited, as its own deadline set it (the task's timeout may
    have changed since it opened): "1 minute", "90 minutes"."""
    # created_at is stamped a moment after expires_at was computed: round, not floor.
    minutes = round((approval.expires_at - approval.created_at) / timedelta(minutes=1))
    return f"{minutes} minute{'' if minutes == 1 else 's'}"


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
    if not approved and kind == ApprovalKind.ACTION:
        from tasks.autonomy import autonomy_after_rejection

        autonomy_after_rejection(run.task)
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
