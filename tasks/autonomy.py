"""The autonomy dial: turning it (raising above Supervised takes a second person), the
track record it is turned by, and the steps down the record takes by itself.

Dial changes are recorded in the task's own trail: lineage events under a UUID derived
from the task (``task_trail_uuid``), hash-chained like a run's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from lineage.services import event_append
from tasks.models import (
    AutonomyChange,
    AutonomyLevel,
    Incident,
    Run,
    RunStatus,
    Task,
)
from tasks.services import actor_for, task_version_current

TRAIL_NAMESPACE = uuid.UUID("0b6a1a52-4c5e-4f0e-9c1f-6d1e2a7b9e10")
# How many approvals in a row, approved as proposed, make a task eligible for the next
# level; and the window over which rejections step it down.
ELIGIBLE_STREAK = {AutonomyLevel.SUPERVISED: 40, AutonomyLevel.GUARDED: 100}
STEP_DOWN_WINDOW = 20
INCIDENT_QUIET_DAYS = 30


class DialError(Exception):
    """The dial cannot be turned so; the message says why. Nothing was written."""


def level_meaning(level: int, threshold: float) -> str:
    """What runs without a person at ``level``: the gate's table (agentops.runtime.gates)
    in words, for the person turning the dial."""
    held = "except calls of tools marked 'always approve' and calls a rule holds"
    if level == AutonomyLevel.SHADOW:
        return f"Read-only calls run, {held}; every other call is recorded as simulated, not made."
    if level == AutonomyLevel.SUPERVISED:
        return f"Read-only calls run, {held}; every other call waits for a person."
    if level == AutonomyLevel.GUARDED:
        reversible = (
            f"reversible calls the agent is at least {threshold:.2f} confident in"
            if threshold > 0
            else "reversible calls"
        )
        return (
            f"Read-only calls and {reversible} run, {held}; irreversible calls wait for a person."
        )
    return f"Every call runs, {held}."


def task_trail_uuid(task: Task) -> uuid.UUID:
    return uuid.uuid5(TRAIL_NAMESPACE, f"task:{task.pk}")


@dataclass(frozen=True)
class TrackRecord:
    approved_as_proposed: int
    edited: int
    rejected: int
    runs_succeeded: int
    runs_failed: int
    runs_halted: int
    incidents: int
    streak: int  # the latest action approvals in a row, approved as proposed
    recent_incident: bool


def track_record(task: Task) -> TrackRecord:
    from approvals.models import Approval, ApprovalKind, ApprovalStatus

    actions = Approval.objects.filter(run__task=task, kind=ApprovalKind.ACTION)
    counts = actions.aggregate(
        as_proposed=Count(
            "pk", filter=Q(status=ApprovalStatus.APPROVED, edited_arguments__isnull=True)
        ),
        edited=Count(
            "pk", filter=Q(status=ApprovalStatus.APPROVED, edited_arguments__isnull=False)
        ),
        rejected=Count("pk", filter=Q(status=ApprovalStatus.REJECTED)),
    )
    runs = Run.objects.filter(task=task).aggregate(
        succeeded=Count("pk", filter=Q(status=RunStatus.SUCCEEDED)),
        failed=Count("pk", filter=Q(status=RunStatus.FAILED)),
        halted=Count("pk", filter=Q(status=RunStatus.HALTED)),
    )
    streak = 0
    decided = actions.exclude(status=ApprovalStatus.PENDING).order_by("-decided_at")
    for status, edited in decided.values_list("status", "edited_arguments")[:200]:
        if status != ApprovalStatus.APPROVED or edited is not None:
            break
        streak += 1
    incidents = Incident.objects.filter(run__task=task)
    quiet_since = timezone.now() - timedelta(days=INCIDENT_QUIET_DAYS)
    return TrackRecord(
        approved_as_proposed=counts["as_proposed"],
        edited=counts["edited"],
        rejected=counts["rejected"],
        runs_succeeded=runs["succeeded"],
        runs_failed=runs["failed"],
        runs_halted=runs["halted"],
        incidents=incidents.count(),
        streak=streak,
        recent_incident=incidents.filter(created_at__gte=quiet_since).exists(),
    )


def recommendation(task: Task, record: TrackRecord) -> str:
    """What the record says of the dial, in a sentence a person can check."""
    level = AutonomyLevel(task.autonomy_level)
    if record.recent_incident:
        return (
            f"stay at {level.label}: an incident was flagged in the last {INCIDENT_QUIET_DAYS} days"
        )
    if level == AutonomyLevel.SHADOW:
        return "eligible for Supervised whenever you have read its simulated calls"
    needed = ELIGIBLE_STREAK.get(level)
    if needed is None:
        return "at the top of the dial"
    nxt = AutonomyLevel(level + 1)
    if record.streak >= needed:
        return f"eligible for {nxt.label}: the last {needed} approvals were approved as proposed"
    return (
        f"stay at {level.label}: {needed - record.streak} more approvals approved as proposed "
        f"in a row make it eligible for {nxt.label}"
    )


def dial_record(task: Task, *, actor: str, kind: str, payload: dict) -> None:
    event_append(run_uuid=task_trail_uuid(task), kind=kind, actor=actor, payload=payload)


def requests_withdraw(task: Task, *, keep: AutonomyChange | None = None) -> list[int]:
    """Inside a transaction: close the task's pending requests (but ``keep``) as
    withdrawn. A request asks to move the dial from where it was; once the dial has
    moved, or a newer request replaced it, confirming it would move the dial from
    somewhere else. Returns their ids, for the trail."""
    pending = AutonomyChange.objects.filter(task=task, status=AutonomyChange.Status.PENDING)
    if keep is not None:
        pending = pending.exclude(pk=keep.pk)
    ids = list(pending.values_list("pk", flat=True))
    pending.filter(pk__in=ids).update(
        status=AutonomyChange.Status.WITHDRAWN, decided_at=timezone.now()
    )
    return ids


def autonomy_apply(
    *, task: Task, to_level: int, actor: str, reason: str, change: AutonomyChange | None
) -> Task:
    """Inside a transaction: move the dial, version the task, withdraw the requests it
    makes stale, record it."""
    from_level = task.autonomy_level
    Task.objects.filter(pk=task.pk).update(autonomy_level=to_level)
    task.autonomy_level = to_level
    version = task_version_current(task=task)
    withdrawn = requests_withdraw(task)
    dial_record(
        task,
        actor=actor,
        kind="autonomy.changed",
        payload={
            "task": task.slug,
            "from": from_level,
            "to": to_level,
            "reason": reason,
            "change": change.pk if change else None,
            "task_version": version.number,
            "withdrawn": withdrawn,
        },
    )
    return task


def autonomy_request(
    *, task: Task, to_level: int, user: AbstractBaseUser, reason: str
) -> AutonomyChange:
    """Turn the dial. Lowering it, or raising it no higher than Supervised, takes effect
    at once; raising it above Supervised waits for a second person's confirmation."""
    to_level = AutonomyLevel(to_level)
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=task.pk)
        if to_level == task.autonomy_level:
            raise DialError(f"the task is already at {to_level.label}")
        if not reason.strip():
            raise DialError("say why: the reason is kept in the task's trail")
        change = AutonomyChange.objects.create(
            task=task,
            from_level=task.autonomy_level,
            to_level=to_level,
            reason=reason.strip(),
            requested_by=user,
        )
        if to_level > AutonomyLevel.SUPERVISED and to_level > task.autonomy_level:
            withdrawn = requests_withdraw(task, keep=change)
            dial_record(
                task,
                actor=actor_for(user),
                kind="autonomy.requested",
                payload={
                    "from": task.autonomy_level,
                    "to": to_level,
                    "change": change.pk,
                    "withdrawn": withdrawn,
                },
            )
            return change
        change.status = AutonomyChange.Status.APPLIED
        change.decided_at = timezone.now()
        change.save(update_fields=["status", "decided_at"])
        autonomy_apply(
            task=task, to_level=to_level, actor=actor_for(user), reason=change.reason, change=change
        )
    return change


