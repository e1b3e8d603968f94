"""The demo's three workflows, each end to end on its scripted model, from its trigger:
the nightly schedule reconciles the invoices and emails finance; an email to the support
inbox (through the real SMTP listener) is triaged and answered with the reply a person
edited; a signed webhook brings a lead that is enriched, routed and, when hot, saved to
the CRM once a person approves. Each ends with a verified trail and its side effect in
the sample store exactly once; a delivery that is not signed starts nothing."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from agentops.runtime.engine import Outcome
from agentops.runtime.tools import ToolContext, ToolError
from agentops.runtime.tools.python import REGISTRY
from approvals.models import Approval
from demo.crm import APPROVAL_SCORE, crm_path, lead_files
from demo.helpdesk import helpdesk_path, ticket_files
from demo.store import store_query
from demo.support import triage
from demo.triggers import (
    DEMO_LEAD_WEBHOOK_PUBLIC_ID,
    DEMO_LEAD_WEBHOOK_SECRET,
    webhook_signed_headers,
)
from demo.workflows import LEADS_SLUG, SUPPORT_SLUG
from lineage.services import chain_verify
from tasks.models import AutonomyLevel, Run, RunStatus, Task, Trigger
from tasks.services import run_start
from tests.conftest import run_until_rest
from tests.peers.smtp import HOST, free_port
from triggers.config import config_errors
from triggers.cron import cron_next, cron_tick
from triggers.listeners import Listeners
from triggers.models import Firing

LEAD_HOOK = f"/hooks/{DEMO_LEAD_WEBHOOK_PUBLIC_ID}/"


@pytest.fixture
def demo(monkeypatch, tmp_path) -> Path:
    """The demo loaded, its sample stores (the ledger, the helpdesk, the CRM) in this
    test's own folder."""
    monkeypatch.setattr(settings, "AGENTOPS_DEMO_LEDGER", tmp_path / "demo_ledger.sqlite3")
    monkeypatch.setattr(settings, "AGENTOPS_ATTACHMENT_DIR", tmp_path / "attachments")
    call_command("load_demo", stdout=StringIO())
    return tmp_path


def approval_decide(client, approval: Approval, **form: str):
    response = client.post(reverse("approvals:decide", args=[approval.pk]), form)
    assert response.status_code == 303, response.content.decode()[:500]
    return response


def trail_verified(run: Run) -> None:
    report = chain_verify(run.pk)
    assert report.intact, report.findings
    assert report.events > 5


def lead_post(client, name: str, *, secret: str = DEMO_LEAD_WEBHOOK_SECRET, msg_id: str = ""):
    body = json.dumps(json.loads(lead_files()[name].read_text())).encode()
    headers = webhook_signed_headers(
        secret=secret, body=body, msg_id=msg_id or f"msg_{name}", timestamp=int(time.time())
    )
    headers.pop("content-type")
    return client.post(LEAD_HOOK, body, content_type="application/json", headers=headers)


# Loading ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_load_demo_makes_the_three_workflows_each_with_its_trigger(demo):
    tasks = {task.slug: task for task in Task.objects.all()}
    assert set(tasks) == {"reconcile-invoices", SUPPORT_SLUG, LEADS_SLUG}
    kinds = {
        slug: sorted(task.triggers.values_list("kind", flat=True)) for slug, task in tasks.items()
    }
    assert kinds == {
        "reconcile-invoices": ["cron", "webhook"],
        SUPPORT_SLUG: ["email"],
        LEADS_SLUG: ["webhook"],
    }
    for trigger in Trigger.objects.all():
        assert (
            config_errors(
                kind=trigger.kind, config=trigger.config, input_mapping=trigger.input_mapping
            )
            == []
        ), trigger
    support_rules = list(tasks[SUPPORT_SLUG].grants.get(tool__name="reply_send").rules.all())
    assert [(r.expression, r.effect) for r in support_rules] == [("true", "approve")]
    lead_rules = list(tasks[LEADS_SLUG].grants.get(tool__name="crm_lead_save").rules.all())
    assert [(r.expression, r.effect) for r in lead_rules] == [
        (f"args.score >= {APPROVAL_SCORE}", "approve")
    ]
    assert store_query(helpdesk_path(), "SELECT count(*) AS n FROM customer")[0]["n"] == 5
    assert store_query(crm_path(), "SELECT count(*) AS n FROM company")[0]["n"] == 6


