"""The inbox built for triage, through real HTTP: a compact list of what waits beside
the selected item; filters, search, page and selection in the URL; the regions htmx
swaps (the list's rows, the detail panel); deciding from the panel opens the next
item; bulk approval under its rules; the decision card on its own, as the run page
uses it; bad input refused with a sentence; the page's query count pinned."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from html import unescape

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.template.loader import render_to_string
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from approvals.models import Approval, ApprovalKind, ApprovalStatus
from approvals.services import groups_deciding
from tasks.models import RunStatus, Task
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.approvals.conftest import person
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

INBOX = reverse("approvals:inbox")
HUGE = "9" * 30


def waiting(make_task, starter, tool: str = "test_send", text: str = "hello", **task_fields):
    """A run held by the engine on ``tool``: its pending approval."""
    task = make_task(
        [{"content": f"Calling {tool}.", "calls": [(tool, {"text": text})]}, {"content": "ok"}],
        tools=[tool],
        self_check=False,
        **task_fields,
    )
    run = run_start(task=task, run_input={}, user=starter)
    run_until_rest(run)
    assert run.status == RunStatus.WAITING
    return Approval.objects.get(run=run)


def more_like(approval: Approval, count: int, **fields) -> list[Approval]:
    """``count`` more pending approvals on ``approval``'s run, as the engine opens them,
    for lists too long to make one run at a time."""
    now = timezone.now()
    made = [
        Approval(
            run_id=approval.run_id,
            kind=fields.get("kind", ApprovalKind.ACTION),
            tool_name=fields.get("tool_name", approval.tool_name),
            arguments=fields.get("arguments", {"text": f"item {n}"}),
            side_effect=fields.get("side_effect", approval.side_effect),
            gate=fields.get("gate", "a test gate"),
            reasoning=fields.get("reasoning", f"reasoning {n}"),
            confidence=fields.get("confidence"),
            context=fields.get("context", {"recent_steps": []}),
            expires_at=now + timedelta(hours=1, minutes=n),
            group=fields.get("group"),
        )
        for n in range(count)
    ]
    return Approval.objects.bulk_create(made)


def rows_of(page: str) -> list[int]:
    """The ids of the list's rows, in order."""
    return [int(found) for found in re.findall(r'<tr id="row-(\d+)"', page)]


def row(page: str, approval: Approval) -> str:
    start = page.index(f'<tr id="row-{approval.pk}"')
    return page[start : page.index("</tr>", start)]


def opened(page: str) -> list[int]:
    """The ids of the items open in the detail panel (a full card each)."""
    return [int(found) for found in re.findall(r'data-id="(\d+)" data-selected', page)]


def get(client: Client, **params):
    return client.get(INBOX, params)


# The list ----------------------------------------------------------------------------


def test_each_pending_item_is_one_row_with_what_triage_needs(make_task, operator, operator_client):
    approval = waiting(make_task, operator, text="pay the vendor")
    Approval.objects.filter(pk=approval.pk).update(confidence=0.42)
    page = get(operator_client).content.decode()
    line = row(page, approval)
    assert '<td class="kind" title="Approve an action">action</td>' in line
    name = approval.run.task.name
    assert f'<td class="task" title="{name}">{name}</td>' in line
    short = str(approval.run_id)[:8]
    assert f'<a href="{reverse("runs:detail", args=[approval.run_id])}"' in line
    assert f"<code>{short}</code>" in line
    assert "<code>test_send</code>" in line and "pay the vendor" in line
    assert '<span class="badge effect-irreversible">irreversible</span>' in line
    assert '<td class="confidence">0.42</td>' in line
    assert '<td class="age"><time datetime=' in line
    deadline = f'title="{approval.expires_at:%Y-%m-%d %H:%M} UTC">in 23 h</time>'
    assert deadline in line  # the task's default: a day
    assert re.search(r'<td class="age"><time [^>]+>\d+ s</time>', line)
    # Nothing of the payload beyond the line: the reasoning is in the detail panel only.
    assert "Calling test_send." not in line and "Calling test_send." in page


