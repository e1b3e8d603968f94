"""Routing and authority, deadlines, edited arguments, notification and search."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from approvals.models import Approval, ApprovalStatus
from approvals.services import DecisionError, approval_decide, approvals_expire
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, StepStatus, Task
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.approvals.conftest import person
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def test_the_authorisation_matrix(held, finance):
    member = person("mia", groups=[finance])
    starter = person("sam", groups=[finance])
    outsider = person("otto")
    no_permission = person("nora", groups=[finance], decide=False)
    run, approval = held(starter, four_eyes=True)

    for user, sees in [(member, True), (starter, True), (outsider, False), (no_permission, False)]:
        client = Client()
        client.force_login(user)
        page = client.get(reverse("approvals:inbox")).content.decode()
        assert (f'id="approval-{approval.pk}"' in page) is sees, user.username

    with pytest.raises(DecisionError, match="routed to the group finance"):
        approval_decide(approval=approval, user=outsider, approve=True)
    with pytest.raises(DecisionError, match="four eyes: you started this run"):
        approval_decide(approval=approval, user=starter, approve=True)
    with pytest.raises(DecisionError, match="do not hold the permission"):
        approval_decide(approval=approval, user=no_permission, approve=True)
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
    approval_decide(approval=approval, user=member, approve=True)
    run_until_rest(run)
    assert EFFECTS == {"send:pay": 1}


def test_the_group_is_told_by_email_when_an_approval_opens(
    held, finance, django_capture_on_commit_callbacks
):
    person("mia", groups=[finance])
    with django_capture_on_commit_callbacks(execute=True):
        held(person("sam"))
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["mia@example.com"]
    assert "wants to call test_send" in mail.outbox[0].subject


def test_an_expired_action_is_rejected_and_the_agent_replans(held):
    run, approval = held(person("sam"), approval_timeout_minutes=30)
    assert approvals_expire(now=timezone.now() + timedelta(minutes=29)) == []
    assert approvals_expire(now=timezone.now() + timedelta(minutes=31)) == [approval.pk]
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.EXPIRED
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED and "the approval expired" in step.error
    assert EFFECTS == {}
    assert LineageEvent.objects.filter(run_uuid=run.pk, kind="approval.expired").exists()


def test_an_expiry_can_halt_the_run(held):
    run, _approval = held(person("sam"), on_approval_expiry="halt")
    approvals_expire(now=timezone.now() + timedelta(days=2))
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED
    assert run.reason == "the approval expired: no decision within 1440 minutes"


def test_an_expiry_escalates_once_then_rejects(held, finance):
    managers = Group.objects.create(name="managers")
    manager = person("max", groups=[managers])
    run, approval = held(
        person("sam"),
        on_approval_expiry="escalate",
        escalation_group=managers,
        approval_timeout_minutes=60,
    )
    later = timezone.now() + timedelta(minutes=61)
    approvals_expire(now=later)
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING and approval.escalated
    assert approval.group == managers
    client = Client()
    client.force_login(manager)
    assert f'id="approval-{approval.pk}"' in client.get(reverse("approvals:inbox")).content.decode()
    approvals_expire(now=later + timedelta(minutes=61))
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.EXPIRED
    kinds = list(LineageEvent.objects.filter(run_uuid=run.pk).values_list("kind", flat=True))
    assert kinds.index("approval.escalated") < kinds.index("approval.expired")


def test_approve_with_edited_arguments_fires_the_edit_and_records_the_difference(held, finance):
    run, approval = held(person("sam"))
    member = person("mia", groups=[finance])
    client = Client()
    client.force_login(member)
    client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "approve", "arguments": '{"text": "pay less"}'},
    )
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED
    assert approval.arguments == {"text": "pay"} and approval.edited_arguments == {
        "text": "pay less"
    }
    run_until_rest(run)
    assert EFFECTS == {"send:pay less": 1}
    event = LineageEvent.objects.get(run_uuid=run.pk, kind="approval.approved")
    assert event.payload["edited"] == {"text": {"from": "pay", "to": "pay less"}}


def test_edited_arguments_that_break_the_schema_are_refused(held, finance):
    run, approval = held(person("sam"))
    member = person("mia", groups=[finance])
    client = Client()
    client.force_login(member)
    response = client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "approve", "arguments": '{"text": 12}'},
        follow=True,
    )
    assert "the edited arguments do not match test_send&#x27;s schema" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING and approval.edited_arguments is None
    assert Run.objects.get(pk=run.pk).steps.get(kind="tool").arguments == {"text": "pay"}


def test_decided_approvals_are_searchable(held, finance):
    member = person("mia", groups=[finance])
    _, first = held(person("sam"))
    approval_decide(approval=first, user=member, approve=False, reason="wrong vendor")
    _, second = held(person("sue"))
    approval_decide(approval=second, user=member, approve=True)
    client = Client()
    client.force_login(member)
    page = client.get(reverse("approvals:inbox"), {"q": "vendor"}).content.decode()
    assert "wrong vendor" in page and page.count("<tr><td>Approve an action") == 1


def test_bulk_approve_takes_read_and_reversible_actions_only(make_task, operator_client):
    reversible = make_task([{"calls": [("test_note", {"text": "n"})]}], tools=["test_note"])
    irreversible = make_task([{"calls": [("test_send", {"text": "s"})]}], tools=["test_send"])
    runs = []
    for task in (reversible, reversible, irreversible):
        operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    runs = list(Run.objects.all())
    for run in runs:
        run_until_rest(run)
    ids = list(Approval.objects.values_list("pk", flat=True))
    response = operator_client.post(reverse("approvals:bulk_approve"), {"ids": ids}, follow=True)
    page = response.content.decode()
    assert "Approved 2." in page and "test_send: decide it on its own" in page
    statuses = dict(Approval.objects.values_list("tool_name", "status").distinct())
    assert statuses["test_send"] == ApprovalStatus.PENDING
    assert set(Approval.objects.filter(tool_name="test_note").values_list("status", flat=True)) == {
        ApprovalStatus.APPROVED
    }


def test_the_agent_asks_a_person_and_reads_the_answer(make_task, operator):
    seen = []

    def agent(messages):
        from agentops.runtime.models.scripted import scripted_turn

        seen.append(messages[-1])
        if len(seen) == 1:
            return scripted_turn({"calls": [("ask_person", {"question": "Which batch?"})]}, 0)
        return scripted_turn({"content": "done"}, 1)

    from agentops.runtime.models.scripted import SCRIPTS

    task = make_task([], self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = agent
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    approval = Approval.objects.get(run=run)
    assert approval.kind == "question" and approval.gate == "the agent asks: Which batch?"
    with pytest.raises(DecisionError, match="write your answer"):
        approval_decide(approval=approval, user=operator, approve=True)
    approval_decide(approval=approval, user=operator, approve=True, reason="2026-11")
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    assert '"answer": "2026-11"' in seen[-1]["content"]


def test_the_group_is_reminded_once_before_the_deadline(held, finance):
    person("mia", groups=[finance])
    _run, _approval = held(person("sam"), approval_timeout_minutes=60)
    mail.outbox.clear()
    approvals_expire(now=timezone.now() + timedelta(minutes=30))
    assert mail.outbox == []  # half the time is left
    approvals_expire(now=timezone.now() + timedelta(minutes=50))
    approvals_expire(now=timezone.now() + timedelta(minutes=55))
    assert len(mail.outbox) == 1 and mail.outbox[0].subject.startswith("[agentops] Reminder")


def test_the_reminder_keeps_to_the_approvals_own_window(held, finance):
    person("mia", groups=[finance])
    run, _approval = held(person("sam"), approval_timeout_minutes=60)
    Task.objects.filter(pk=run.task_id).update(approval_timeout_minutes=1440)
    mail.outbox.clear()
    approvals_expire(now=timezone.now() + timedelta(minutes=30))
    assert mail.outbox == []  # half its own hour is left, though a day is the task's now
    approvals_expire(now=timezone.now() + timedelta(minutes=50))
    assert len(mail.outbox) == 1 and mail.outbox[0].subject.startswith("[agentops] Reminder")


def test_an_opened_approval_is_posted_to_the_webhook_signed(
    held, settings, django_capture_on_commit_callbacks
):
    import hashlib
    import hmac
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["X-Agentops-Signature"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    settings.AGENTOPS_APPROVAL_WEBHOOK_URL = f"http://127.0.0.1:{server.server_address[1]}/hook"
    settings.AGENTOPS_APPROVAL_WEBHOOK_SECRET = "hook-secret"
    try:
        with django_capture_on_commit_callbacks(execute=True):
            _, approval = held(person("sam"))
        thread.join(timeout=10)
    finally:
        server.server_close()
    ((signature, body),) = received
    expected = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"
    document = json.loads(body)
    assert document["approval"] == approval.pk and document["tool"] == "test_send"


def test_an_edit_that_a_deny_rule_forbids_is_refused(held, finance):
    from tasks.models import GrantRule, ToolGrant
    from tasks.services import task_version_current

    run, approval = held(person("sam"))
    grant = ToolGrant.objects.get(task=run.task)
    GrantRule.objects.create(grant=grant, effect="deny", expression='args.text == "all"')
    # The rule joins the task's next version; pin this run to it, as if it started there.
    run.task_version = task_version_current(task=run.task)
    run.save(update_fields=["task_version"])
    with pytest.raises(DecisionError, match="the edited call is denied by rule 1"):
        approval_decide(
            approval=approval,
            user=person("mia", groups=[finance]),
            approve=True,
            arguments={"text": "all"},
        )


def test_the_escalation_group_is_told(held, finance, django_capture_on_commit_callbacks):
    managers = Group.objects.create(name="managers")
    person("max", groups=[managers])
    held(person("sam"), on_approval_expiry="escalate", escalation_group=managers)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        approvals_expire(now=timezone.now() + timedelta(days=2))
    assert [message.to for message in mail.outbox] == [["max@example.com"]]


def test_an_expiry_gives_the_approvals_own_window_not_the_tasks_current_timeout(held):
    run, _approval = held(person("sam"), on_approval_expiry="halt", approval_timeout_minutes=1)
    Task.objects.filter(pk=run.task_id).update(approval_timeout_minutes=1440)
    approvals_expire(now=timezone.now() + timedelta(minutes=2))
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED
    assert run.reason == "the approval expired: no decision within 1 minute"


def test_four_eyes_show_the_starter_the_item_as_waiting_for_someone_else(held, finance):
    starter = person("sam", groups=[finance])
    member = person("mia", groups=[finance])
    _run, approval = held(starter, four_eyes=True)

    def inbox_as(user: User) -> tuple[str, str]:
        client = Client()
        client.force_login(user)
        page = client.get(reverse("approvals:inbox")).content.decode()
        start = page.index(f'id="approval-{approval.pk}"')
        count = client.get(reverse("approvals:count")).content.decode()
        return page[start : page.index("</article>", start)], count

    item, count = inbox_as(starter)
    assert "Waiting for someone else: four eyes, you started this run" in item
    assert 'name="decision"' not in item and 'name="ids"' not in item
    assert 'class="count zero"' in count and ">0</span>" in count

    item, count = inbox_as(member)
    assert "Waiting for someone else" not in item and 'value="approve"' in item
    assert ">1</span>" in count


def test_four_eyes_refuse_the_starter_through_the_inbox_and_keep_the_item_waiting(held, finance):
    starter = person("sam", groups=[finance])
    _run, approval = held(starter, four_eyes=True)
    client = Client()
    client.force_login(starter)
    response = client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "approve"},
        headers={"HX-Request": "true"},
    )
    body = response.content.decode()
    assert "four eyes: you started this run" in body and "Waiting for someone else" in body
    assert 'name="decision"' not in body
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_decision_and_the_expirer_at_the_same_moment_do_not_deadlock(held, finance):
    # The decision holds the run's lock and is about to lock the approval just as the
    # expirer starts on it. Both take the run first, then the approval, so the expirer
    # waits and then finds the approval decided; taken the other way round, each would
    # wait for the other, and PostgreSQL would abort one with "deadlock detected".
    import threading
    import time

    from django.db import connections, transaction

    mia = person("mia", groups=[finance])
    run, approval = held(person("sam"), approval_timeout_minutes=1)
    expiring = threading.Event()
    errors: list[BaseException] = []

    def decide() -> None:
        try:
            with transaction.atomic():
                Run.objects.select_for_update().get(pk=run.pk)
                expiring.wait(timeout=10)
                time.sleep(0.5)  # the expirer reaches its first lock meanwhile
                approval_decide(approval=approval, user=mia, approve=True)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    def expire() -> None:
        try:
            expiring.set()
            approvals_expire(now=timezone.now() + timedelta(minutes=2))
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=decide), threading.Thread(target=expire)]
    threads[0].start()
    time.sleep(0.2)  # the decision holds the run first
    threads[1].start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED
