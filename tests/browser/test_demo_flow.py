"""The acceptance path as a new user takes it, in Chromium: log in, start the demo,
watch its steps, approve the email in the inbox, see the run succeed, and see its
lineage verified. A real django-q2 worker advances the run."""

from __future__ import annotations

import os
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from playwright.sync_api import Page, expect

from tests.peers.workers import q2_cluster

SCREENSHOTS = Path(os.environ.get("AGENTOPS_SCREENSHOTS", settings.VAR_DIR / "screenshots"))


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.mark.django_db(transaction=True)
def test_the_demo_from_login_to_verified_lineage(live_server, page: Page, tmp_path):
    call_command("load_demo", stdout=StringIO())
    page.set_viewport_size({"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    with q2_cluster(tmp_path / "qcluster.log"):
        page.goto(f"{live_server.url}/runs/")
        page.get_by_label("Username").fill("demo")
        page.get_by_label("Password").fill("demo-password")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Runs")).to_be_visible()

        page.get_by_role("link", name="Tasks").click()
        page.get_by_role("link", name="Reconcile invoices").first.click()
        expect(page.locator("#id_input")).to_have_value('{\n  "batch": "2026-11"\n}')
        shoot(page, "task")
        page.get_by_role("button", name="Run", exact=True).click()

        # The run page refreshes itself while the worker works, until the email waits.
        expect(page.locator("#run-live .summary .status")).to_have_text("waiting")
        expect(page.locator("#step-8")).to_contain_text("email_send")
        expect(page.get_by_text("Scripted model.")).to_be_visible()
        shoot(page, "run-waiting")
        # The run page's stream brings the navigation's count with the held call.
        expect(page.locator("#inbox-count")).to_have_text("1")

        page.get_by_role("link", name="Decide it in the approval inbox").click()
        item = page.locator("article.approval")
        expect(item).to_contain_text("Supervised: every irreversible call waits for a person")
        expect(item).to_contain_text("INV-1006")
        shoot(page, "inbox")
        item.get_by_role("button", name="Approve").click()
        # htmx swaps the item in place and the count in the navigation follows.
        expect(item).to_contain_text("Approved by demo")
        expect(page.locator("#inbox-count")).to_have_text("0")

        item.get_by_role("link", name="Follow the run").click()
        expect(page.locator("#run-live .summary .status")).to_have_text("succeeded")
        expect(page.locator(".outcome")).to_contain_text("3 mismatches")
        shoot(page, "run-succeeded")

        page.get_by_role("link", name="Lineage").click()
        expect(page.locator("#verification")).to_contain_text("Verified.")
        shoot(page, "lineage")

        page.get_by_role("link", name="Tools").click()
        expect(page.get_by_role("link", name="email_send")).to_be_visible()
        shoot(page, "tools")
