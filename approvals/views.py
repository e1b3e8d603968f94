from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event

from agentops.http import see_other
from approvals import selectors
from approvals.forms import DecisionForm, ReassignForm
from approvals.models import Approval, ApprovalKind
from approvals.services import (
    BULK_EFFECTS,
    DecisionError,
    approval_decide,
    approval_reassign,
    approvals_bulk_approve,
    groups_deciding,
)


@require_GET
@login_required
def inbox(request: HttpRequest) -> HttpResponse:
    return render(request, "approvals/inbox.html", _inbox_context(request))


def _inbox_context(request: HttpRequest) -> dict:
    search = request.GET.get("q", "").strip()
    pending = list(selectors.approvals_pending_for(request.user))
    return {
        "pending": pending,
        # Offer bulk approval only where there is something it may take.
        "bulk_possible": any(
            approval.kind == ApprovalKind.ACTION
            and approval.side_effect in BULK_EFFECTS
            and not approval.barred
            for approval in pending
        ),
        "decided": selectors.approvals_decided_for(request.user, search=search),
        "search": search,
        "can_decide": request.user.has_perm("approvals.decide_approval"),
        "groups": groups_deciding(),
    }


@require_GET
@login_required
def inbox_count(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "base.html#inbox-count",
        {"inbox_count": selectors.inbox_count_for(request.user)},
    )


@require_POST
@login_required
def decide(request: HttpRequest, approval_id: int) -> HttpResponse:
    approval = _approval_or_404(request, approval_id)
    form = DecisionForm(request.POST, approval=approval)
    error = _attempt(
        form,
        lambda: approval_decide(approval=approval, user=request.user, **form.decision_arguments()),
    )
    # A refusal keeps what the person typed, so they can correct it rather than retype it.
    refused = None
    if error:
        refused = {
            "approval_id": approval.pk,
            "error": error,
            "arguments": form.data.get("arguments", ""),
            "result": form.data.get("result", ""),
        }
    if request.htmx:
        # The item swaps in place either way; a refusal is shown inside it.
        return _item(request, approval, refused=refused)
    if error:
        return _refused(request, approval, f"Not decided: {error}", refused=refused)
    approval.refresh_from_db()
    edits = " with edits" if approval.edited_arguments is not None else ""
    messages.success(request, f"{approval.get_status_display()}{edits}: {approval.tool_name}.")
    return see_other("approvals:inbox")


@require_POST
@login_required
def reassign(request: HttpRequest, approval_id: int) -> HttpResponse:
    """Hand a pending approval to another group. Afterwards this person may no longer
    see it: the item is swapped for a line that says where it went."""
    approval = _approval_or_404(request, approval_id)
    form = ReassignForm(request.POST)
    error = _attempt(
        form,
        lambda: approval_reassign(
            approval=approval,
            user=request.user,
            group=form.cleaned_data["group"],
            reason=form.cleaned_data["reason"],
        ),
    )
    # A refusal keeps what the person chose and typed, and says why beside it.
    refused = None
    if error:
        refused = {
            "approval_id": approval.pk,
            "error": f"Not reassigned: {error}",
            "group": form.data.get("group", ""),
            "reason": form.data.get("reason", ""),
        }
    if request.htmx:
        return _item(request, approval, reassign_refused=refused, reassigned=not error)
    if error:
        return _refused(request, approval, refused["error"], reassign_refused=refused)
    approval.refresh_from_db()
    messages.success(request, f"Reassigned to {approval.group}.")
    return see_other("approvals:inbox")


def _approval_or_404(request: HttpRequest, approval_id: int) -> Approval:
    try:
        return selectors.approval_for_user(request.user, approval_id)
    except Approval.DoesNotExist:
        raise Http404("no such approval, or you may not decide it") from None


def _attempt(form: Form, act: Callable[[], object]) -> str:
    """Do ``act`` if the form is valid: "" when it was done, else why not (the form's
    errors, or the service's refusal)."""
    if not form.is_valid():
        return " ".join(message for errors in form.errors.values() for message in errors)
    try:
        act()
    except DecisionError as refusal:
        return str(refusal)
    return ""


def _item(request: HttpRequest, approval: Approval, **context: object) -> HttpResponse:
    """The approval's item as it stands now, to swap in place; the count refreshes."""
    approval.refresh_from_db()
    response = render(
        request,
        "approvals/inbox.html#approval",
        {"approval": approval, "groups": groups_deciding(), **context},
    )
    return trigger_client_event(response, "approvals-changed")


def _refused(
    request: HttpRequest, approval: Approval, said: str, **context: object
) -> HttpResponse:
    """A refusal without HTMX: the inbox again, the item with the refusal and the
    person's text; or, if the item has left the inbox (decided or withdrawn meanwhile),
    the refusal said on top."""
    approval.refresh_from_db()
    if not approval.is_pending:
        messages.error(request, said)
        return see_other("approvals:inbox")
    return render(request, "approvals/inbox.html", {**_inbox_context(request), **context})


@require_POST
@login_required
def bulk_approve(request: HttpRequest) -> HttpResponse:
    ids = [int(value) for value in request.POST.getlist("ids") if value.isdigit()]
    visible = selectors.approvals_visible_to(request.user).filter(pk__in=ids)
    approved, refused = approvals_bulk_approve(
        approval_ids=list(visible.values_list("pk", flat=True)), user=request.user
    )
    if approved:
        messages.success(request, f"Approved {len(approved)}.")
    if refused:
        messages.error(request, "Not approved: " + "; ".join(refused) + ".")
    if not ids:
        messages.error(request, "Select the approvals to approve.")
    return see_other("approvals:inbox")
