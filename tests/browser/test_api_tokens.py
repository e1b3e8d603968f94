"""The API as a newcomer meets it in Chromium: a token made on the tokens page, shown
once, used to start a run, then revoked and refused; the interactive docs load from
this server alone."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from playwright.sync_api import Page, expect

from agentops.models import ApiToken
from tasks.models import Run
from tests.browser.test_console import log_in


@pytest.mark.django_db(transaction=True)
def test_a_token_made_on_the_page_starts_a_run_until_it_is_revoked(live_server, page: Page):
    call_command("load_demo", stdout=StringIO())
    log_in(page, live_server.url)
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("nightly job")
    page.get_by_label("Scope").select_option("operate")
    page.get_by_role("button", name="Make the token").click()
    secret = page.locator("#token-secret").inner_text().strip()
    assert len(secret) > 30
    assert secret not in "".join(ApiToken.objects.values_list("secret_hash", flat=True))

    headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "nightly-2026-11"}
    body = {"task": "reconcile-invoices", "input": {"batch": "2026-11"}}
    started = page.request.post(f"{live_server.url}/api/runs", data=body, headers=headers)
    assert started.status == 201, started.text()
    again = page.request.post(f"{live_server.url}/api/runs", data=body, headers=headers)
    assert again.status == 200 and again.json()["id"] == started.json()["id"]
    assert Run.objects.count() == 1

    # Shown once: the page, visited again, has only its prefix.
    page.goto(f"{live_server.url}/accounts/tokens/")
    expect(page.locator("#token-rows")).to_contain_text("nightly job")
    assert secret not in page.content()
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("#token-rows")).to_contain_text("revoked")
    refused = page.request.get(f"{live_server.url}/api/runs", headers=headers)
    assert refused.status == 401
    assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.django_db(transaction=True)
def test_the_interactive_docs_load_from_this_server_alone(live_server, page: Page):
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(f"{live_server.url}/api/docs")
    expect(page.get_by_text("/api/runs").first).to_be_visible()
    assert asked and all(url.startswith(live_server.url) for url in asked), asked