def test_the_first_item_is_open_beside_the_list_and_marked_in_it(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    page = get(operator_client).content.decode()
    assert rows_of(page) == [first.pk, second.pk]
    assert opened(page) == [first.pk]
    assert 'class="selected" aria-current="true"' in row(page, first)
    assert "selected" not in row(page, second)


def test_the_item_in_the_url_is_the_one_open(make_task, operator, operator_client):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="the second one")
    page = get(operator_client, item=second.pk).content.decode()
    assert opened(page) == [second.pk] and "the second one" in page
    assert "selected" in row(page, second) and "selected" not in row(page, first)
    # Each row opens its item by the same address, with htmx into the detail panel only.
    link = f'href="{INBOX}?item={first.pk}" hx-get="{INBOX}?item={first.pk}"'
    assert link in row(page, first) and 'hx-target="#inbox-detail"' in row(page, first)


def test_a_decided_item_named_in_the_url_shows_how_it_was_decided(
    make_task, operator, operator_client
):
    approval = waiting(make_task, operator)
    operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "reject", "reason": "no"}
    )
    page = get(operator_client, item=approval.pk).content.decode()
    assert opened(page) == [approval.pk]
    assert "Rejected by olivia: “no”" in page and rows_of(page) == []


def test_an_item_not_to_be_seen_is_said_so_with_a_404(
    make_task, operator, operator_client, finance
):
    hidden = waiting(make_task, operator, approver_group=finance)
    response = get(operator_client, item=hidden.pk)
    assert response.status_code == 404
    assert f"No approval #{hidden.pk} is yours to see" in response.content.decode()
    assert "Calling test_send." not in response.content.decode()
    # Asked by htmx for the panel: the same sentence, in a 200 htmx swaps.
    panel = operator_client.get(
        INBOX, {"item": hidden.pk}, headers={"HX-Request": "true", "HX-Target": "inbox-detail"}
    )
    assert panel.status_code == 200 and f"No approval #{hidden.pk}" in panel.content.decode()


# The regions htmx swaps ---------------------------------------------------------------


