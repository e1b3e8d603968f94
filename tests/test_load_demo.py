"""``manage.py load_demo``: the demo's task is created once, then left to its operator."""

from __future__ import annotations

import json
import shutil
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command

from demo.triggers import DEMO_WEBHOOK_BODY, DEMO_WEBHOOK_SECRET
from tasks.autonomy import autonomy_request
from tasks.models import Run, Task, Trigger
from tests.conftest import require
from triggers.config import config_errors
from triggers.cron import cron_next, slot_payload
from triggers.services import input_mapped

pytestmark = pytest.mark.django_db


def test_loading_the_demo_again_leaves_the_operators_task_and_dial_as_they_are():
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    task.max_steps = 25
    task.instructions = "Ours now."
    task.save()
    autonomy_request(
        task=task, to_level=0, user=User.objects.get(username="demo"), reason="watch first"
    )

    output = StringIO()
    call_command("load_demo", stdout=output)
    task.refresh_from_db()
    assert (task.max_steps, task.instructions, task.autonomy_level) == (25, "Ours now.", 0)
    assert "an existing task is left as it is" in output.getvalue()
    assert task.grants.count() == 3


def test_the_demo_task_gets_a_nightly_schedule_and_a_signed_webhook_once():
    output = StringIO()
    call_command("load_demo", stdout=output)
    task = Task.objects.get(slug="reconcile-invoices")
    nightly = task.triggers.get(kind=Trigger.Kind.CRON)
    webhook = task.triggers.get(kind=Trigger.Kind.WEBHOOK)
    assert nightly.name == "Reconcile every night"
    assert nightly.config["expression"] == "0 2 * * *" and nightly.config["timezone"] == "UTC"
    assert (
        config_errors(kind="cron", config=nightly.config, input_mapping=nightly.input_mapping) == []
    )
    assert webhook.secret == DEMO_WEBHOOK_SECRET and webhook.public_id == "demo-batch-closed"
    assert task.max_live_runs == 3
    said = output.getvalue()
    assert "Trigger: Reconcile every night (Schedule (cron))" in said
    assert "http://127.0.0.1:8000/hooks/demo-batch-closed/" in said and "openssl dgst" in said

    webhook.enabled = False
    webhook.save()
    output = StringIO()
    call_command("load_demo", stdout=output)
    assert task.triggers.count() == 2
    assert not Trigger.objects.get(pk=webhook.pk).enabled
    assert "left as they are" in output.getvalue() and "curl" not in output.getvalue()


def test_the_demo_mappings_make_the_tasks_input_from_a_slot_and_a_delivery():
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    nightly = task.triggers.get(kind=Trigger.Kind.CRON)
    webhook = task.triggers.get(kind=Trigger.Kind.WEBHOOK)
    slot = cron_next(nightly, count=1)[0]
    slot_input = input_mapped(nightly.input_mapping, slot_payload(nightly.config, slot))
    delivery_input = input_mapped(webhook.input_mapping, DEMO_WEBHOOK_BODY)
    assert slot_input == delivery_input == {"batch": "2026-11"}


@pytest.mark.django_db(transaction=True)
def test_the_printed_curl_line_starts_a_run_on_the_running_server(live_server):
    """The line load_demo prints (and the guide shows), run by bash with openssl and
    curl against a live server: the delivery is signed as Standard Webhooks sign it."""
    for program in ("bash", "openssl", "curl", "base64", "od"):
        require(shutil.which(program) is not None, f"{program} is not installed")
    output = StringIO()
    call_command("load_demo", "--base-url", live_server.url, stdout=output)
    lines = output.getvalue().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("SECRET="))
    snippet = "\n".join(lines[start : start + 4])
    assert snippet.splitlines()[-1].startswith("curl ")

    answer = subprocess.run(
        ["bash", "-c", snippet], capture_output=True, text=True, timeout=60, check=True
    )
    body = json.loads(answer.stdout)
    run = Run.objects.get()
    assert str(run.pk) in answer.stdout, body
    assert run.input == {"batch": "2026-11"} and run.trigger_kind == "webhook"
    assert run.firing.payload == DEMO_WEBHOOK_BODY


def test_the_guide_shows_the_curl_line_load_demo_prints():
    output = StringIO()
    call_command("load_demo", stdout=output)
    lines = output.getvalue().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("SECRET="))
    guide = (Path(settings.BASE_DIR) / "docs" / "guide.md").read_text()
    assert "\n".join(lines[start : start + 4]) in guide


def test_the_other_two_workflows_are_made_once_and_say_how_to_start_them():
    output = StringIO()
    call_command("load_demo", "--base-url", "http://127.0.0.1:8731/", stdout=output)
    said = output.getvalue()
    assert "Task: Triage support email (triage-support) v1" in said
    assert "Trigger: Support inbox (inbound email) (Inbound email)" in said
    assert "python manage.py demo_send_ticket billing-double-charge" in said
    assert "Task: Enrich and route leads (route-leads) v1" in said
    # The site's address as make demo was given it, so the line works as printed.
    assert (
        ".venv/bin/python manage.py demo_post_lead hot-contoso --base-url http://127.0.0.1:8731\n"
    ) in said
    support = Task.objects.get(slug="triage-support")
    support.instructions = "Ours now."
    support.save()
    support.grants.get(tool__name="reply_send").rules.all().delete()

    output = StringIO()
    call_command("load_demo", stdout=output)
    support.refresh_from_db()
    assert support.instructions == "Ours now."
    assert not support.grants.get(tool__name="reply_send").rules.exists()
    assert support.triggers.count() == 1
    assert "Task: Triage support email (triage-support) v2, as it was" in output.getvalue()


def test_the_demo_is_not_loaded_where_others_can_reach_it(db, settings):
    """Its superuser's password and its webhooks' secrets are in the docs: a deployment
    answering other hosts gets them only when asked in words (an attacker's review)."""
    from django.contrib.auth import get_user_model
    from django.core.management.base import CommandError

    settings.ALLOWED_HOSTS = ["agentops.example.com", "localhost"]
    with pytest.raises(CommandError, match=r"answers agentops\.example\.com .*--allow-public"):
        call_command("load_demo", stdout=StringIO())
    assert not get_user_model().objects.filter(username="demo").exists()
    call_command("load_demo", "--allow-public", stdout=StringIO())
    assert get_user_model().objects.get(username="demo").is_superuser
