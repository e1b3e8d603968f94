"""Reads for the approval inbox."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import BooleanField, ExpressionWrapper, F, Q, QuerySet

from approvals.models import Approval, ApprovalStatus

DECIDED_LIMIT = 50


def four_eyes_barred(user: AbstractBaseUser) -> Q:
    """The four-eyes rule, the only copy of it: nobody, superusers included, decides an
    approval on a run they started when its task asks for four eyes. A condition on
    approvals, so the decision (``decider_refusal``), the inbox and its count all read
    the same rule, the lists in SQL."""
    return Q(run__task__four_eyes=True) & Q(run__started_by_id=user.pk)


def approvals_visible_to(user: AbstractBaseUser) -> QuerySet[Approval]:
    """Approvals this person may see: none without the decide permission; those routed
    to a group only to its members (superusers see every one)."""
    if not user.is_authenticated or not user.has_perm("approvals.decide_approval"):
        return Approval.objects.none()
    if user.is_superuser:
        return Approval.objects.all()
    return Approval.objects.filter(Q(group__isnull=True) | Q(group__in=user.groups.values("pk")))


def with_four_eyes(approvals: QuerySet[Approval], user: AbstractBaseUser) -> QuerySet[Approval]:
    """Each approval with ``barred``: true where four eyes keep this person from deciding
    it, so the inbox shows it as waiting for someone else."""
    return approvals.annotate(
        barred=ExpressionWrapper(four_eyes_barred(user), output_field=BooleanField())
    )


def approvals_pending_for(user: AbstractBaseUser) -> QuerySet[Approval]:
    return (
        with_four_eyes(approvals_visible_to(user), user)
        .filter(status=ApprovalStatus.PENDING)
        .select_related("run__task", "run__started_by", "step__tool", "group")
        # Most urgent first: the nearest deadline.
        .order_by(F("expires_at").asc(nulls_last=True), "created_at")
    )


def approvals_decided_for(user: AbstractBaseUser, *, search: str = "") -> QuerySet[Approval]:
    """Decided approvals, newest first; ``search`` matches the tool, the task, the
    decider or the reason."""
    decided = approvals_visible_to(user).exclude(status=ApprovalStatus.PENDING)
    if search:
        decided = decided.filter(
            Q(tool_name__icontains=search)
            | Q(run__task__name__icontains=search)
            | Q(decided_by__username__icontains=search)
            | Q(decision_reason__icontains=search)
        )
    return decided.select_related("run__task", "decided_by").order_by("-decided_at")[:DECIDED_LIMIT]


def approval_for_user(user: AbstractBaseUser, approval_id: int) -> Approval:
    return (
        with_four_eyes(approvals_visible_to(user), user)
        .select_related("run__task", "step__tool")
        .get(pk=approval_id)
    )


def inbox_count_for(user: AbstractBaseUser) -> int:
    """Pending approvals this person may decide: those waiting for someone else under
    four eyes do not count."""
    pending = approvals_visible_to(user).filter(status=ApprovalStatus.PENDING)
    return pending.exclude(four_eyes_barred(user)).count()