def test_a_row_asked_for_by_htmx_returns_the_detail_panel_only(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    response = operator_client.get(
        INBOX, {"item": second.pk}, headers={"HX-Request": "true", "HX-Target": "inbox-detail"}
    )
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="inbox-detail"')
    assert opened(body) == [second.pk]
    assert "<html" not in body and "<tr id=" not in body
    assert f'id="approval-{first.pk}"' not in body


def test_the_rows_poll_returns_the_list_only_and_its_count_is_the_navigations(
    make_task, operator, operator_client
):
    waiting(make_task, operator)
    waiting(make_task, operator, text="second")
    headers = {"HX-Request": "true", "HX-Target": "inbox-list"}
    response = operator_client.get(INBOX, headers=headers)
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="inbox-list"')
    assert "<html" not in body and "data-selected" not in body  # the detail is untouched
    assert 'hx-trigger="sse:trail, every 15s, approvals-changed from:body"' in body
    assert 'data-total="2"' in body and "<strong>2</strong> waiting for you" in body
    count = operator_client.get(reverse("approvals:count")).content.decode()
    assert ">2</span>" in count


def test_the_lists_count_and_the_navigations_agree_under_four_eyes(held, finance):
    starter = person("sam", groups=[finance])
    _, mine = held(starter, four_eyes=True)
    _, theirs = held(person("sue", groups=[finance]), four_eyes=True)
    client = Client()
    client.force_login(starter)
    page = client.get(INBOX).content.decode()
    assert rows_of(page) == [mine.pk, theirs.pk]  # both listed; one is for someone else
    assert "<strong>1</strong> waiting for you; 1 waiting for someone else (four eyes)" in page
    assert 'data-total="1"' in page
    count = client.get(reverse("approvals:count")).content.decode()
    assert ">1</span>" in count
    # No box offers a four-eyes item for bulk approval.
    assert 'name="ids"' not in row(page, mine)


def test_a_decided_item_leaves_the_list_at_its_next_refresh(make_task, operator, operator_client):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    operator_client.post(reverse("approvals:decide", args=[first.pk]), {"decision": "approve"})
    headers = {"HX-Request": "true", "HX-Target": "inbox-list"}
    body = operator_client.get(INBOX, headers=headers).content.decode()
    assert rows_of(body) == [second.pk] and 'data-total="1"' in body


# Filters and search -------------------------------------------------------------------


@pytest.fixture
def assorted(make_task, operator, finance):
    """Pending items of several kinds, tasks, groups and risks."""
    send = waiting(make_task, operator, text="send it")
    note = waiting(make_task, operator, tool="test_note", text="note it")
    (read,) = more_like(note, 1, tool_name="test_echo", side_effect="read", group=finance)
    (budget,) = more_like(
        send, 1, kind=ApprovalKind.BUDGET_EXTENSION, tool_name="", side_effect="", arguments=None
    )
    return {"send": send, "note": note, "read": read, "budget": budget}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"kind": "action"}, {"send", "note", "read"}),
        ({"kind": "budget_extension"}, {"budget"}),
        ({"risk": "irreversible"}, {"send"}),
        ({"risk": "reversible"}, {"note"}),
        ({"risk": "read"}, {"read"}),
        ({"group": "none"}, {"send", "note", "budget"}),
        ({"q": "test_echo"}, {"read"}),
        ({"q": "TEST_NOTE"}, {"note"}),
        ({"q": "Calling test_send"}, {"send"}),  # the agent's reasoning
        ({"q": "no such thing"}, set()),
        ({"kind": "action", "risk": "irreversible"}, {"send"}),
    ],
)
def test_filters_and_search_narrow_the_list(assorted, operator, operator_client, params, expected):
    operator.groups.add(Group.objects.get(name="finance"))
    response = get(operator_client, **params)
    assert response.status_code == 200
    page = response.content.decode()
    ids = {name for name, approval in assorted.items() if approval.pk in rows_of(page)}
    assert ids == expected
    # The filters stay in the form, so the URL and the page agree.
    for name, value in params.items():
        if name == "q":
            assert f'name="q" value="{value}"' in page
        else:
            assert f'<option value="{value}" selected>' in page


def test_the_task_and_group_filters_take_a_slug_and_an_id(assorted, operator, operator_client):
    operator.groups.add(finance := Group.objects.get(name="finance"))
    note = assorted["note"]
    page = get(operator_client, task=note.run.task.slug).content.decode()
    assert set(rows_of(page)) == {note.pk, assorted["read"].pk}  # the same run's two
    page = get(operator_client, group=finance.pk).content.decode()
    assert rows_of(page) == [assorted["read"].pk]


def test_a_run_id_prefix_finds_its_items_with_or_without_dashes(assorted, operator_client):
    send = assorted["send"]
    full = str(send.run_id)
    for prefix in (full[:8], full[:13], full.replace("-", "")[:12], full.upper()[:8]):
        page = get(operator_client, q=prefix).content.decode()
        assert send.pk in rows_of(page) and assorted["note"].pk not in rows_of(page), prefix


def test_the_filters_redraw_list_and_detail_by_htmx_and_keep_the_url(assorted, operator_client):
    response = operator_client.get(
        INBOX, {"risk": "reversible"}, headers={"HX-Request": "true", "HX-Target": "triage"}
    )
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="triage"')
    assert rows_of(body) == [assorted["note"].pk] and opened(body) == [assorted["note"].pk]
    # The polled list and the rows' links keep the filter.
    assert f'hx-get="{INBOX}?risk=reversible"' in body
    assert f'href="{INBOX}?risk=reversible&amp;item={assorted["note"].pk}"' in body


def test_the_filter_form_works_without_javascript(assorted, operator_client):
    page = get(operator_client).content.decode()
    form = page[
        page.index('<form id="inbox-filters"') : page.index(
            "</form>", page.index('<form id="inbox-filters"')
        )
    ]
    assert f'method="get" action="{INBOX}"' in form and 'hx-push-url="true"' in form
    for name in ("kind", "task", "group", "risk", "q"):
        assert f'name="{name}"' in form


