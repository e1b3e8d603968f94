"""Reads for the task and run pages: one query per list, counts annotated in SQL."""

from __future__ import annotations

import uuid

from django.db.models import Avg, Count, OuterRef, Q, QuerySet, Subquery, TextField
from django.db.models.functions import Cast, Coalesce, Substr

from tasks.models import LIVE_RUN_STATUSES, Run, Step, StepStatus, Task, Tool, ToolGrant
from tasks.run_list import RunFilters

# A page of the runs list.
RUNS_PER_PAGE = 50
# What the list shows of a run's input: its JSON's first characters.
INPUT_SHOWN = 120


def tasks_for_list() -> QuerySet[Task]:
    """Each task with its grants and live runs, counted in subqueries: a join of the
    grants with every run the task ever had grew with the runs (120 ms at 100,000)."""
    grants = ToolGrant.objects.filter(task=OuterRef("pk")).order_by()
    live = Run.objects.filter(task=OuterRef("pk"), status__in=LIVE_RUN_STATUSES).order_by()
    return Task.objects.annotate(
        grant_count=Coalesce(
            Subquery(grants.values("task").annotate(n=Count("pk")).values("n")[:1]), 0
        ),
        live_runs=Coalesce(
            Subquery(live.values("task").annotate(n=Count("pk")).values("n")[:1]), 0
        ),
    ).order_by("name")


def task_for_detail(slug: str) -> Task:
    return Task.objects.prefetch_related("grants__tool").get(slug=slug)


def runs_for_list(filters: RunFilters | None = None, *, task_slug: str = "") -> QuerySet[Run]:
    """The latest runs first, filtered; each with the start of its input as text
    (``input_head``) instead of the whole document, which may be large."""
    runs = (
        Run.objects.select_related("task", "task_version", "started_by", "trigger")
        .defer("input", "plan", "outcome", "reason", "objective", "budget_extra")
        .annotate(input_head=Substr(Cast("input", TextField()), 1, INPUT_SHOWN + 1))
        .order_by("-created_at")
    )
    if task_slug:
        runs = runs.filter(task__slug=task_slug)
    if filters is None:
        return runs
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.started:
        runs = runs.filter(trigger_kind=filters.started)
    if filters.trigger is not None:
        runs = runs.filter(trigger=filters.trigger)
    if filters.task is not None:
        runs = runs.filter(task=filters.task)
    if filters.model:
        runs = runs.filter(model_label=filters.model)
    start, end = filters.created_range()
    if start is not None:
        runs = runs.filter(created_at__gte=start)
    if end is not None:
        runs = runs.filter(created_at__lt=end)
    if filters.text:
        runs = runs.alias(input_text=Cast("input", TextField())).filter(
            input_text__icontains=filters.text
        )
    return runs


def run_list_choices() -> dict:
    """The runs list's choices of task and model: from the tasks (a short table), not
    from the runs."""
    tasks = list(Task.objects.order_by("name").values_list("slug", "name", "model"))
    return {
        "tasks": [(slug, name) for slug, name, _ in tasks],
        "models": sorted({model for _, _, model in tasks}),
    }


def run_for_detail(run_id: uuid.UUID) -> Run:
    # The firing (a reverse one-to-one) comes in the same query: a run a trigger
    # started shows the trigger, the firing's key and what arrived. Its pending
    # approvals are read apart (tasks.live.run_waiting_ids), once.
    return Run.objects.select_related(
        "task", "task_version", "started_by", "trigger", "firing"
    ).get(pk=run_id)


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
    """The run's steps in order: all of them; or those after ``after`` and/or numbered
    in ``numbers`` (what the live page lacks or may show changed); those before
    ``before``; with ``limit``, only the last ``limit`` of them (a page of a long run)."""
    steps = Step.objects.filter(run=run)
    if after is not None and numbers:
        steps = steps.filter(Q(number__gt=after) | Q(number__in=numbers))
    elif after is not None:
        steps = steps.filter(number__gt=after)
    elif numbers:
        steps = steps.filter(number__in=numbers)
    if before is not None:
        steps = steps.filter(number__lt=before)
    steps = steps.select_related("tool").prefetch_related("approvals__decided_by")
    if limit is None:
        return list(steps.order_by("number"))
    return list(reversed(steps.order_by("-number")[:limit]))


TOOL_CALLS_SHOWN = 50


def tools_for_list() -> QuerySet[Tool]:
    """Each tool with its grants, calls and last call. The calls are counted and the
    last found per tool in subqueries over the (tool, created_at) index: a join of the
    grants with every step ever recorded grows with the trail (3.7 s at 1,000,000
    steps)."""
    steps = Step.objects.filter(tool=OuterRef("pk")).order_by()
    return Tool.objects.annotate(
        task_count=Count("grants", distinct=True),
        calls=Subquery(steps.values("tool").annotate(n=Count("pk")).values("n")[:1]),
        last_call=Subquery(steps.order_by("-created_at").values("created_at")[:1]),
    ).order_by("name")


def tool_for_detail(name: str) -> Tool:
    return Tool.objects.prefetch_related("grants__task", "grants__rules").get(name=name)


def tool_recent_calls(tool: Tool) -> list[Step]:
    return list(
        Step.objects.filter(tool=tool)
        .select_related("run__task")
        .order_by("-created_at")[:TOOL_CALLS_SHOWN]
    )


# The figures of a tool's page are over its latest calls: what it does now, at a cost
# that does not grow with every call it ever made.
TOOL_FIGURES_CALLS = 1000


def tool_call_figures(tool: Tool) -> dict:
    """Outcomes of the tool's latest TOOL_FIGURES_CALLS calls and their mean latency,
    and how many calls it has had in all."""
    latest = Step.objects.filter(
        pk__in=Step.objects.filter(tool=tool)
        .order_by("-created_at", "-pk")
        .values("pk")[:TOOL_FIGURES_CALLS]
    )
    figures = latest.aggregate(
        counted=Count("pk"),
        succeeded=Count("pk", filter=Q(status=StepStatus.SUCCEEDED)),
        failed=Count("pk", filter=Q(status=StepStatus.FAILED)),
        refused=Count("pk", filter=Q(status=StepStatus.REFUSED)),
        mean_ms=Avg("duration_ms"),
    )
    figures["total"] = Step.objects.filter(tool=tool).count()
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
