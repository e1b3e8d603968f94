"""The approval round trip through real HTTP: start, wait, decide, continue."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from approvals.models import Approval, ApprovalStatus
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus
from tests.agent_tools import EFFECTS
from tests.conftest import PLANNED, run_until_rest

pytestmark = pytest.mark.django_db


@pytest.fixture
def waiting_run(make_task, operator_client):
    task = make_task(
        [
            {"content": "Sending the note.", "calls": [("test_send", {"text": "hello"})]},
            {"content": "sent"},
        ],
        tools=["test_send"],
    )
    response = operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    assert response.status_code == 303
    run = Run.objects.get(task=task)
    assert response["Location"] == reverse("runs:detail", args=[run.pk])
    run_until_rest(run)
    assert run.status == RunStatus.WAITING
    return run


def test_the_inbox_shows_the_held_call_with_its_context(waiting_run, operator_client):
    response = operator_client.get(reverse("approvals:inbox"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "test_send" in page
    assert "Sending the note." in page  # the agent's reasoning
    assert "Supervised: every irreversible call waits for a person" in page
    assert '<dt>text</dt><dd><pre class="text">hello</pre></dd>' in page
    assert 'id="inbox-count"' in page and ">1</span>" in page


def test_approve_through_the_inbox_and_the_run_completes(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"}
    )
    assert response.status_code == 303 and response["Location"] == reverse("approvals:inbox")
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED and approval.decided_by.username == "olivia"
    waiting_run.refresh_from_db()
    assert waiting_run.status == RunStatus.QUEUED

    run_until_rest(waiting_run)
    assert waiting_run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"send:hello": 1}
    decided = LineageEvent.objects.get(run_uuid=waiting_run.pk, kind="approval.approved")
    assert decided.actor == "user:olivia"


def test_an_htmx_decision_swaps_the_item_and_refreshes_the_count(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "reject", "reason": "wrong audience"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"approvals-changed": {}}
    body = response.content.decode()
    assert body.lstrip().startswith(
        f'<article class="card approval approval-rejected" id="approval-{approval.pk}"'
    )
    assert "wrong audience" in body and "<html" not in body
    run_until_rest(waiting_run)
    assert "wrong audience" in waiting_run.steps.get(kind="tool").error
    assert EFFECTS == {}


def test_reject_without_a_reason_is_refused_and_changes_nothing(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "reject", "reason": "  "},
        follow=True,
    )
    assert "Say why you reject it" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
    assert Run.objects.get(pk=waiting_run.pk).status == RunStatus.WAITING


def test_a_second_decision_on_a_decided_approval_is_refused(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    url = reverse("approvals:decide", args=[approval.pk])
    operator_client.post(url, {"decision": "approve"})
    response = operator_client.post(url, {"decision": "reject", "reason": "too late"}, follow=True)
    assert "this approval was already approved by olivia" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED
    assert (
        LineageEvent.objects.filter(run_uuid=waiting_run.pk, kind__startswith="approval.").count()
        == 2
    )


def test_a_decision_on_a_cancelled_run_is_refused(waiting_run, operator_client):
    operator_client.post(reverse("runs:cancel", args=[waiting_run.pk]))
    approval = Approval.objects.get(run=waiting_run)
    assert approval.status == ApprovalStatus.CANCELLED
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"}, follow=True
    )
    assert "already cancelled" in response.content.decode()
    assert EFFECTS == {}


def test_someone_without_the_permission_sees_nothing_and_cannot_decide(
    waiting_run, client, outsider
):
    client.force_login(outsider)
    page = client.get(reverse("approvals:inbox")).content.decode()
    assert "test_send" not in page and "do not hold the permission" in page
    approval = Approval.objects.get(run=waiting_run)
    response = client.post(reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"})
    assert response.status_code == 404
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_pages_require_login(waiting_run):
    client = Client()
    for url in (
        reverse("approvals:inbox"),
        reverse("runs:list"),
        reverse("runs:detail", args=[waiting_run.pk]),
    ):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    approval = Approval.objects.get(run=waiting_run)
    response = client.post(reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"})
    assert response.status_code == 302
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_the_inbox_is_one_query_per_list_whatever_its_length(
    make_task, operator_client, django_assert_max_num_queries
):
    for _ in range(5):
        task = make_task([{"calls": [("test_send", {"text": "x"})]}], tools=["test_send"])
        operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    for run in Run.objects.all():
        run_until_rest(run)
    assert Approval.objects.filter(status="pending").count() == 5
    # session, user, permissions (x2), count for the nav, the list's counts, its rows,
    # the selected item in full, the filters' tasks, the groups, the decided list
    with django_assert_max_num_queries(11):
        response = operator_client.get(reverse("approvals:inbox"))
    assert response.content.decode().count('<tr id="row-') == 5


def test_each_kind_shows_its_own_decisions(make_task, operator_client):
    task = make_task(
        [{"calls": [("test_echo", {"text": str(n)})]} for n in range(3)],
        tools=["test_echo"],
        max_steps=2,
        on_budget_breach="ask",
    )
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get(task=task)
    run_until_rest(run)
    page = operator_client.get(reverse("approvals:inbox")).content.decode()
    assert "Extend a budget" in page and "Grant 5 more steps" in page
    approval = Approval.objects.get(run=run)
    # A decision that belongs to another kind is refused and changes nothing.
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "happened"}, follow=True
    )
    assert "&#x27;happened&#x27; is not a decision for this approval" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING

    operator_client.post(reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"})
    run.refresh_from_db()
    assert run.budget_extra == {"steps": 5} and run.status == "queued"


def test_an_unknown_outcome_is_resolved_through_the_inbox_with_its_result(
    make_task, operator, operator_client
):
    from tests.runtime.test_engine import _started_then_crashed

    run = _started_then_crashed(make_task, operator, "test_send")
    run_until_rest(run)
    approval = Approval.objects.get(run=run)
    page = operator_client.get(reverse("approvals:inbox")).content.decode()
    assert "Resolve an unknown outcome" in page and "It did not happen: make the call" in page
    url = reverse("approvals:decide", args=[approval.pk])
    response = operator_client.post(url, {"decision": "happened", "result": "{oops"}, follow=True)
    assert "The result is not valid JSON" in response.content.decode()
    operator_client.post(url, {"decision": "happened", "result": '{"sent": true}'})
    approval.refresh_from_db()
    assert (approval.resolution, approval.resolution_result) == ("happened", {"sent": True})
    run_until_rest(run)
    assert run.steps.get(kind="tool").result == {"sent": True}
    assert EFFECTS == {}


def test_the_other_kinds_are_decided_through_http(make_task, operator_client):
    from agentops.runtime.models.scripted import CHECKS, SCRIPTS, check_turn, scripted_turn

    # An outcome below the confidence threshold, sent back once, then accepted.
    review = make_task(
        [PLANNED, {"content": "first"}, {"content": "second"}], confidence_threshold=0.9
    )
    CHECKS[review.model.split(":", 1)[1]] = lambda messages: check_turn(0.5, "unsure")
    # A loop the task puts to a person.
    loop = make_task(
        [{"calls": [("test_echo", {"text": "x"})]} for _ in range(4)] + [{"content": "ok"}],
        tools=["test_echo"],
        on_loop="ask",
        self_check=False,
    )
    # A question.
    question = make_task([], self_check=False)
    asked = iter([True, False])
    SCRIPTS[question.model.split(":", 1)[1]] = lambda messages: scripted_turn(
        {"calls": [("ask_person", {"question": "Which batch?"})]}
        if next(asked)
        else {"content": "thanks"},
        0,
    )
    for task in (review, loop, question):
        operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
        run_until_rest(Run.objects.get(task=task))

    def opened(task) -> str:
        """The inbox with the task's pending approval open beside the list."""
        approval = Approval.objects.get(run__task=task, status="pending")
        url = reverse("approvals:inbox")
        return operator_client.get(url, {"item": approval.pk}).content.decode()

    page = opened(review)
    assert "Review an outcome" in page and "Send back to the agent" in page
    page = opened(loop)
    assert "Review a possible loop" in page and "Let it go on" in page
    assert "Last steps" in page
    page = opened(question)
    assert "Answer the agent&#x27;s question" in page and "the agent asks: Which batch?" in page

    def decide(task, data):
        approval = Approval.objects.get(run__task=task, status="pending")
        return operator_client.post(reverse("approvals:decide", args=[approval.pk]), data)

    decide(review, {"decision": "reject", "reason": "check again"})
    run_until_rest(Run.objects.get(task=review))
    decide(review, {"decision": "approve"})
    assert Run.objects.get(task=review).status == "succeeded"
    assert Run.objects.get(task=review).outcome == "second"

    decide(loop, {"decision": "approve"})
    run_until_rest(Run.objects.get(task=loop))
    assert Run.objects.get(task=loop).status == "succeeded"

    decide(question, {"decision": "answer", "reason": "2026-11"})
    run_until_rest(Run.objects.get(task=question))
    run = Run.objects.get(task=question)
    assert run.status == "succeeded"
    assert run.steps.get(tool_name="ask_person").result["answer"] == "2026-11"


