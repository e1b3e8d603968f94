"""Pages for governed configuration: the changes that wait for a second person, and
deciding them (tasks.governance)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from agentops.bad_input import bad_request, id_refusal, text_refusal
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

# The widest a reason is taken (refused past it, not cut), as the dial's is.
REASON_MAX = 2000


def _change_or_404(change_id: int) -> ConfigChange:
    try:
        return selectors.config_change_for_detail(change_id)
    except ConfigChange.DoesNotExist:
        raise Http404(f"no configuration change #{change_id}") from None


@require_GET
@login_required
def config_changes_waiting(request: HttpRequest) -> HttpResponse:
    tool = request.GET.get("tool", "")
    refusal = text_refusal(tool, field="tool")
    if refusal:  # a NUL would reach the query: PostgreSQL refuses it, a 500
        return bad_request(refusal)
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
    out_of_range = id_refusal(change_id, what="change id")
    if out_of_range:
        return out_of_range
    return _change_page(request, _change_or_404(change_id))


def _change_page(request: HttpRequest, change: ConfigChange, status: int = 200) -> HttpResponse:
    trail = task_trail_uuid(change.task) if change.task_id else tool_trail_uuid(change.tool_id)
    context = {
        "change": change,
        "lines": change.summary.splitlines(),
        "may_decide": may_decide(change, request.user),
        "is_requester": change.requested_by_id == request.user.pk,
        "permissions": decide_permissions(change),
        "trail": trail,
    }
    return render(request, "tasks/change.html", context, status=status)


@require_POST
@login_required
def config_change_decide_view(request: HttpRequest, change_id: int) -> HttpResponse:
    out_of_range = id_refusal(change_id, what="change id")
    if out_of_range:
        return out_of_range
    change = _change_or_404(change_id)
    if not may_decide(change, request.user):  # the service checks it again, locked
        raise PermissionDenied(
            "deciding this change takes " + ", ".join(decide_permissions(change))
        )
    decision = request.POST.get("decision", "")
    reason = request.POST.get("reason", "")
    refusal = text_refusal(reason, field="reason")
    if not refusal and len(reason) > REASON_MAX:
        refusal = f"reason: longer than {REASON_MAX:,} characters ({len(reason):,})"
    if decision not in ("confirm", "reject"):
        refusal = "decision: choose confirm or reject"
    if refusal:
        messages.error(request, f"Not decided: {refusal.rstrip('.')}.")
        return _change_page(request, change, status=400)
    try:
        change = config_change_decide(
            change=change, user=request.user, confirm=decision == "confirm", reason=reason
        )
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
    refusal = text_refusal(name, field="tool name")
    if refusal:
        return bad_request(refusal)
    tool = Tool.objects.filter(name=name).only("pk").first()
    if tool is None:
        raise Http404(f"no tool {name!r}")
    return see_other("runs:lineage:run", run_id=tool_trail_uuid(tool))