def autonomy_decide(
    *, change: AutonomyChange, user: AbstractBaseUser, confirm: bool
) -> AutonomyChange:
    """A second person confirms (or declines) raising the dial above Supervised."""
    with transaction.atomic():
        # The task's row first, then the request's: the order every turn of the dial
        # takes (a turn locks the task, then withdraws its requests), so none deadlock.
        task = Task.objects.select_for_update().get(pk=change.task_id)
        change = AutonomyChange.objects.select_for_update().select_related("task").get(pk=change.pk)
        if change.status != AutonomyChange.Status.PENDING:
            raise DialError(f"this change was already {change.status}")
        if confirm and change.requested_by_id == user.pk:
            raise DialError("a second person must confirm: you asked for this change")
        if confirm and task.autonomy_level != change.from_level:
            # Requests are withdrawn when the dial moves; this guards one left pending
            # from before that rule. Declining it is always allowed.
            now = task.get_autonomy_level_display()
            raise DialError(f"the dial moved since this was asked (it is at {now})")
        change.status = AutonomyChange.Status.APPLIED if confirm else AutonomyChange.Status.DECLINED
        change.confirmed_by = user
        change.decided_at = timezone.now()
        change.save(update_fields=["status", "confirmed_by", "decided_at"])
        if confirm:
            autonomy_apply(
                task=task,
                to_level=change.to_level,
                actor=actor_for(user),
                reason=f"{change.reason} (confirmed)",
                change=change,
            )
        else:
            dial_record(
                task, actor=actor_for(user), kind="autonomy.declined", payload={"change": change.pk}
            )
    return change