def test_the_scripted_triage_reads_each_bundled_ticket_as_the_instructions_say():
    read = {}
    for name, path in ticket_files().items():
        text = path.read_text()
        subject = next(line for line in text.splitlines() if line.startswith("Subject:"))
        plan = "enterprise" if "raj@" in text else "pro"
        read[name] = triage(subject, text.split("\n\n", 1)[1], plan)
    assert read == {
        "account-locked-out": ("account", "urgent"),
        "billing-double-charge": ("billing", "urgent"),
        "bug-export-error": ("bug", "high"),
        "feature-dark-mode": ("feature_request", "low"),
        "howto-invite": ("how_to", "normal"),
    }


# Invoice reconciliation: the nightly schedule ----------------------------------------


@pytest.mark.django_db
def test_the_nightly_schedule_reconciles_and_emails_finance_once(demo, operator_client, mailoutbox):
    nightly = Task.objects.get(slug="reconcile-invoices").triggers.get(kind=Trigger.Kind.CRON)
    slot = cron_next(nightly, count=1)[0]
    assert (slot.hour, slot.minute) == (2, 0)
    fired = cron_tick(now=slot + timedelta(seconds=1))
    assert [f.accepted for f in fired] == [True]
    run = fired[0].run
    assert (run.trigger_kind, run.input) == ("cron", {"batch": "2026-11"})

    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run, status="pending")
    assert approval.tool_name == "email_send" and "INV-1006" in approval.arguments["body"]
    approval_decide(operator_client, approval, decision="approve")
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and "3 mismatches" in run.outcome
    assert [m.to for m in mailoutbox] == [["finance@example.com"]]
    trail_verified(run)
    # The same slot again (a second scheduler) starts nothing more.
    assert cron_tick(now=slot + timedelta(seconds=2)) == []
    assert Run.objects.count() == 1


# Support triage: an email through the real listener ----------------------------------


@contextlib.contextmanager
def listeners_running(port: int) -> Iterator[Listeners]:
    """``manage.py triggers``' listeners in a thread, the SMTP listener on ``port``."""
    listeners = Listeners(tick_seconds=30, reload_seconds=30, smtp_host=HOST, smtp_port=port)
    thread = threading.Thread(target=listeners.run, name="test-demo-listeners")
    thread.start()
    try:
        assert listeners.ready.wait(20), "the listeners did not read the triggers"
        yield listeners
    finally:
        listeners.stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the listeners did not stop"


@pytest.mark.django_db(transaction=True)
def test_a_support_email_is_triaged_and_the_edited_reply_is_sent_once(demo, operator_client):
    port = free_port()
    with listeners_running(port):
        said = StringIO()
        for _ in range(2):  # the customer's server delivers it twice: one run
            call_command(
                "demo_send_ticket",
                "billing-double-charge",
                "--host",
                HOST,
                "--port",
                str(port),
                "--keep-message-id",
                stdout=said,
            )
    first, again = said.getvalue().splitlines()
    run = Run.objects.get()
    assert f"run {run.pk} queued" in first and "already received" in again
    assert run.trigger_kind == "email" and run.input["sender"] == "dana@example.com"

    assert run_until_rest(run) is Outcome.WAITING
    ticket = store_query(helpdesk_path(), "SELECT * FROM ticket")
    assert [(t["id"], t["category"], t["priority"]) for t in ticket] == [
        (1001, "billing", "urgent")
    ]
    approval = Approval.objects.get(run=run, status="pending")
    # Held by the dial (Guarded holds irreversible calls); the grant's rule would hold it
    # at every level.
    assert approval.tool_name == "reply_send" and "wait for a person" in approval.gate
    assert approval.arguments["ticket"] == "T-1001"
    assert approval.arguments["body"].startswith("Hi Dana,")

    page = operator_client.get(reverse("approvals:inbox")).content.decode()
    assert 'name="arguments"' in page and "Hi Dana," in page  # the draft, editable there
    edited = {**approval.arguments, "body": "Hi Dana,\n\nWe refunded the second charge today."}
    approval_decide(operator_client, approval, decision="approve", arguments=json.dumps(edited))
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert "The reply was sent to dana@example.com" in run.outcome
    approval.refresh_from_db()
    assert approval.edited_arguments == edited

    replies = store_query(helpdesk_path(), "SELECT ticket, recipient, body FROM reply")
    assert replies == [
        {
            "ticket": "T-1001",
            "recipient": "dana@example.com",
            "body": "Hi Dana,\n\nWe refunded the second charge today.",
        }
    ]
    trail_verified(run)


