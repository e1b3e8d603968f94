"""Reassignment (ARCHITECTURE.md: "expiry and reassignment"): someone who may decide a
pending approval hands it to another group, saying why. The new group sees it, is
emailed with the reason, and decides it; the old one no longer sees it; the trail keeps
who handed it on, from where, to where and why. The deadline does not move."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group, Permission
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from approvals.models import Approval, ApprovalStatus
from approvals.services import DecisionError, approval_decide, approval_reassign
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
        ("empty", "why", "nobody in empty holds the permission to decide approvals"),
    ],
)
def test_a_reassignment_that_cannot_be_made_is_refused_with_why_and_changes_nothing(
    held, finance, ops, operator, group, reason, error
):
    mia = person("mia", groups=[finance])
    person("olga", groups=[ops])
    groups = {"ops": ops.pk, "finance": finance.pk, "empty": Group.objects.create(name="empty").pk}
    run, approval = held(operator)

    response = reassign(client_for(mia), approval, groups.get(group, group), reason, follow=True)
    assert f"Not reassigned: {error}" in response.content.decode()
    approval.refresh_from_db()
    assert approval.group == finance and "reassigned" not in approval.context
    assert not LineageEvent.objects.filter(run_uuid=run.pk, kind="approval.reassigned").exists()


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
