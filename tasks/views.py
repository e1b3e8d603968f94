from __future__ import annotations

import json
import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import push_url

from agentops.bad_input import BadInput, bad_request, id_parse, id_refusal, text_refusal
from agentops.http import see_other
from agentops.states import InvalidTransition
from tasks import live, selectors
from tasks.autonomy import (
    DialError,
    autonomy_decide,
    autonomy_request,
    incident_flag,
    level_meaning,
    recommendation,
    task_trail_uuid,
    track_record,
)
from tasks.forms import RunStartForm
from tasks.models import AutonomyChange, AutonomyLevel, Run, RunStatus, Task, Tool
from tasks.run_list import RUN_STARTS, filters_from
from tasks.services import RunStartError, run_cancel, run_start
from triggers.models import Firing
from triggers.selectors import payload_shown, trigger_cards_for_task


@require_GET
@login_required
def task_list(request: HttpRequest) -> HttpResponse:
    return render(request, "tasks/list.html", {"tasks": selectors.tasks_for_list()})


def _task_or_404(slug: str) -> Task:
    try:
        return selectors.task_for_detail(slug)
    except Task.DoesNotExist:
        raise Http404(f"no task {slug!r}") from None


@require_GET
@login_required
def task_detail(request: HttpRequest, slug: str) -> HttpResponse:
    task = _task_or_404(slug)
    form = RunStartForm(initial={"input": json.dumps(task.example_input or {}, indent=2)})
    return _task_page(request, task, form)


def _task_page(
    request: HttpRequest, task: Task, form: RunStartForm, status: int = 200
) -> HttpResponse:
    record = track_record(task)
    context = {
        "task": task,
        "form": form,
        "runs": selectors.runs_for_list(task_slug=task.slug)[:20],
        "version": task.versions.order_by("-number").first(),
        "record": record,
        "recommendation": recommendation(task, record),
        "level_meaning": level_meaning(task.autonomy_level, task.confidence_threshold),
        "changes": task.autonomy_changes.select_related("requested_by", "confirmed_by")[:10],
        "levels": AutonomyLevel.choices,
        "trail": task_trail_uuid(task),
        "triggers": trigger_cards_for_task(task, base_url=request.build_absolute_uri("/")),
    }
    return render(request, "tasks/detail.html", context, status=status)


def _posted_text(request: HttpRequest, name: str, *, limit: int) -> tuple[str, str]:
    """A free-text field of the POST, and why it cannot be taken ("" if it can): text
    that cannot be stored (a NUL) or longer than ``limit`` is refused, not cut."""
    value = request.POST.get(name, "")
    refusal = text_refusal(value, field=name)
    if not refusal and len(value) > limit:
        refusal = f"{name}: longer than {limit:,} characters ({len(value):,})"
    return value, refusal


# The widest a reason or a note is taken: a paragraph, not a document.
TEXT_LIMIT = 2000


def _task_refused(request: HttpRequest, task: Task, said: str) -> HttpResponse:
    """The task page again, with why the request changed nothing: a 400."""
    messages.error(request, said)
    form = RunStartForm(initial={"input": json.dumps(task.example_input or {}, indent=2)})
    return _task_page(request, task, form, status=400)


def _run_refused(request: HttpRequest, run: Run, said: str) -> HttpResponse:
    """The run page again, with why the request changed nothing: a 400."""
    messages.error(request, said)
    return render(request, "runs/detail.html", _run_context(run, user=request.user), status=400)


