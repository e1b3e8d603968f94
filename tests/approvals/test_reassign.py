"""Reassignment (ARCHITECTURE.md: "expiry and reassignment"): someone who may decide a
pending approval hands it to another group, saying why. The new group sees it, is
emailed with the reason, and decides it; the old one no longer sees it; the trail keeps
who handed it on, from where, to where and why. The deadline does not move."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from approvals.models import Approval, ApprovalStatus
from approvals.services import (
    DecisionError,
    approval_decide,
    approval_reassign,
    approvals_expire,
)
from lineage.models import LineageEvent
from tasks.models import RunStatus
from tests.approvals.conftest import person
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


@pytest.fixture
def ops() -> Group:
    return Group.objects.create(name="ops")


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def inbox_has(client: Client, approval: Approval) -> bool:
    page = client.get(reverse("approvals:inbox")).content.decode()
    return f'id="approval-{approval.pk}"' in page


def reassign(client: Client, approval: Approval, group: object, reason: str, **options):
    url = reverse("approvals:reassign", args=[approval.pk])
    return client.post(url, {"group": group, "reason": reason}, **options)


def test_a_member_hands_an_approval_to_another_group_which_decides_it(
    held, finance, ops, operator, django_capture_on_commit_callbacks
):
    mia = person("mia", groups=[finance])
    olga = person("olga", groups=[ops])
    run, approval = held(operator)
    deadline = approval.expires_at
    Approval.objects.filter(pk=approval.pk).update(reminded_at=timezone.now())
    mail.outbox.clear()

    with django_capture_on_commit_callbacks(execute=True):
        response = reassign(client_for(mia), approval, ops.pk, "finance is closed this week")
    assert response.status_code == 303 and response["Location"] == reverse("approvals:inbox")

    approval.refresh_from_db()
    assert approval.group == ops and approval.status == ApprovalStatus.PENDING
    assert approval.expires_at == deadline
    assert approval.reminded_at is None  # ops is reminded in its turn
    assert approval.context["reassigned"][0] | {"at": None} == {
        "by": "mia",
        "from": "finance",
        "to": "ops",
        "reason": "finance is closed this week",
        "at": None,
    }
    assert not inbox_has(client_for(mia), approval)
    page = client_for(olga).get(reverse("approvals:inbox")).content.decode()
    assert f'id="approval-{approval.pk}"' in page
    assert "by mia, from finance to ops: finance is closed this week" in page

    (message,) = mail.outbox
    assert message.to == ["olga@example.com"]
    assert "mia handed it to ops: finance is closed this week" in message.body

    event = LineageEvent.objects.get(run_uuid=run.pk, kind="approval.reassigned")
    assert event.actor == "user:mia"
    assert event.payload == {
        "approval": approval.pk,
        "from_group": "finance",
        "to_group": "ops",
        "reason": "finance is closed this week",
    }

    with pytest.raises(DecisionError, match="routed to the group ops"):
        approval_decide(approval=approval, user=mia, approve=True)
    approval_decide(approval=approval, user=olga, approve=True)
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("group", "reason", "error"),
    [
        ("", "why", "choose the group to hand it to"),
        ("9999", "why", "choose one of the groups listed"),
        ("ops", "  ", "say why you reassign it: the other group reads the reason"),
        ("finance", "why", "this approval is already routed to finance"),
        # A group where nobody may decide approvals is not offered.
        ("empty", "why", "choose one of the groups listed"),
    ],
)
def test_a_reassignment_that_cannot_be_made_is_refused_with_why_and_changes_nothing(
    held, finance, ops, operator, group, reason, error
):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    groups = {"ops": ops.pk, "finance": finance.pk, "empty": Group.objects.create(name="empty").pk}
    run, approval = held(operator)

    response = reassign(client_for(mia), approval, groups.get(group, group), reason)
    # The inbox again, the refusal beside the form, with what was chosen and typed: a
    # form that does not validate answers 400, a refusal of the service's its page.
    assert response.status_code == (200 if group == "finance" else 400)
    page = response.content.decode()
    assert f'<p class="error">Not reassigned: {escape(error)}</p>' in page
    assert '<details class="reassign" open>' in page
    if reason.strip():
        assert f'value="{reason}"' in page
    approval.refresh_from_db()
    assert approval.group == finance and "reassigned" not in approval.context
    assert not LineageEvent.objects.filter(run_uuid=run.pk, kind="approval.reassigned").exists()


def test_only_groups_where_someone_may_decide_it_are_offered(held, finance, ops, operator):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    person("ivan", groups=[Group.objects.create(name="idle")], decide=False)
    held(operator)
    page = client_for(mia).get(reverse("approvals:inbox")).content.decode()
    # The reassignment's choice, in the item (the inbox's filters offer every group).
    reassigning = page[page.index('<details class="reassign"') :]
    options = reassigning[
        reassigning.index('<select name="group"') : reassigning.index("</select>")
    ]
    assert f'<option value="{ops.pk}">ops</option>' in options
    assert "idle" not in options and "finance" not in options  # nobody there; its own


def test_a_group_where_only_the_runs_starter_may_decide_is_refused_under_four_eyes(
    held, finance, ops
):
    starter = person("sam", groups=[ops])
    mia = person("mia", groups=[finance])
    _, approval = held(starter, four_eyes=True)
    with pytest.raises(DecisionError, match="nobody but the run's starter in ops may decide"):
        approval_reassign(approval=approval, user=mia, group=ops, reason="ops decides")
    person("olga", groups=[ops])
    approval_reassign(approval=approval, user=mia, group=ops, reason="ops decides")
    approval.refresh_from_db()
    assert approval.group == ops


def test_only_someone_who_may_decide_it_can_reassign_it(held, finance, ops, operator):
    person("olga", groups=[ops])
    outsider = person("otto", groups=[ops])
    _, approval = held(operator)
    # Not routed to them: as for a decision, the approval does not exist for them.
    assert reassign(client_for(outsider), approval, ops.pk, "mine now").status_code == 404
    with pytest.raises(DecisionError, match="routed to the group finance"):
        approval_reassign(approval=approval, user=outsider, group=ops, reason="mine now")
    starter = person("sam", groups=[finance])
    _, approval = held(starter, four_eyes=True)
    with pytest.raises(DecisionError, match="four eyes: you started this run"):
        approval_reassign(approval=approval, user=starter, group=ops, reason="to friends")
    approval.refresh_from_db()
    assert approval.group == finance


def test_a_decided_approval_is_not_reassigned(held, finance, ops, operator):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    _, approval = held(operator)
    approval_decide(approval=approval, user=mia, approve=False, reason="no")
    with pytest.raises(DecisionError, match="this approval was already rejected"):
        approval_reassign(approval=approval, user=mia, group=ops, reason="too late")
    # Through the inbox, where the item has gone: the refusal is said on top.
    response = reassign(client_for(mia), approval, ops.pk, "too late", follow=True)
    assert "Not reassigned: this approval was already rejected" in response.content.decode()


def test_an_htmx_reassignment_swaps_the_item_and_refreshes_the_count(held, finance, ops, operator):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    _, approval = held(operator)
    response = reassign(
        client_for(mia), approval, ops.pk, "ops owns this", headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"approvals-changed": {}}
    body = response.content.decode()
    assert body.lstrip().startswith(
        f'<article class="card approval approval-pending" id="approval-{approval.pk}"'
    )
    assert "Handed to ops." in body and "<html" not in body
    # It is ops' to decide now: no buttons are left that would only fail.
    assert reverse("approvals:decide", args=[approval.pk]) not in body
    assert reverse("approvals:reassign", args=[approval.pk]) not in body


def test_an_htmx_refusal_keeps_the_choice_and_the_text_and_says_why(held, finance, ops, operator):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    _, approval = held(operator)
    response = reassign(client_for(mia), approval, ops.pk, "  ", headers={"HX-Request": "true"})
    body = response.content.decode()
    assert '<details class="reassign" open>' in body
    assert "Not reassigned: say why you reassign it" in body
    assert f'<option value="{ops.pk}" selected>ops</option>' in body


def test_a_group_whose_members_hold_the_permission_through_the_group_can_take_it(
    held, finance, operator
):
    # The permission may come with the group rather than with each person.
    desk = Group.objects.create(name="desk")
    desk.permissions.add(Permission.objects.get(codename="decide_approval"))
    dana = person("dana", groups=[desk], decide=False)
    mia = person("mia", groups=[finance])
    _, approval = held(operator)
    approval_reassign(approval=approval, user=mia, group=desk, reason="the desk decides")
    assert inbox_has(client_for(dana), approval)


def test_the_webhook_hears_of_an_approval_once_not_again_when_it_is_handed_on(
    held, finance, ops, operator, settings, django_capture_on_commit_callbacks
):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.AGENTOPS_APPROVAL_WEBHOOK_URL = f"http://127.0.0.1:{server.server_address[1]}/hook"
    settings.AGENTOPS_APPROVAL_WEBHOOK_SECRET = "hook-secret"
    managers = Group.objects.create(name="managers")
    person("max", groups=[managers])
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    try:
        with django_capture_on_commit_callbacks(execute=True):
            _, approval = held(operator, on_approval_expiry="escalate", escalation_group=managers)
        mail.outbox.clear()
        with django_capture_on_commit_callbacks(execute=True):
            approval_reassign(approval=approval, user=mia, group=ops, reason="ops owns it")
        with django_capture_on_commit_callbacks(execute=True):
            approvals_expire(now=timezone.now() + timedelta(days=2))  # escalates
    finally:
        server.shutdown()
        server.server_close()
    assert [document["approval"] for document in received] == [approval.pk]
    to_ops, to_managers = mail.outbox
    assert "mia handed it to ops: ops owns it" in to_ops.body
    assert to_managers.to == ["max@example.com"] and "handed it" not in to_managers.body


def test_a_hand_over_late_in_the_window_is_the_new_groups_reminder(held, finance, ops, operator):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    _, approval = held(operator)
    window = approval.expires_at - approval.created_at
    # Four fifths of the window gone: the hand-over's notice is all the reminder ops gets.
    Approval.objects.filter(pk=approval.pk).update(
        created_at=approval.created_at - window * 4 / 5,
        expires_at=approval.expires_at - window * 4 / 5,
    )
    approval_reassign(approval=approval, user=mia, group=ops, reason="ops owns it")
    approval.refresh_from_db()
    assert approval.reminded_at is not None
    mail.outbox.clear()
    approvals_expire()
    assert mail.outbox == []