def test_the_decided_list_follows_the_search(make_task, operator, operator_client):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, tool="test_note")
    for approval, reason in ((first, "wrong vendor"), (second, "duplicate")):
        operator_client.post(
            reverse("approvals:decide", args=[approval.pk]),
            {"decision": "reject", "reason": reason},
        )
    page = get(operator_client, q="vendor").content.decode()
    decided = page[page.index("<h2>Decided</h2>") :]
    assert "wrong vendor" in decided and "duplicate" not in decided


# Bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"kind": "bogus"}, "kind: 'bogus' is not a kind of approval; use one of action,"),
        ({"kind": "act\x00ion"}, "kind: 'act\\x00ion' is not a kind of approval"),
        ({"risk": "catastrophic"}, "risk: 'catastrophic' is not a side-effect class"),
        ({"task": "no-such-task"}, "task: there is no task 'no-such-task'."),
        ({"task": "x" * 500}, "task: there is no task 'xxxxxxxx"),
        ({"task": "a\x00b"}, "task: a NUL character cannot be stored or searched for"),
        ({"group": "abc"}, "group: 'abc' is not a group id (a whole number from 1 to"),
        ({"group": HUGE}, f"group: '{HUGE}' is not a group id"),
        ({"group": "999999"}, "group: there is no group with the id 999999."),
        ({"page": "0"}, "page: '0' is not a page number"),
        ({"page": "two"}, "page: 'two' is not a page number"),
        ({"page": HUGE}, f"page: '{HUGE}' is not a page number"),
        ({"item": "-1"}, "item: '-1' is not an approval id"),
        ({"item": HUGE}, f"item: '{HUGE}' is not an approval id"),
        ({"item": "1\x00"}, "item: a NUL character cannot be stored or searched for"),
        ({"q": "te\x00st"}, "q: a NUL character cannot be stored or searched for"),
    ],
)
def test_a_bad_filter_is_a_400_that_names_it(assorted, operator, operator_client, params, said):
    operator.groups.add(Group.objects.get(name="finance"))
    response = get(operator_client, **params)
    assert response.status_code == 400
    page = unescape(response.content.decode())
    assert f"Not searched: {said}" in page
    # The inbox is still there, unfiltered, to carry on from.
    assert set(rows_of(page)) == {approval.pk for approval in assorted.values()}
    # Asked by htmx (which swaps no 4xx), the refusal comes inside the region.
    swapped = operator_client.get(
        INBOX, params, headers={"HX-Request": "true", "HX-Target": "triage"}
    )
    assert swapped.status_code == 200
    body = unescape(swapped.content.decode())
    assert body.lstrip().startswith('<div id="triage"') and said in body


def test_several_bad_filters_are_each_named(operator_client):
    response = get(operator_client, kind="x", risk="y")
    page = unescape(response.content.decode())
    assert response.status_code == 400
    assert "kind: 'x' is not a kind" in page and "risk: 'y' is not a side-effect class" in page


# Paging and the query count -------------------------------------------------------------