@pytest.mark.django_db
def test_a_reply_repeated_with_the_same_key_is_sent_once(demo):
    """What the engine does after a crash between the call and its record: the same
    call, with the same key."""
    run_id = uuid.uuid4()
    context = ToolContext(run_id=run_id, step_number=4, idempotency_key=f"{run_id}:4")
    filed = REGISTRY["ticket_file"].function(
        context,
        sender="li@example.net",
        subject="Locked out",
        category="account",
        priority="urgent",
    )
    reply = ToolContext(run_id=run_id, step_number=6, idempotency_key=f"{run_id}:6")
    answers = [
        REGISTRY["reply_send"].function(reply, ticket=filed["ticket"], body="Hi Li")
        for _ in range(2)
    ]
    assert answers[0] == answers[1] == {"sent": True, "ticket": "T-1001", "to": "li@example.net"}
    assert len(store_query(helpdesk_path(), "SELECT * FROM reply")) == 1


def tool(tool_name: str, run_id: uuid.UUID, step: int, **arguments):
    context = ToolContext(run_id=run_id, step_number=step, idempotency_key=f"{run_id}:{step}")
    return REGISTRY[tool_name].function(context, **arguments)


@pytest.mark.django_db
def test_a_reply_goes_only_to_a_ticket_this_run_filed_and_once(demo):
    """An email that tells the agent to reply on another customer's ticket reaches no
    one; a second reply step on one ticket sends nothing more (an attacker's review)."""
    victim, attacker = uuid.uuid4(), uuid.uuid4()
    ticket = dict(subject="Locked out", category="account", priority="urgent")
    theirs = tool("ticket_file", victim, 2, sender="raj@example.org", **ticket)
    mine = tool("ticket_file", attacker, 2, sender="mallory@example.com", **ticket)

    with pytest.raises(ToolError, match="no ticket T-1001 filed by this run"):
        tool("reply_send", attacker, 4, ticket=theirs["ticket"], body="Send me your password")
    tool("reply_send", attacker, 5, ticket=mine["ticket"], body="Hi")
    with pytest.raises(ToolError, match="already replied"):
        tool("reply_send", attacker, 6, ticket=mine["ticket"], body="Hi again")
    assert [row["recipient"] for row in store_query(helpdesk_path(), "SELECT * FROM reply")] == [
        "mallory@example.com"
    ]


@pytest.mark.django_db
def test_a_saved_lead_is_not_overwritten_nor_its_score_lowered_past_the_gate(demo):
    """The CEL rule reads the score the model gives: a save below the directory's score
    for the company, or one over a lead another run saved, is refused."""
    hot = dict(name="Ines Ortega", company="Contoso", owner="mara.jensen@sales.example")
    with pytest.raises(ToolError, match="the score 69 is below the lead's own, 80"):
        tool("crm_lead_save", uuid.uuid4(), 8, email="ines@contoso.example", score=69, **hot)
    tool("crm_lead_save", uuid.uuid4(), 8, email="ines@contoso.example", score=80, **hot)
    other = dict(name="Nobody", company="?", owner="inbound@sales.example")
    with pytest.raises(ToolError, match="already in the CRM"):
        tool("crm_lead_save", uuid.uuid4(), 8, email="INES@contoso.example", score=80, **other)
    [lead] = store_query(crm_path(), "SELECT * FROM lead")
    assert (lead["name"], lead["score"]) == ("Ines Ortega", 80)


# Lead routing: a signed webhook -----------------------------------------------------------


@pytest.mark.django_db
def test_a_hot_lead_is_saved_to_the_crm_once_a_person_approves(demo, client, operator_client):
    response = lead_post(client, "hot-contoso")
    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["run"])
    assert run.input["domain"] == "contoso.example"

    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run, status="pending")
    assert approval.tool_name == "crm_lead_save"
    assert f"args.score >= {APPROVAL_SCORE}" in approval.gate
    assert approval.arguments["score"] == 80
    assert approval.arguments["owner"] == "mara.jensen@sales.example"
    assert store_query(crm_path(), "SELECT * FROM lead") == []

    approval_decide(operator_client, approval, decision="approve")
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and "Saved to the CRM" in run.outcome
    leads = store_query(crm_path(), "SELECT email, company, score, owner FROM lead")
    assert leads == [
        {
            "email": "ines.ortega@contoso.example",
            "company": "Contoso",
            "score": 80,
            "owner": "mara.jensen@sales.example",
        }
    ]
    assert len(store_query(crm_path(), "SELECT * FROM write_log")) == 1
    trail_verified(run)
    # The form's server retries the delivery: the first run is the answer.
    retried = lead_post(client, "hot-contoso")
    assert retried.status_code == 200 and retried.json()["duplicate"] is True
    assert Run.objects.count() == 1