def _run_context(run: Run, *, user, before: int | None = None) -> dict:
    """The run page: the latest steps (or, with ``before``, the page of steps before
    that number), and what the live feed starts from (tasks.live)."""
    seq = live.trail_head(run.pk)
    steps = selectors.steps_for_run(run, before=before, limit=selectors.STEPS_SHOWN)
    waiting = live.run_waiting_ids(run)
    cursor = live.page_cursor(run, steps, seq=seq, waiting=waiting)
    context = {
        "run": run,
        "steps": steps,
        "earlier": steps[0].number if steps and steps[0].number > 1 else None,
        "later": before is not None,
        "in_flight": live.in_flight(run, steps) if before is None else None,
        "first_waiting": waiting[0] if waiting else None,
        "now": timezone.now(),
        "live_cursor": cursor,
        # A page of earlier steps stands still; the latest steps follow the run while
        # it is live or a step shown may still change.
        "live_follow": before is None and (live.following(run, waiting) or bool(cursor.open_steps)),
        **live.run_deciding(run, user=user, waiting=waiting),
    }
    firing = _firing_of(run)
    if firing is not None:
        context["firing"] = firing
        context["payload"] = payload_shown(firing.payload)
    return context


def _firing_of(run: Run) -> Firing | None:
    """The firing that started the run (fetched with it), or None."""
    try:
        return run.firing
    except Run.firing.RelatedObjectDoesNotExist:
        return None


@require_POST
@login_required
@permission_required("tasks.start_run", raise_exception=True)
def task_run(request: HttpRequest, slug: str) -> HttpResponse:
    task = _task_or_404(slug)
    form = RunStartForm(request.POST)
    if form.is_valid():
        try:
            run = run_start(task=task, run_input=form.cleaned_data["input"], user=request.user)
        except RunStartError as error:
            form.add_error("input", str(error))
        else:
            messages.success(request, f"Run started: {task.name}.")
            return see_other("runs:detail", run_id=run.pk)
    return _task_page(request, task, form, status=400)


@require_GET
@login_required
def run_list(request: HttpRequest) -> HttpResponse:
    """The latest runs, a page at a time, filtered by status, how they started, the
    trigger, the task, the model, the day they were created and text in their input;
    the filters and the page live in the URL (GET), so a filtered list can be linked
    and its rows refresh with the same filters."""
    filters = filters_from(request.GET)
    if filters.refusals and not request.htmx:
        said = "; ".join(filters.refusals)
        messages.warning(
            request,
            f"{said}: the other filters apply."
            if filters.any()
            else f"{said}: all runs are shown.",
        )
    paginator = Paginator(selectors.runs_for_list(filters), selectors.RUNS_PER_PAGE)
    page = paginator.get_page(request.GET.get("page"))
    now = timezone.now()
    for run in page:
        run.input_shown = _input_shown(run.input_head)
        end = run.finished_at or (now if run.is_live and run.started_at else None)
        run.wall_seconds = (
            (end - run.started_at).total_seconds() if end and run.started_at else None
        )
    query = filters.query()
    context = {
        "runs": page,
        "page": page,
        "filters": filters,
        "statuses": RunStatus.values,
        "starts": RUN_STARTS,
        "query": query,
        "page_query": f"{query}&page={page.number}" if query else f"page={page.number}",
        **selectors.run_list_choices(),
    }
    # The filters push their URL: going back to it restores the whole page.
    partial = request.htmx and not request.htmx.history_restore_request
    if not partial:
        return render(request, "runs/list.html", context)
    response = render(request, "runs/list.html#run-rows", context)
    if request.htmx.trigger == "run-filters":
        # The URL the filters push is the filters as the list took them, not the form's
        # every field (empty ones too); the rows' own refresh pushes nothing.
        push_url(response, f"{request.path}?{query}" if query else request.path)
    return response


def _input_shown(head: str | None) -> str:
    """A run's input as the list shows it: its JSON's start, "…" where it goes on."""
    if not head or head == "{}":
        return ""
    if len(head) > selectors.INPUT_SHOWN:
        return head[: selectors.INPUT_SHOWN] + "…"
    return head


def _run_or_404(run_id: uuid.UUID) -> Run:
    try:
        return selectors.run_for_detail(run_id)
    except Run.DoesNotExist:
        raise Http404("no such run") from None