def test_the_list_is_paged_by_fifty_and_says_how_many_there_are(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    more_like(first, 59)
    page = get(operator_client).content.decode()
    assert len(rows_of(page)) == 50
    assert "<strong>60</strong> waiting for you. Showing 1\u201350 of 60." in page
    assert f'href="{INBOX}?page=2"' in page
    second = get(operator_client, page=2).content.decode()
    assert len(rows_of(second)) == 10 and "Showing 51\u201360 of 60" in second
    assert not set(rows_of(page)) & set(rows_of(second))
    assert f'href="{INBOX}"' in second and 'rel="prev"' in second
    # A page past the end (the list shrank meanwhile) shows the last one.
    assert rows_of(get(operator_client, page=7).content.decode()) == rows_of(second)


def test_the_inbox_with_fifty_pending_takes_a_fixed_number_of_queries(
    make_task, operator, operator_client, django_assert_num_queries
):
    first = waiting(make_task, operator)
    waiting(make_task, operator, tool="test_note")
    more_like(first, 48, context={"recent_steps": [], "big": "x" * 20_000})
    # session, user, permissions (x2), the navigation's count, the list's counts, its
    # rows, the open item in full, the filter's tasks, the groups, the decided list
    with django_assert_num_queries(11):
        response = get(operator_client)
    assert len(rows_of(response.content.decode())) == 50
    headers = {"HX-Request": "true", "HX-Target": "inbox-list"}
    # The poll: session, user, permissions (x2), the list's counts, its rows, the count.
    with django_assert_num_queries(7):
        operator_client.get(INBOX, headers=headers)


def test_the_list_reads_no_payload_but_the_open_items(make_task, operator, operator_client):
    first = waiting(make_task, operator)
    more_like(first, 20, arguments={"text": "y" * 50_000}, reasoning="long " * 1000)
    with CaptureQueriesContext(connection) as queries:
        page = get(operator_client).content.decode()
    (rows_read,) = [query["sql"] for query in queries if '"arguments_head"' in query["sql"]]
    for payload in ("reasoning", "context", "edited_arguments", "resolution_result"):
        assert f'"approvals_approval"."{payload}"' not in rows_read
    # The full record is read for the open item only (and for the decided list).
    full_reads = [q["sql"] for q in queries if '"approvals_approval"."reasoning"' in q["sql"]]
    assert len(full_reads) == 2
    # Each row shows the head of its arguments only.
    some = Approval.objects.filter(reasoning__startswith="long").first()
    assert 0 < row(page, some).count("y") <= 160


# Escaping -----------------------------------------------------------------------------


def test_reasoning_arguments_and_names_are_escaped_in_list_and_detail(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    (hostile,) = more_like(
        first,
        1,
        reasoning="<script>alert('reasoning')</script>",
        arguments={"text": "<img src=x onerror=alert('arguments')>"},
        gate="<b>gate</b>",
    )
    Task.objects.filter(pk=first.run.task_id).update(name="<svg onload=alert('task')>")
    page = get(operator_client, item=hostile.pk).content.decode()
    for raw in ("<script>alert(", "<img src=x", "<svg onload", "<b>gate</b>"):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;reasoning&#x27;)&lt;/script&gt;" in page
    assert "&lt;svg onload=alert(&#x27;task&#x27;)&gt;" in row(page, hostile)
    assert "&lt;img src=x onerror=alert(" in row(page, hostile)


# Bulk approval --------------------------------------------------------------------------


def test_only_read_and_reversible_actions_get_a_box_for_bulk_approval(
    assorted, operator, operator_client
):
    operator.groups.add(Group.objects.get(name="finance"))
    page = get(operator_client).content.decode()
    assert 'name="ids"' in row(page, assorted["note"]) and 'name="ids"' in row(
        page, assorted["read"]
    )
    assert 'name="ids"' not in row(page, assorted["send"])
    assert 'name="ids"' not in row(page, assorted["budget"])
    box = f'<input type="checkbox" id="pick-{assorted["note"].pk}" name="ids"'
    assert box in page and 'form="bulk" hx-preserve="true"' in page  # kept across polls
    assert '<form id="bulk" method="post"' in page


def test_no_bulk_form_when_nothing_may_be_bulk_approved(make_task, operator, operator_client):
    waiting(make_task, operator)  # irreversible
    assert '<form id="bulk"' not in get(operator_client).content.decode()


def test_bulk_approval_keeps_its_rules_and_returns_to_the_filtered_list(
    make_task, operator, operator_client
):
    note = waiting(make_task, operator, tool="test_note")
    send = waiting(make_task, operator)
    back = f"{INBOX}?risk=reversible"
    response = operator_client.post(
        reverse("approvals:bulk_approve"), {"ids": [note.pk, send.pk], "next": back}
    )
    assert response.status_code == 303 and response["Location"] == back
    note.refresh_from_db()
    send.refresh_from_db()
    assert note.status == ApprovalStatus.APPROVED and send.status == ApprovalStatus.PENDING
    page = operator_client.get(back).content.decode()
    assert "Approved 1." in page and "test_send: decide it on its own" in page


@pytest.mark.parametrize(
    "elsewhere", ["https://evil.example/", "//evil.example/x", "javascript:alert(1)"]
)
def test_bulk_approval_never_sends_a_person_elsewhere(
    make_task, operator, operator_client, elsewhere
):
    note = waiting(make_task, operator, tool="test_note")
    response = operator_client.post(
        reverse("approvals:bulk_approve"), {"ids": [note.pk], "next": elsewhere}
    )
    assert response.status_code == 303 and response["Location"] == INBOX


# Deciding from the detail panel ---------------------------------------------------------


def decide_in_panel(client: Client, approval: Approval, data: dict, current: str = INBOX):
    return client.post(
        reverse("approvals:decide", args=[approval.pk]),
        data,
        headers={
            "HX-Request": "true",
            "HX-Target": "inbox-detail",
            "HX-Current-URL": f"http://testserver{current}",
        },
    )


def test_a_decision_in_the_panel_says_so_and_opens_the_next_item(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    response = decide_in_panel(operator_client, first, {"decision": "approve"})
    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"approvals-changed": {}}
    assert response["HX-Replace-Url"] == f"{INBOX}?item={second.pk}"
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="inbox-detail"')
    compact = body[body.index(f'id="approval-{first.pk}"') : body.index("</article>")]
    assert "Approved by olivia" in compact and "Follow the run" in compact
    assert opened(body) == [second.pk]
    first.refresh_from_db()
    assert first.status == ApprovalStatus.APPROVED


def test_the_next_item_is_the_next_one_of_the_filtered_list(make_task, operator, operator_client):
    first = waiting(make_task, operator, tool="test_note")
    waiting(make_task, operator)  # irreversible: filtered out
    third = waiting(make_task, operator, tool="test_note", text="third")
    response = decide_in_panel(
        operator_client, first, {"decision": "approve"}, current=f"{INBOX}?risk=reversible"
    )
    assert opened(response.content.decode()) == [third.pk]
    assert response["HX-Replace-Url"] == f"{INBOX}?risk=reversible&item={third.pk}"


def test_deciding_the_last_item_of_the_list_opens_the_one_before_it(
    make_task, operator, operator_client
):
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    response = decide_in_panel(operator_client, second, {"decision": "approve"})
    assert opened(response.content.decode()) == [first.pk]


def test_deciding_the_only_item_leaves_nothing_open(make_task, operator, operator_client):
    only = waiting(make_task, operator)
    response = decide_in_panel(operator_client, only, {"decision": "reject", "reason": "no"})
    body = response.content.decode()
    assert opened(body) == [] and "Nothing else waits." in body
    assert response["HX-Replace-Url"] == INBOX


def test_a_refused_decision_in_the_panel_keeps_the_item_and_what_was_typed(
    make_task, operator, operator_client
):
    approval = waiting(make_task, operator)
    waiting(make_task, operator, text="second")
    response = decide_in_panel(
        operator_client, approval, {"decision": "approve", "arguments": '{"text": 12}'}
    )
    body = response.content.decode()
    assert opened(body) == [approval.pk]
    assert "the edited arguments do not match test_send&#x27;s schema" in body
    assert "{&quot;text&quot;: 12}</textarea>" in body
    assert "HX-Replace-Url" not in response
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_the_keys_find_their_buttons_and_enter_in_the_reason_box_rejects(
    make_task, operator, operator_client
):
    approval = waiting(make_task, operator)
    page = get(operator_client).content.decode()
    form = page[
        page.index('<form class="decide"') : page.index(
            "</form>", page.index('<form class="decide"')
        )
    ]
    # The keyboard presses these very buttons: the same POST.
    assert (
        '<button class="primary" name="decision" value="approve" data-key="a">Approve</button>'
        in form
    )
    assert (
        '<button class="danger" name="decision" value="reject" data-key="r">Reject</button>' in form
    )
    assert f'hx-post="{reverse("approvals:decide", args=[approval.pk])}"' in form
    assert 'hx-target="#inbox-detail" hx-swap="innerHTML"' in form
    # Enter in a text box submits with the form's first button: the reason box's own.
    assert (
        form.index('name="reason"') < form.index('value="reject"') < form.index('value="approve"')
    )
    assert '<script src="/static/inbox.js" defer></script>' in page
    assert '<link rel="stylesheet" href="/static/inbox.css">' in page


def test_what_the_keyboard_sends_is_decided_as_the_buttons_are(
    make_task, operator, operator_client
):
    # The a key submits {"decision": "approve"} and r's Enter {"decision": "reject",
    # "reason": ...} with the page's CSRF header: the server sees the button's POST.
    first = waiting(make_task, operator)
    second = waiting(make_task, operator, text="second")
    decide_in_panel(operator_client, first, {"decision": "approve"})
    decide_in_panel(operator_client, second, {"decision": "reject", "reason": "not now"})
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)
    assert second.decision_reason == "not now"
    assert EFFECTS == {}


# The card on its own: the run page decides in place ---------------------------------------


def test_the_card_renders_on_its_own_and_decides_itself_in_place(make_task, operator):
    approval = waiting(make_task, operator)
    from approvals.selectors import approvals_pending_on_run

    (pending,) = approvals_pending_on_run(operator, approval.run_id)
    request = RequestFactory().get(reverse("runs:detail", args=[approval.run_id]))
    request.user = operator
    next_url = reverse("runs:detail", args=[approval.run_id])
    html = render_to_string(
        "approvals/_approval.html",
        {"approval": pending, "groups": groups_deciding(), "next": next_url},
        request=request,
    )
    assert html.startswith(
        f'<article class="card approval approval-pending" id="approval-{approval.pk}"'
    )
    assert f'hx-target="#approval-{approval.pk}" hx-swap="outerHTML"' in html
    assert f'<input type="hidden" name="next" value="{next_url}">' in html
    assert 'name="csrfmiddlewaretoken"' in html and "Calling test_send." in html


def test_a_decision_from_the_run_page_goes_back_to_it(make_task, operator, operator_client):
    approval = waiting(make_task, operator)
    back = reverse("runs:detail", args=[approval.run_id])
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "approve", "next": back}
    )
    assert response.status_code == 303 and response["Location"] == back
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED


