"""Reads for the approval inbox."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from approvals.models import Approval, ApprovalStatus

DECIDED_LIMIT = 50


def approvals_visible_to(user: AbstractBaseUser) -> QuerySet[Approval]:
    """Approvals this person may see and decide: none without the decide permission."""
    if not user.is_authenticated or not user.has_perm("approvals.decide_approval"):
        return Approval.objects.none()
    return Approval.objects.all()


def approvals_pending_for(user: AbstractBaseUser) -> QuerySet[Approval]:
    return (
        approvals_visible_to(user)
        .filter(status=ApprovalStatus.PENDING)
        .select_related("run__task", "run__started_by", "step__tool")
        .order_by("created_at")
    )


def approvals_decided_for(user: AbstractBaseUser) -> QuerySet[Approval]:
    return (
        approvals_visible_to(user)
        .exclude(status=ApprovalStatus.PENDING)
        .select_related("run__task", "decided_by")
        .order_by("-decided_at")[:DECIDED_LIMIT]
    )


def approval_for_user(user: AbstractBaseUser, approval_id: int) -> Approval:
    return approvals_visible_to(user).select_related("run__task", "step__tool").get(pk=approval_id)


def inbox_count_for(user: AbstractBaseUser) -> int:
    return approvals_visible_to(user).filter(status=ApprovalStatus.PENDING).count()
