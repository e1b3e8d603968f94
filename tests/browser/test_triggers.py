"""Triggers as an operator meets them, in Chromium: the demo's schedule and webhook on
the task page, a delivery's run found through the runs list's filter (htmx swaps the
rows and the URL keeps the filter), and the run page saying what started it."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from playwright.sync_api import Page, expect

from demo.triggers import DEMO_WEBHOOK_BODY
from tasks.models import Trigger
from triggers.services import trigger_fire


@pytest.mark.django_db(transaction=True)
def test_a_webhook_run_is_found_by_its_trigger_and_says_what_started_it(live_server, page: Page):
    call_command("load_demo", stdout=StringIO())
    webhook = Trigger.objects.get(kind=Trigger.Kind.WEBHOOK, task__slug="reconcile-invoices")
    fired = trigger_fire(trigger_id=webhook.pk, key="msg_browser_1", payload=DEMO_WEBHOOK_BODY)
    assert fired.accepted
    page.set_default_timeout(15_000)
    page.goto(f"{live_server.url}/")
    page.get_by_label("Username").fill("demo")
    page.get_by_label("Password").fill("demo-password")
    page.get_by_role("button", name="Log in").click()

    page.goto(f"{live_server.url}/tasks/reconcile-invoices/")
    card = page.locator(f"#trigger-{webhook.pk}")
    expect(card).to_contain_text(f"{live_server.url}/hooks/demo-batch-closed/")
    expect(card).to_contain_text("msg_browser_1")
    expect(page.locator("#triggers")).to_contain_text("Reconcile every night")

    page.goto(f"{live_server.url}/runs/")
    page.get_by_label("Started by").select_option("cron")
    expect(page).to_have_url(f"{live_server.url}/runs/?started=cron")
    expect(page.locator("#run-rows")).to_contain_text("No run matches these filters")
    page.get_by_label("Started by").select_option("webhook")
    expect(page).to_have_url(f"{live_server.url}/runs/?started=webhook")
    page.get_by_role("link", name="Batch closed (accounting webhook)").click()
    expect(page.locator("#trigger-filter")).to_contain_text("Batch closed (accounting webhook)")

    page.locator("#run-rows").get_by_role("link", name="Reconcile invoices").click()
    expect(page.locator("#started-by")).to_contain_text("the trigger Batch closed")
    expect(page.get_by_text("msg_browser_1")).to_be_visible()
    page.locator("details.payload summary").click()
    expect(page.locator("details.payload pre")).to_contain_text('"closed_by": "erp"')
