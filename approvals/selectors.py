"""Reads for the approval inbox."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import BooleanField, Count, ExpressionWrapper, F, Q, QuerySet, TextField
from django.db.models.functions import Cast, Left

from approvals.models import Approval, ApprovalStatus

DECIDED_LIMIT = 50
INBOX_PAGE_SIZE = 50
# The list shows what an approval wants in one line: this much of its arguments' JSON.
ARGUMENTS_HEAD_CHARS = 160
# What a row of the inbox list reads; the payload (reasoning, context, full arguments)
# stays in the database until the item is opened.
ROW_FIELDS = (
    "kind",
    "status",
    "tool_name",
    "side_effect",
    "gate",
    "confidence",
    "created_at",
    "expires_at",
    "escalated",
    "run_id",
    "group_id",
    "run__task__name",
    "run__task__slug",
    "group__name",
)
# A search that could be the start of a run's id (a UUID, dashes optional).
_RUN_ID_PREFIX = re.compile(r"[0-9a-fA-F-]{4,36}")


@dataclass(frozen=True)
class InboxFilters:
    """What the inbox list is narrowed to; empty strings filter nothing."""

    kind: str = ""
    task: str = ""  # a task's slug
    group: str = ""  # a group's id, or "none"
    risk: str = ""  # a side-effect class
    search: str = ""

    @property
    def active(self) -> bool:
        return any((self.kind, self.task, self.group, self.risk, self.search))


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


# Most urgent first: the nearest deadline; the id last, so the order is total and
# "the item after this one" has one answer.
INBOX_ORDER = (F("expires_at").asc(nulls_last=True), "created_at", "pk")


def approvals_pending_for(user: AbstractBaseUser) -> QuerySet[Approval]:
    return (
        with_four_eyes(approvals_visible_to(user), user)
        .filter(status=ApprovalStatus.PENDING)
        .select_related("run__task", "run__started_by", "step__tool", "group")
        .order_by(*INBOX_ORDER)
    )


def approvals_filtered(approvals: QuerySet[Approval], filters: InboxFilters) -> QuerySet[Approval]:
    """``approvals`` narrowed to the inbox's filters, one condition per filter."""
    if filters.kind:
        approvals = approvals.filter(kind=filters.kind)
    if filters.task:
        approvals = approvals.filter(run__task__slug=filters.task)
    if filters.group == "none":
        approvals = approvals.filter(group__isnull=True)
    elif filters.group:
        approvals = approvals.filter(group_id=int(filters.group))
    if filters.risk:
        approvals = approvals.filter(side_effect=filters.risk)
    if filters.search:
        approvals = approvals.filter(search_condition(filters.search))
    return approvals


def search_condition(search: str) -> Q:
    """What the inbox's search matches: the tool, the task, the agent's reasoning, the
    decider and the reason given, and the start of the run's id."""
    condition = (
        Q(tool_name__icontains=search)
        | Q(run__task__name__icontains=search)
        | Q(reasoning__icontains=search)
        | Q(decided_by__username__icontains=search)
        | Q(decision_reason__icontains=search)
    )
    if _RUN_ID_PREFIX.fullmatch(search) and len(search.replace("-", "")) <= 32:
        condition |= Q(run__id__startswith=run_id_prefix(search))
    return condition


def run_id_prefix(search: str) -> str:
    """The start of a run's id as the database writes it, whatever dashes were typed:
    PostgreSQL compares the dashed text of a uuid, SQLite its 32 hex digits (Django
    strips the dashes there)."""
    digits = search.replace("-", "").lower()
    cuts = (0, 8, 12, 16, 20, 32)
    return "-".join(
        digits[start:end] for start, end in itertools.pairwise(cuts) if digits[start:end]
    )


def inbox_pending(user: AbstractBaseUser, filters: InboxFilters) -> QuerySet[Approval]:
    """The pending approvals the inbox lists for this person, filtered, each with
    ``barred`` (four eyes keep them from deciding it)."""
    pending = with_four_eyes(approvals_visible_to(user), user).filter(status=ApprovalStatus.PENDING)
    return approvals_filtered(pending, filters)


