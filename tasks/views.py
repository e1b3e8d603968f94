from __future__ import annotations

import json
import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event

from agentops.http import see_other
from agentops.states import InvalidTransition
from tasks import selectors
from tasks.forms import RunStartForm
from tasks.models import Run, RunStatus, Task, Tool
from tasks.services import RunStartError, run_cancel, run_start


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
    context = {
        "task": task,
        "form": form,
        "runs": selectors.runs_for_list(task_slug=task.slug)[:20],
        "version": task.versions.order_by("-number").first(),
    }
    return render(request, "tasks/detail.html", context, status=status)


@require_POST
@login_required
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
    status = request.GET.get("status", "")
    if status and status not in RunStatus.values:
        status = ""
    runs = selectors.runs_for_list(status=status)
    template = "runs/list.html#run-rows" if request.htmx else "runs/list.html"
    return render(request, template, {"runs": runs, "status": status, "statuses": RunStatus.values})


def _run_or_404(run_id: uuid.UUID) -> Run:
    try:
        return selectors.run_for_detail(run_id)
    except Run.DoesNotExist:
        raise Http404("no such run") from None


@require_GET
@login_required
def run_detail(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    context = {"run": run, "steps": selectors.steps_for_run(run)}
    if not request.htmx:
        return render(request, "runs/detail.html", context)
    response = render(request, "runs/detail.html#run-live", context)
    if request.GET.get("seen") != run.status:
        # The run moved since the page last looked: other panels (the inbox count)
        # refresh on this event instead of polling on their own.
        trigger_client_event(response, "approvals-changed")
    return response


@require_POST
@login_required
def run_cancel_view(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    try:
        run_cancel(run=run, user=request.user)
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
