"""Reads for the task and run pages: one query per list, counts annotated in SQL."""

from __future__ import annotations

import uuid

from django.db.models import Avg, Count, Max, Q, QuerySet

from approvals.models import ApprovalStatus
from tasks.models import LIVE_RUN_STATUSES, Run, Step, StepStatus, Task, Tool, Trigger

RUN_LIST_LIMIT = 100


def tasks_for_list() -> QuerySet[Task]:
    return Task.objects.annotate(
        grant_count=Count("grants", distinct=True),
        live_runs=Count("runs", filter=Q(runs__status__in=LIVE_RUN_STATUSES), distinct=True),
    ).order_by("name")


def task_for_detail(slug: str) -> Task:
    return Task.objects.prefetch_related("grants__tool").get(slug=slug)


def runs_for_list(
    *, status: str = "", task_slug: str = "", started: str = "", trigger_id: int | None = None
) -> QuerySet[Run]:
    """The latest runs; ``started`` is how they started (a trigger kind, "manual" for a
    person or the shell), ``trigger_id`` the trigger that started them."""
    runs = Run.objects.select_related("task", "task_version", "started_by", "trigger").order_by(
        "-created_at"
    )
    if status:
        runs = runs.filter(status=status)
    if task_slug:
        runs = runs.filter(task__slug=task_slug)
    if started:
        runs = runs.filter(trigger_kind=started)
    if trigger_id is not None:
        runs = runs.filter(trigger_id=trigger_id)
    return runs[:RUN_LIST_LIMIT]


def trigger_for_filter(trigger_id: int) -> Trigger:
    """The trigger the runs list is filtered by, with its task's name. (The list names
    each run's trigger, linked to this filter, rather than listing every trigger: the
    unfiltered list stays one query for its rows.)"""
    return (
        Trigger.objects.select_related("task")
        .only("pk", "name", "kind", "task__name")
        .get(pk=trigger_id)
    )


def run_for_detail(run_id: uuid.UUID) -> Run:
    # The firing (a reverse one-to-one) comes in the same query: a run a trigger
    # started shows the trigger, the firing's key and what arrived.
    return (
        Run.objects.select_related("task", "task_version", "started_by", "trigger", "firing")
        .annotate(
            pending_approvals=Count("approvals", filter=Q(approvals__status=ApprovalStatus.PENDING))
        )
        .get(pk=run_id)
    )


# The run page shows a long run's latest steps, and earlier ones a page at a time.
STEPS_SHOWN = 100


def steps_for_run(
    run: Run,
    *,
    after: int | None = None,
    numbers: set[int] | frozenset[int] = frozenset(),
    before: int | None = None,
    limit: int | None = None,
) -> list[Step]:
    """The run's steps in order: all of them; or those after ``after`` and those numbered
    in ``numbers`` (what the live page lacks or may show changed); or, with ``limit``,
    the last ``limit`` of those before ``before`` (a page of a long run)."""
    steps = Step.objects.filter(run=run)
    if after is not None:
        steps = steps.filter(Q(number__gt=after) | Q(number__in=numbers))
    if before is not None:
        steps = steps.filter(number__lt=before)
    steps = steps.select_related("tool").prefetch_related("approvals__decided_by")
    if limit is None:
        return list(steps.order_by("number"))
    return list(reversed(steps.order_by("-number")[:limit]))


TOOL_CALLS_SHOWN = 50


def tools_for_list() -> QuerySet[Tool]:
    return Tool.objects.annotate(
        task_count=Count("grants", distinct=True),
        calls=Count("step", distinct=True),
        last_call=Max("step__created_at"),
    ).order_by("name")


def tool_for_detail(name: str) -> Tool:
    return Tool.objects.prefetch_related("grants__task", "grants__rules").get(name=name)


def tool_recent_calls(tool: Tool) -> list[Step]:
    return list(
        Step.objects.filter(tool=tool)
        .select_related("run__task")
        .order_by("-created_at")[:TOOL_CALLS_SHOWN]
    )


def tool_call_figures(tool: Tool) -> dict:
    """Outcomes of the tool's calls, and their mean latency."""
    figures = Step.objects.filter(tool=tool).aggregate(
        total=Count("pk"),
        succeeded=Count("pk", filter=Q(status=StepStatus.SUCCEEDED)),
        failed=Count("pk", filter=Q(status=StepStatus.FAILED)),
        refused=Count("pk", filter=Q(status=StepStatus.REFUSED)),
        mean_ms=Avg("duration_ms"),
    )
    return figures


# Governed configuration --------------------------------------------------------------

CONFIG_CHANGES_SHOWN = 20


def config_changes_for_task(task: Task) -> list:
    """The task's changes that widen, those waiting first, then the latest decided."""
    from tasks.models import ConfigChange

    changes = ConfigChange.objects.filter(task=task).select_related("requested_by", "decided_by")
    waiting = list(changes.filter(status=ConfigChange.Status.PENDING))
    decided = list(changes.exclude(status=ConfigChange.Status.PENDING)[:CONFIG_CHANGES_SHOWN])
    return waiting + decided


def config_changes_waiting(*, tool_name: str = "") -> QuerySet:
    """Every change waiting for a second person, tasks' and tools' alike."""
    from tasks.models import ConfigChange

    changes = ConfigChange.objects.filter(status=ConfigChange.Status.PENDING).select_related(
        "task", "tool", "requested_by"
    )
    if tool_name:
        changes = changes.filter(tool__name=tool_name)
    return changes.order_by("created_at", "pk")


def config_change_for_detail(change_id: int):
    from tasks.models import ConfigChange

    return ConfigChange.objects.select_related("task", "tool", "requested_by", "decided_by").get(
        pk=change_id
    )
