from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlencode, urlsplit

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import replace_url, trigger_client_event

from agentops.bad_input import BadInput, id_parse, id_refusal
from agentops.http import see_other
from approvals import selectors
from approvals.forms import GROUP_NONE, RISKS, DecisionForm, InboxFilterForm, ReassignForm
from approvals.models import Approval, ApprovalKind
from approvals.selectors import INBOX_PAGE_SIZE, InboxFilters
from approvals.services import (
    BULK_EFFECTS,
    DecisionError,
    approval_decide,
    approval_reassign,
    approvals_bulk_approve,
    groups_deciding,
)

# The list's short names for the kinds; the detail says each in full.
KIND_SHORT = {
    ApprovalKind.ACTION: "action",
    ApprovalKind.UNKNOWN_OUTCOME: "unknown outcome",
    ApprovalKind.OUTCOME_REVIEW: "outcome review",
    ApprovalKind.BUDGET_EXTENSION: "budget",
    ApprovalKind.LOOP_REVIEW: "loop",
    ApprovalKind.QUESTION: "question",
}


@require_GET
@login_required
def inbox(request: HttpRequest) -> HttpResponse:
    """The inbox: a compact list of what waits beside the selected item's full context.
    One URL serves the page and each of its regions: htmx names the region it swaps
    (``HX-Target``), and only that region is read and rendered: the list polls for its
    rows, a row opens its item in the detail panel, the filters redraw both."""
    form = InboxFilterForm(request.GET)
    if not form.is_valid():
        return _inbox_refused(request, f"Not searched: {form.refusal()}")
    filters = _filters_from(form.cleaned_data)
    page_number = form.cleaned_data["page"]
    item_id = form.cleaned_data["item"]
    region = request.htmx.target if request.htmx else None
    if region == "inbox-list":
        context = _list_context(request, filters, page_number, item_id)
        return render(request, "approvals/inbox.html#inbox-list", context)
    if region == "inbox-detail" and item_id is not None:
        context = {**_base_context(request, filters), **_detail_context(request, item_id)}
        return render(request, "approvals/inbox.html#inbox-detail", context)
    context = _inbox_context(request, filters, page_number, item_id)
    status = 404 if context["missing_item"] else 200
    if region == "triage":
        # htmx swaps no 4xx: an item that is gone is said inside the panel.
        return render(request, "approvals/inbox.html#triage", context)
    return render(request, "approvals/inbox.html", context, status=status)


def _filters_from(cleaned: dict) -> InboxFilters:
    return InboxFilters(
        kind=cleaned["kind"],
        task=cleaned["task"],
        group=cleaned["group"],
        risk=cleaned["risk"],
        search=cleaned["q"],
    )


def _inbox_refused(request: HttpRequest, said: str) -> HttpResponse:
    """The inbox, unfiltered, with why the request was refused: a 400 (for htmx a 200
    with the refusal inside the swapped region, as htmx swaps no 4xx)."""
    if request.htmx:
        context = {**_inbox_context(request, InboxFilters(), 1, None), "refusal": said}
        return render(request, "approvals/inbox.html#triage", context)
    messages.error(request, said)
    return render(
        request,
        "approvals/inbox.html",
        _inbox_context(request, InboxFilters(), 1, None),
        status=400,
    )


def _base_context(request: HttpRequest, filters: InboxFilters) -> dict:
    return {
        "filters": filters,
        "can_decide": request.user.has_perm("approvals.decide_approval"),
        "in_inbox": True,
    }


def _filters_query(filters: InboxFilters, **extra: object) -> str:
    """The filters as a query string (no leading "?"), for links that keep them."""
    params = {
        "kind": filters.kind,
        "task": filters.task,
        "group": filters.group,
        "risk": filters.risk,
        "q": filters.search,
        **extra,
    }
    return urlencode({name: value for name, value in params.items() if value})