def autonomy_step_down(*, task: Task, reason: str) -> bool:
    """Lower the dial by one, by itself, no lower than Supervised (where a person already
    sees every side effect). Inside the caller's transaction."""
    task = Task.objects.select_for_update().get(pk=task.pk)
    if task.autonomy_level <= AutonomyLevel.SUPERVISED:
        return False
    to_level = task.autonomy_level - 1
    change = AutonomyChange.objects.create(
        task=task,
        from_level=task.autonomy_level,
        to_level=to_level,
        reason=reason,
        status=AutonomyChange.Status.APPLIED,
        decided_at=timezone.now(),
    )
    autonomy_apply(task=task, to_level=to_level, actor="system", reason=reason, change=change)
    return True


def autonomy_after_rejection(task: Task) -> bool:
    """After a rejected action: step down if rejections since the dial last moved, among
    the last STEP_DOWN_WINDOW decided actions, reached the task's limit."""
    from approvals.models import Approval, ApprovalKind, ApprovalStatus

    if not task.step_down_rejections:
        return False
    since = (
        AutonomyChange.objects.filter(task=task, status=AutonomyChange.Status.APPLIED)
        .order_by("-decided_at")
        .values_list("decided_at", flat=True)
        .first()
    )
    decided = Approval.objects.filter(run__task=task, kind=ApprovalKind.ACTION).exclude(
        status=ApprovalStatus.PENDING
    )
    if since:
        decided = decided.filter(decided_at__gt=since)
    window = list(
        decided.order_by("-decided_at").values_list("status", flat=True)[:STEP_DOWN_WINDOW]
    )
    rejections = window.count(ApprovalStatus.REJECTED)
    if rejections < task.step_down_rejections:
        return False
    return autonomy_step_down(
        task=task,
        reason=f"{rejections} of the last {len(window)} decided actions were rejected",
    )


def incident_flag(*, run: Run, user: AbstractBaseUser, note: str) -> Incident:
    """An operator flags a run: recorded in its trail, and the task steps down."""
    if not note.strip():
        raise DialError("say what went wrong: the note is kept in the run's trail")
    if not run.is_finished:
        raise DialError(f"the run is still {run.status}: cancel it first, then flag it")
    with transaction.atomic():
        incident = Incident.objects.create(run=run, note=note.strip(), flagged_by=user)
        event_append(
            run_uuid=run.pk,
            kind="incident.flagged",
            actor=actor_for(user),
            payload={"incident": incident.pk, "note": incident.note},
        )
        autonomy_step_down(task=run.task, reason=f"an incident was flagged on run {run.pk}")
    return incident