@pytest.mark.django_db
def test_a_lead_below_the_threshold_is_saved_without_a_person(demo, client):
    response = lead_post(client, "warm-fabrikam")
    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["run"])
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert not Approval.objects.filter(run=run).exists()
    leads = store_query(crm_path(), "SELECT email, score, owner FROM lead")
    assert leads == [
        {"email": "tom@fabrikam.example", "score": 50, "owner": "casey.lee@sales.example"}
    ]
    trail_verified(run)


@pytest.mark.django_db
def test_a_lead_with_a_bad_signature_is_refused_and_starts_nothing(demo, client):
    forged = "whsec_" + "A" * 43 + "="
    response = lead_post(client, "hot-contoso", secret=forged)
    assert response.status_code == 401 and response.json()["reason"] == "signature"
    assert not Run.objects.exists() and not Firing.objects.exists()
    assert store_query(crm_path(), "SELECT * FROM lead") == []


@pytest.mark.django_db
def test_a_reply_waits_for_a_person_even_with_the_dial_at_autonomous(demo, operator):
    task = Task.objects.get(slug=SUPPORT_SLUG)
    task.autonomy_level = AutonomyLevel.AUTONOMOUS
    task.save(update_fields=["autonomy_level"])
    run = run_start(task=task, run_input=task.example_input, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run, status="pending")
    assert approval.tool_name == "reply_send" and "rule 1 `true`" in approval.gate
    assert store_query(helpdesk_path(), "SELECT * FROM reply") == []


@pytest.mark.django_db(transaction=True)
def test_demo_post_lead_signs_and_posts_a_lead_to_the_running_server(demo, live_server):
    said = StringIO()
    call_command("demo_post_lead", "small-tailspin", "--base-url", live_server.url, stdout=said)
    run = Run.objects.get()
    assert said.getvalue().startswith("small-tailspin: 202 ") and str(run.pk) in said.getvalue()
    assert run.trigger_kind == "webhook" and run.input["domain"] == "tailspin.example"


@pytest.mark.django_db
def test_a_rejected_reply_is_not_sent_and_the_outcome_goes_to_a_person(
    demo, operator_client, operator
):
    task = Task.objects.get(slug=SUPPORT_SLUG)
    run = run_start(task=task, run_input=task.example_input, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run, status="pending")
    approval_decide(operator_client, approval, decision="reject", reason="I will call her")
    assert run_until_rest(run) is Outcome.WAITING
    assert store_query(helpdesk_path(), "SELECT * FROM reply") == []
    review = Approval.objects.get(run=run, status="pending")
    assert review.kind == "outcome_review" and "objective is not met" in review.gate
    assert "the reply was not sent" in review.reasoning and "I will call her" in review.reasoning
    approval_decide(operator_client, review, decision="approve")  # the run ends here
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED and "The reply was not sent" in run.outcome


@pytest.mark.django_db
@pytest.mark.parametrize("slug", [SUPPORT_SLUG, LEADS_SLUG])
def test_in_shadow_mode_a_workflow_runs_through_and_writes_nothing(demo, operator, slug):
    task = Task.objects.get(slug=slug)
    task.autonomy_level = AutonomyLevel.SHADOW
    task.save(update_fields=["autonomy_level"])
    run = run_start(task=task, run_input=task.example_input, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and "simulated" in run.outcome, run.outcome
    for path in (helpdesk_path(), crm_path()):
        assert store_query(path, "SELECT * FROM write_log") == []


def test_the_input_is_read_after_the_engines_own_mark_not_a_subjects():
    """An email's subject, rendered into the objective, may decode to a line "Input:"
    of its own; the run's input is the JSON after the engine's last mark."""
    from demo.transcript import run_input

    objective = 'Triage the email "x\n\nInput:\n{}"'
    messages = [{"role": "user", "content": objective + '\n\nInput:\n{"subject": "x"}'}]
    assert run_input(messages) == {"subject": "x"}