def _list_context(
    request: HttpRequest, filters: InboxFilters, page_number: int, selected_id: int | None
) -> dict:
    """The list region: one page of rows and how many match. Only the rows' own fields
    are read (``selectors.inbox_rows``). A page past the last shows the last: the list
    shrinks as items are decided."""
    pending = selectors.inbox_pending(request.user, filters)
    counts = selectors.inbox_counts(pending, request.user)
    pages = max(1, -(-counts["listed"] // INBOX_PAGE_SIZE))
    number = min(page_number, pages)
    start = (number - 1) * INBOX_PAGE_SIZE
    rows = list(selectors.inbox_rows(pending)[start : start + INBOX_PAGE_SIZE])
    now = timezone.now()
    for row in rows:
        row.kind_short = KIND_SHORT[row.kind]
        row.age = span_short(now - row.created_at)
        row.deadline = span_short(row.expires_at - now) if row.expires_at else ""
        # The bulk approval's own rules (approvals_bulk_approve), so no box is offered
        # that it would refuse.
        row.bulkable = (
            row.kind == ApprovalKind.ACTION and row.side_effect in BULK_EFFECTS and not row.barred
        )
    return {
        **_base_context(request, filters),
        "rows": rows,
        "listed": counts["listed"],
        "barred": counts["barred"],
        "for_you": counts["listed"] - counts["barred"],
        "page_number": number,
        "pages": pages,
        "first_shown": start + 1 if rows else 0,
        "last_shown": start + len(rows),
        "bulk_possible": any(row.bulkable for row in rows),
        "selected_id": selected_id if selected_id is not None else (rows[0].pk if rows else None),
        "query": _filters_query(filters),
        "page_query": _filters_query(filters, page=number if number > 1 else ""),
        "previous_query": _filters_query(filters, page=number - 1 if number > 2 else ""),
        "next_query": _filters_query(filters, page=number + 1),
    }


def span_short(span: timedelta) -> str:
    """A span in the largest unit that fits, for a column a few characters wide:
    "40 s", "12 min", "5 h", "3 d" (Django's timesince says "2 hours, 3 minutes")."""
    seconds = int(span.total_seconds())
    if seconds < 0:
        return "past"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _detail_context(request: HttpRequest, item_id: int | None) -> dict:
    """The detail region: the item in full, or that it is not to be seen."""
    selected = None
    if item_id is not None:
        # Not visible to this person (or no such approval): said in the panel.
        with contextlib.suppress(Approval.DoesNotExist):
            selected = selectors.approval_for_user(request.user, item_id)
    return {
        "selected": selected,
        "missing_item": item_id if item_id is not None and selected is None else None,
        "groups": groups_deciding(),
    }


def _inbox_context(
    request: HttpRequest, filters: InboxFilters, page_number: int, item_id: int | None
) -> dict:
    """The whole page: list, detail (the named item, else the first listed), filters'
    choices and the decided approvals."""
    context = _list_context(request, filters, page_number, item_id)
    context.update(_detail_context(request, context["selected_id"]))
    context.update(
        decided=selectors.approvals_decided_for(request.user, filters=filters),
        kinds=ApprovalKind.choices,
        risks=RISKS,
        tasks=selectors.inbox_tasks_for(request.user),
        group_none=GROUP_NONE,
    )
    return context


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
    back = _next_url(request)
    if request.htmx and request.htmx.target == "inbox-detail":
        # From the inbox's detail panel: decided, the next item of the same list opens.
        return _detail_after_decision(request, approval, refused=refused)
    if request.htmx:
        # The item swaps in place either way (the run page's card too); a refusal is
        # shown inside it.
        return _item(request, approval, refused=refused, next=back)
    if error:
        return _refused(request, approval, f"Not decided: {error}", status, refused=refused)
    approval.refresh_from_db()
    edits = " with edits" if approval.edited_arguments is not None else ""
    messages.success(request, f"{approval.get_status_display()}{edits}: {approval.tool_name}.")
    return see_other(back or "approvals:inbox")


def _next_url(request: HttpRequest) -> str:
    """Where the form asked to go back to (the run page decides in place), if it is a
    URL of this site; "" otherwise, so no form can send a person elsewhere."""
    url = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(
        url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return url if url and safe and url.startswith("/") else ""


def _filters_of_page(request: HttpRequest) -> InboxFilters:
    """The filters of the inbox page the htmx request came from (htmx sends its URL),
    so the item opened next is the next one in the list the person sees."""
    current = urlsplit(request.headers.get("HX-Current-URL", ""))
    form = InboxFilterForm(QueryDict(current.query))
    return _filters_from(form.cleaned_data) if form.is_valid() else InboxFilters()


def _detail_after_decision(
    request: HttpRequest, approval: Approval, *, refused: dict | None
) -> HttpResponse:
    """The inbox's detail panel after a decision: refused, the item again with why and
    what was typed; decided, a line saying so above the next item of the list, whose
    id the address bar takes. The list refreshes itself on ``approvals-changed``."""
    approval.refresh_from_db()
    filters = _filters_of_page(request)
    context = {**_base_context(request, filters), "groups": groups_deciding()}
    if refused or approval.is_pending:
        context.update(selected=approval, refused=refused)
        response = render(request, "approvals/inbox.html#inbox-detail", context)
        return trigger_client_event(response, "approvals-changed")
    following = selectors.approval_following(request.user, filters, approval)
    context.update(just_decided=approval, selected=following)
    response = render(request, "approvals/inbox.html#inbox-detail", context)
    query = _filters_query(filters, item=following.pk if following else "")
    replace_url(response, f"{reverse('approvals:inbox')}{'?' if query else ''}{query}")
    return trigger_client_event(response, "approvals-changed")


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
    back = _next_url(request)
    if request.htmx:
        return _item(request, approval, reassign_refused=refused, reassigned=not error, next=back)
    if error:
        return _refused(request, approval, refused["error"], status, reassign_refused=refused)
    approval.refresh_from_db()
    messages.success(request, f"Reassigned to {approval.group}.")
    return see_other(back or "approvals:inbox")


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
    """The approval's card as it stands now, to swap in place; the count refreshes."""
    approval.refresh_from_db()
    response = render(
        request,
        "approvals/_approval.html",
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
        return see_other(_next_url(request) or "approvals:inbox")
    page = _inbox_context(request, InboxFilters(), 1, approval.pk)
    return render(request, "approvals/inbox.html", {**page, **context}, status=status)


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
    # Back to the list as it was filtered, when the form says where that is.
    return see_other(_next_url(request) or "approvals:inbox")