def item(page: str, approval: Approval) -> str:
    """One approval's item, cut out of a page."""
    start = page.index(f'id="approval-{approval.pk}"')
    return page[start : page.index("</article>", start)]


PROPOSED = '<dt>Proposed</dt><dd><dl class="args"><dt>text</dt><dd><pre class="text">hello</pre>'
APPROVED = '<dt>Approved</dt><dd><dl class="args"><dt>text</dt><dd><pre class="text">hi all</pre>'


def approve_with(client, approval: Approval, arguments: str, **options):
    """Approve through the inbox with ``arguments`` typed in the edit box."""
    url = reverse("approvals:decide", args=[approval.pk])
    return client.post(url, {"decision": "approve", "arguments": arguments}, **options)


HTMX = {"headers": {"HX-Request": "true"}}


def test_an_approval_with_edits_swaps_in_as_approved_with_edits_beside_the_proposed_call(
    waiting_run, operator_client
):
    approval = Approval.objects.get(run=waiting_run)
    response = approve_with(operator_client, approval, '{"text": "hi all"}', **HTMX)
    body = item(response.content.decode(), approval)
    assert "Approved with edits by olivia" in body
    assert PROPOSED in body and APPROVED in body


def test_an_approval_with_edits_is_listed_as_such_among_the_decided(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = approve_with(operator_client, approval, '{"text": "hi all"}', follow=True)
    page = response.content.decode()
    assert "Approved with edits: test_send." in page
    decided = page[page.index("<h2>Decided</h2>") :]
    assert 'approved</span>\n <span class="muted">with edits</span>' in decided
    assert PROPOSED in decided and APPROVED in decided


def test_an_approval_as_proposed_shows_no_edits(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = approve_with(operator_client, approval, '{"text": "hello"}', **HTMX)
    body = response.content.decode()
    assert "Approved by olivia" in body and "with edits" not in body and PROPOSED not in body


def test_the_run_page_shows_an_approval_with_edits_as_such(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    approve_with(operator_client, approval, '{"text": "hi all"}')
    page = operator_client.get(reverse("runs:detail", args=[waiting_run.pk])).content.decode()
    assert "Approve an action: approved with edits by olivia" in page
    assert PROPOSED in page and APPROVED in page


def test_a_refused_edit_keeps_what_the_approver_typed(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    kept = '<textarea name="arguments" rows="6" class="mono" aria-label="Arguments (JSON)">'
    kept += "{&quot;text&quot;: 12}</textarea>"

    swapped = approve_with(operator_client, approval, '{"text": 12}', **HTMX)
    body = swapped.content.decode()
    assert "the edited arguments do not match test_send&#x27;s schema" in body
    assert kept in body and '<details class="edit" open>' in body

    page = approve_with(operator_client, approval, '{"text": 12}')
    assert page.status_code == 200  # shown again, not redirected away from the text
    body = item(page.content.decode(), approval)
    assert "the edited arguments do not match test_send&#x27;s schema" in body
    assert kept in body

    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING and approval.edited_arguments is None
    waiting_run.refresh_from_db()
    assert waiting_run.status == RunStatus.WAITING
    assert waiting_run.steps.get(kind="tool").arguments == {"text": "hello"}


def test_a_refusal_keeps_the_other_items_as_proposed(make_task, operator_client):
    for text in ("one", "two"):
        task = make_task([{"calls": [("test_send", {"text": text})]}], tools=["test_send"])
        operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
        run_until_rest(Run.objects.get(task=task))
    first, second = Approval.objects.order_by("pk")
    response = approve_with(operator_client, first, '{"text": 12}')
    # The refused item is the one open, the other still listed beside it, as proposed.
    page = response.content.decode()
    assert "do not match" in item(page, first)
    assert f'id="row-{second.pk}"' in page and f'id="approval-{second.pk}"' not in page
    opened = operator_client.get(reverse("approvals:inbox"), {"item": second.pk})
    other = item(opened.content.decode(), second)
    assert "do not match" not in other and "&quot;two&quot;\n}</textarea>" in other


def test_edited_arguments_holding_nan_are_refused_as_not_json(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    response = approve_with(operator_client, approval, '{"text": NaN}', **HTMX)
    assert "The edited arguments are not valid JSON: NaN is not a JSON number." in (
        response.content.decode()
    )
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
