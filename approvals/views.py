from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event

from agentops.bad_input import BadInput, id_parse, id_refusal, text_refusal
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
    refusal = text_refusal(request.GET.get("q", ""), field="q")
    if refusal:
        return _inbox_refused(request, f"Not searched: {refusal}")
    return render(request, "approvals/inbox.html", _inbox_context(request))


def _inbox_refused(request: HttpRequest, said: str) -> HttpResponse:
    """The inbox, unsearched, with why the request was refused: a 400."""
    messages.error(request, said)
    return render(request, "approvals/inbox.html", _inbox_context(request, search=""), status=400)


def _inbox_context(request: HttpRequest, *, search: str | None = None) -> dict:
    if search is None:
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
    out_of_range = id_refusal(approval_id, what="approval id")
    if out_of_range:
        return out_of_range
    approval = _approval_or_404(request, approval_id)
    form = DecisionForm(request.POST, approval=approval)
    error, status = _attempt(
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
        return _refused(request, approval, f"Not decided: {error}", status, refused=refused)
    approval.refresh_from_db()
    edits = " with edits" if approval.edited_arguments is not None else ""
    messages.success(request, f"{approval.get_status_display()}{edits}: {approval.tool_name}.")
    return see_other("approvals:inbox")


@require_POST
@login_required
def reassign(request: HttpRequest, approval_id: int) -> HttpResponse:
    """Hand a pending approval to another group. Afterwards this person may no longer
    see it: the item is swapped for a line that says where it went."""
    out_of_range = id_refusal(approval_id, what="approval id")
    if out_of_range:
        return out_of_range
    approval = _approval_or_404(request, approval_id)
    form = ReassignForm(request.POST)
    error, status = _attempt(
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
        return _refused(request, approval, refused["error"], status, reassign_refused=refused)
    approval.refresh_from_db()
    messages.success(request, f"Reassigned to {approval.group}.")
    return see_other("approvals:inbox")


def _approval_or_404(request: HttpRequest, approval_id: int) -> Approval:
    try:
        return selectors.approval_for_user(request.user, approval_id)
    except Approval.DoesNotExist:
        raise Http404("no such approval, or you may not decide it") from None


def _attempt(form: Form, act: Callable[[], object]) -> tuple[str, int]:
    """Do ``act`` if the form is valid: ("", 200) when it was done, else why not and the
    status for a page that says so: 400 for input the form refuses, 200 for a refusal of
    the service (the page shows the decision could not be taken as things stand)."""
    if not form.is_valid():
        return " ".join(message for errors in form.errors.values() for message in errors), 400
    try:
        act()
    except DecisionError as refusal:
        return str(refusal), 200
    return "", 200


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
    request: HttpRequest, approval: Approval, said: str, status: int, **context: object
) -> HttpResponse:
    """A refusal without HTMX: the inbox again, the item with the refusal and the
    person's text, with ``status``; or, if the item has left the inbox (decided or
    withdrawn meanwhile), the refusal said on top. (With HTMX the item is swapped in
    with a 200: htmx swaps no 4xx answer by default.)"""
    approval.refresh_from_db()
    if not approval.is_pending:
        messages.error(request, said)
        return see_other("approvals:inbox")
    return render(
        request, "approvals/inbox.html", {**_inbox_context(request), **context}, status=status
    )


@require_POST
@login_required
def bulk_approve(request: HttpRequest) -> HttpResponse:
    try:
        ids = [
            id_parse(value, field="ids", what="an approval id")
            for value in request.POST.getlist("ids")
        ]
    except BadInput as error:
        # One bad id refuses the lot: approving the rest would act on a request that
        # was not what the person meant to send.
        return _inbox_refused(request, f"Nothing was approved: {error}.")
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