def inbox_counts(pending: QuerySet[Approval], user: AbstractBaseUser) -> dict[str, int]:
    """How many are listed, and how many of them wait for someone else (four eyes), in
    one query. Listed but not barred is what the navigation's count counts."""
    return pending.aggregate(listed=Count("pk"), barred=Count("pk", filter=four_eyes_barred(user)))


def inbox_rows(pending: QuerySet[Approval]) -> QuerySet[Approval]:
    """``pending`` in inbox order, each with only what a row shows: the head of its
    arguments is cut in SQL, so a long payload is never read to draw a line of it."""
    return (
        pending.select_related("run__task", "group")
        .only(*ROW_FIELDS)
        .annotate(
            arguments_head=Left(Cast("arguments", output_field=TextField()), ARGUMENTS_HEAD_CHARS)
        )
        .order_by(*INBOX_ORDER)
    )


def approval_following(
    user: AbstractBaseUser, filters: InboxFilters, approval: Approval
) -> Approval | None:
    """The pending approval listed after ``approval`` (which may have left the list),
    else the one listed last before it: the item to select once it is decided."""
    pending = with_four_eyes(approvals_visible_to(user), user).filter(status=ApprovalStatus.PENDING)
    pending = approvals_filtered(pending, filters).exclude(pk=approval.pk)
    later_same_deadline = Q(created_at__gt=approval.created_at) | Q(
        created_at=approval.created_at, pk__gt=approval.pk
    )
    if approval.expires_at is None:
        after = Q(expires_at__isnull=True) & later_same_deadline
    else:
        after = (
            Q(expires_at__gt=approval.expires_at)
            | Q(expires_at__isnull=True)
            | (Q(expires_at=approval.expires_at) & later_same_deadline)
        )
    ordered = pending.order_by(*INBOX_ORDER).values_list("pk", flat=True)
    following = ordered.filter(after).first() or ordered.last()
    return None if following is None else approval_for_user(user, following)


def approvals_pending_on_run(user: AbstractBaseUser, run_id: object) -> QuerySet[Approval]:
    """The run's pending approvals this person may see, each ready for the decision
    card (``approvals/_approval.html``): for the run page to decide in place."""
    return approvals_pending_for(user).filter(run_id=run_id)


def approvals_decided_for(
    user: AbstractBaseUser, *, filters: InboxFilters | None = None
) -> QuerySet[Approval]:
    """Decided approvals, newest first, narrowed by the inbox's filters and search."""
    decided = approvals_visible_to(user).exclude(status=ApprovalStatus.PENDING)
    decided = approvals_filtered(decided, filters or InboxFilters())
    return decided.select_related("run__task", "decided_by").order_by("-decided_at")[:DECIDED_LIMIT]


def approval_for_user(user: AbstractBaseUser, approval_id: int) -> Approval:
    return (
        with_four_eyes(approvals_visible_to(user), user)
        .select_related("run__task", "run__started_by", "step__tool", "group", "decided_by")
        .get(pk=approval_id)
    )


def inbox_tasks_for(user: AbstractBaseUser) -> QuerySet:
    """The tasks the task filter offers: those with an approval waiting that this person
    may see, as (slug, name)."""
    from tasks.models import Task

    pending = approvals_visible_to(user).filter(status=ApprovalStatus.PENDING)
    return (
        Task.objects.filter(pk__in=pending.values("run__task_id"))
        .order_by("name")
        .values_list("slug", "name")
    )


def inbox_count_for(user: AbstractBaseUser) -> int:
    """Pending approvals this person may decide: those waiting for someone else under
    four eyes do not count."""
    pending = approvals_visible_to(user).filter(status=ApprovalStatus.PENDING)
    return pending.exclude(four_eyes_barred(user)).count()
