"""Pages for governed configuration: the changes that wait for a second person, and
deciding them (tasks.governance)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from agentops.http import see_other
from tasks import selectors
from tasks.autonomy import task_trail_uuid
from tasks.governance import (
    GovernanceError,
    config_change_decide,
    decide_permissions,
    may_decide,
    tool_trail_uuid,
)
from tasks.models import ConfigChange, Task, Tool

REASON_MAX = 500


def _change_or_404(change_id: int) -> ConfigChange:
    try:
        return selectors.config_change_for_detail(change_id)
    except ConfigChange.DoesNotExist:
        raise Http404(f"no configuration change #{change_id}") from None


@require_GET
@login_required
def config_changes_waiting(request: HttpRequest) -> HttpResponse:
    tool = request.GET.get("tool", "")
    changes = selectors.config_changes_waiting(tool_name=tool)
    return render(request, "tasks/changes.html", {"changes": changes, "tool": tool})


@require_GET
@login_required
def task_config_changes(request: HttpRequest, slug: str) -> HttpResponse:
    """The task's changes that widen: the task page loads this as its panel."""
    try:
        task = Task.objects.get(slug=slug)
    except Task.DoesNotExist:
        raise Http404(f"no task {slug!r}") from None
    context = {
        "task": task,
        "changes": selectors.config_changes_for_task(task),
        "trail": task_trail_uuid(task),
    }
    template = (
        "tasks/task_changes.html#config-changes" if request.htmx else "tasks/task_changes.html"
    )
    return render(request, template, context)


@require_GET
@login_required
def config_change_detail(request: HttpRequest, change_id: int) -> HttpResponse:
    change = _change_or_404(change_id)
    trail = task_trail_uuid(change.task) if change.task_id else tool_trail_uuid(change.tool_id)
    context = {
        "change": change,
        "lines": change.summary.splitlines(),
        "may_decide": may_decide(change, request.user),
        "is_requester": change.requested_by_id == request.user.pk,
        "permissions": decide_permissions(change),
        "trail": trail,
    }
    return render(request, "tasks/change.html", context)


@require_POST
@login_required
def config_change_decide_view(request: HttpRequest, change_id: int) -> HttpResponse:
    change = _change_or_404(change_id)
    decision = request.POST.get("decision", "")
    if decision not in ("confirm", "reject"):
        messages.error(request, "Not decided: choose confirm or reject.")
        return see_other("tasks:config_change", change_id=change.pk)
    try:
        change = config_change_decide(
            change=change,
            user=request.user,
            confirm=decision == "confirm",
            reason=request.POST.get("reason", "")[:REASON_MAX],
        )
    except PermissionDenied:
        raise
    except GovernanceError as error:
        messages.error(request, f"Not decided: {error}.")
    else:
        if change.status == ConfigChange.Status.APPLIED:
            messages.success(request, f"Confirmed: change #{change.pk} is applied.")
        else:
            messages.success(request, f"Rejected: change #{change.pk} will not be applied.")
    return see_other("tasks:config_change", change_id=change.pk)


@require_GET
@login_required
def tool_trail(request: HttpRequest, name: str) -> HttpResponse:
    """A tool's trail: every change made to it, on the trail's own page."""
    tool = Tool.objects.filter(name=name).only("pk").first()
    if tool is None:
        raise Http404(f"no tool {name!r}")
    return see_other("runs:lineage:run", run_id=tool_trail_uuid(tool))