@require_GET
@login_required
def run_detail(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    before = None
    if raw := request.GET.get("before", ""):
        try:
            before = id_parse(raw, field="before", what="a step number")
        except BadInput as error:
            return bad_request(str(error))
    return render(request, "runs/detail.html", _run_context(run, user=request.user, before=before))


@require_POST
@login_required
@permission_required("tasks.cancel_run", raise_exception=True)
def run_cancel_view(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    why, refusal = _posted_text(request, "why", limit=300)
    if refusal:
        return _run_refused(request, run, f"The run was not cancelled: {refusal}.")
    try:
        run_cancel(run=run, user=request.user, why=why)
    except InvalidTransition as error:
        messages.error(request, f"The run was not cancelled: {error}.")
    else:
        messages.success(request, "Run cancelled.")
    return see_other("runs:detail", run_id=run.pk)


@require_GET
@login_required
def tool_list(request: HttpRequest) -> HttpResponse:
    return render(request, "tools/list.html", {"tools": selectors.tools_for_list()})


@require_GET
@login_required
def tool_detail(request: HttpRequest, name: str) -> HttpResponse:
    refusal = text_refusal(name, field="tool name")
    if refusal:  # a NUL would reach the query: PostgreSQL refuses it, a 500
        return bad_request(refusal)
    try:
        tool = selectors.tool_for_detail(name)
    except Tool.DoesNotExist:
        raise Http404(f"no tool {name!r}") from None
    context = {
        "tool": tool,
        "calls": selectors.tool_recent_calls(tool),
        "figures": selectors.tool_call_figures(tool),
    }
    return render(request, "tools/detail.html", context)


@require_POST
@login_required
@permission_required("tasks.change_task", raise_exception=True)
def task_autonomy(request: HttpRequest, slug: str) -> HttpResponse:
    task = _task_or_404(slug)
    try:
        # int() takes " 2", "²" is refused, and a 5,000-digit number is a ValueError too.
        level = AutonomyLevel(int(request.POST.get("level", "")))
    except ValueError:
        levels = ", ".join(label for _, label in AutonomyLevel.choices)
        return _task_refused(
            request, task, f"The dial did not move: choose one of its levels: {levels}."
        )
    reason, refusal = _posted_text(request, "reason", limit=TEXT_LIMIT)
    if refusal:
        return _task_refused(request, task, f"The dial did not move: {refusal}.")
    try:
        change = autonomy_request(task=task, to_level=level, user=request.user, reason=reason)
    except DialError as error:
        messages.error(request, f"The dial did not move: {error}.")
    else:
        if change.status == AutonomyChange.Status.PENDING:
            messages.success(
                request,
                f"Asked to raise {task.name} to {change.get_to_level_display()}: "
                "a second person must confirm it.",
            )
        else:
            messages.success(request, f"{task.name} is now at {change.get_to_level_display()}.")
    return see_other("tasks:detail", slug=task.slug)


@require_POST
@login_required
@permission_required("tasks.change_task", raise_exception=True)
def autonomy_change_decide(request: HttpRequest, change_id: int) -> HttpResponse:
    out_of_range = id_refusal(change_id, what="change id")
    if out_of_range:
        return out_of_range
    try:
        change = AutonomyChange.objects.select_related("task").get(pk=change_id)
    except AutonomyChange.DoesNotExist:
        raise Http404("no such change") from None
    try:
        autonomy_decide(
            change=change, user=request.user, confirm=request.POST.get("decision") == "confirm"
        )
    except DialError as error:
        messages.error(request, f"Not decided: {error}.")
    else:
        messages.success(request, "Decided.")
    return see_other("tasks:detail", slug=change.task.slug)


@require_POST
@login_required
@permission_required("tasks.add_incident", raise_exception=True)
def run_incident(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    note, refusal = _posted_text(request, "note", limit=TEXT_LIMIT)
    if refusal:
        return _run_refused(request, run, f"Not flagged: {refusal}.")
    try:
        incident_flag(run=run, user=request.user, note=note)
    except DialError as error:
        messages.error(request, f"Not flagged: {error}.")
    else:
        messages.success(request, "Incident flagged; the task's autonomy steps down if it can.")
    return see_other("runs:detail", run_id=run.pk)
