from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
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
    try:
        approval = selectors.approval_for_user(request.user, approval_id)
    except Approval.DoesNotExist:
        raise Http404("no such approval, or you may not decide it") from None
    form = DecisionForm(request.POST, approval=approval)
    error = ""
    if form.is_valid():
        try:
            approval = approval_decide(
                approval=approval, user=request.user, **form.decision_arguments()
            )
        except DecisionError as refusal:
            error = str(refusal)
    else:
        error = " ".join(message for errors in form.errors.values() for message in errors)
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
        approval.refresh_from_db()
        response = render(
            request,
            "approvals/inbox.html#approval",
            {"approval": approval, "refused": refused, "groups": groups_deciding()},
        )
        return trigger_client_event(response, "approvals-changed")
    if not error:
        edits = " with edits" if approval.edited_arguments is not None else ""
        messages.success(request, f"{approval.get_status_display()}{edits}: {approval.tool_name}.")
        return see_other("approvals:inbox")
    approval.refresh_from_db()
    if not approval.is_pending:
        # Decided or withdrawn meanwhile: the item has left the inbox, so say it on top.
        messages.error(request, f"Not decided: {error}")
        return see_other("approvals:inbox")
    # Not a redirect: the item is shown again with the refusal and the person's text.
    return render(request, "approvals/inbox.html", {**_inbox_context(request), "refused": refused})


@require_POST
@login_required
def reassign(request: HttpRequest, approval_id: int) -> HttpResponse:
    """Hand a pending approval to another group. Afterwards this person may no longer
    see it: the item is swapped for a line that says where it went."""
    try:
        approval = selectors.approval_for_user(request.user, approval_id)
    except Approval.DoesNotExist:
        raise Http404("no such approval, or you may not decide it") from None
    form = ReassignForm(request.POST)
    error = ""
    if form.is_valid():
        try:
            approval = approval_reassign(
                approval=approval,
                user=request.user,
                group=form.cleaned_data["group"],
                reason=form.cleaned_data["reason"],
            )
        except DecisionError as refusal:
            error = str(refusal)
    else:
        error = " ".join(message for errors in form.errors.values() for message in errors)
    # A refusal keeps what the person chose and typed, and says why beside it.
    refused = (
        {
            "approval_id": approval.pk,
            "error": f"Not reassigned: {error}",
            "group": form.data.get("group", ""),
            "reason": form.data.get("reason", ""),
        }
        if error
        else None
    )
    if request.htmx:
        approval = selectors.with_four_eyes(
            Approval.objects.select_related("run__task", "step__tool", "group"), request.user
        ).get(pk=approval.pk)
        context = {
            "approval": approval,
            "groups": groups_deciding(),
            "reassign_refused": refused,
            "reassigned": not error,
        }
        response = render(request, "approvals/inbox.html#approval", context)
        return trigger_client_event(response, "approvals-changed")
    if not error:
        messages.success(request, f"Reassigned to {approval.group}.")
        return see_other("approvals:inbox")
    approval.refresh_from_db()
    if not approval.is_pending:
        # Decided meanwhile: the item has left the inbox, so say it on top.
        messages.error(request, f"Not reassigned: {error}")
        return see_other("approvals:inbox")
    return render(
        request, "approvals/inbox.html", {**_inbox_context(request), "reassign_refused": refused}
    )


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