def test_an_htmx_decision_from_the_run_page_swaps_its_card(make_task, operator, operator_client):
    approval = waiting(make_task, operator)
    back = reverse("runs:detail", args=[approval.run_id])
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "reject", "reason": "", "next": back},
        headers={"HX-Request": "true", "HX-Target": f"approval-{approval.pk}"},
    )
    body = response.content.decode()
    assert body.startswith(
        f'<article class="card approval approval-pending" id="approval-{approval.pk}"'
    )
    assert "Say why you reject it" in body
    assert f'<input type="hidden" name="next" value="{back}">' in body  # kept for the retry
    assert 'hx-target="#approval-' in body


@pytest.mark.parametrize(
    "elsewhere",
    [
        "https://evil.example/runs/",
        "//evil.example/",
        "javascript:alert(1)",
        "/\\evil.example",
        "runs/x",
    ],
)
def test_a_decision_never_sends_a_person_elsewhere(make_task, operator, operator_client, elsewhere):
    approval = waiting(make_task, operator)
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "approve", "next": elsewhere}
    )
    assert response.status_code == 303 and response["Location"] == INBOX


def test_age_and_deadline_are_said_in_one_unit(make_task, operator, operator_client):
    approval = waiting(make_task, operator)
    now = timezone.now()
    Approval.objects.filter(pk=approval.pk).update(
        created_at=now - timedelta(hours=5, minutes=10), expires_at=now - timedelta(minutes=1)
    )
    line = row(get(operator_client).content.decode(), approval)
    assert re.search(r'<td class="age"><time [^>]+>5 h</time>', line)
    assert re.search(r'<td class="deadline"><time [^>]+>past</time>', line)  # not yet expired
