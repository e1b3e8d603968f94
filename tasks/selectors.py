"""Reads for the task and run pages: one query per list, counts annotated in SQL."""

from __future__ import annotations

import uuid

from django.db.models import Count, Q, QuerySet

from approvals.models import ApprovalStatus
from tasks.models import LIVE_RUN_STATUSES, Run, Step, Task

RUN_LIST_LIMIT = 100


def tasks_for_list() -> QuerySet[Task]:
    return Task.objects.annotate(
        grant_count=Count("grants", distinct=True),
        live_runs=Count("runs", filter=Q(runs__status__in=LIVE_RUN_STATUSES), distinct=True),
    ).order_by("name")


def task_for_detail(slug: str) -> Task:
    return Task.objects.prefetch_related("grants__tool").get(slug=slug)


def runs_for_list(*, status: str = "", task_slug: str = "") -> QuerySet[Run]:
    runs = Run.objects.select_related("task", "task_version", "started_by").order_by("-created_at")
    if status:
        runs = runs.filter(status=status)
    if task_slug:
        runs = runs.filter(task__slug=task_slug)
    return runs[:RUN_LIST_LIMIT]


def run_for_detail(run_id: uuid.UUID) -> Run:
    return (
        Run.objects.select_related("task", "task_version", "started_by")
        .annotate(
            pending_approvals=Count("approvals", filter=Q(approvals__status=ApprovalStatus.PENDING))
        )
        .get(pk=run_id)
    )


def steps_for_run(run: Run) -> list[Step]:
    return list(
        Step.objects.filter(run=run)
        .select_related("tool")
        .prefetch_related("approvals__decided_by")
        .order_by("number")
    )
