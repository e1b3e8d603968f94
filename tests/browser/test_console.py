"""The operator's console in Chromium: a run page follows its run without losing what an
operator types, and no page is wider than a phone's screen. Screenshots of each page at
both widths go to docs/screenshots/ when AGENTOPS_SCREENSHOTS points there."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command
from playwright.sync_api import Page, expect

from tasks.models import Run, Task
from tasks.services import run_start
from tests.browser.test_demo_flow import shoot
from tests.conftest import run_until_rest

WIDTHS = {"phone": 390, "desktop": 1280}


def log_in(page: Page, url: str) -> None:
    page.goto(f"{url}/accounts/login/")
    page.get_by_label("Username").fill("demo")
    page.get_by_label("Password").fill("demo-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


@pytest.mark.django_db(transaction=True)
def test_a_step_shows_without_a_reload_and_the_typed_reason_stays(live_server, page: Page):
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    run = run_start(task=task, run_input={"batch": "2026-11"}, user=None)
    page.set_default_timeout(15_000)
    log_in(page, live_server.url)
    page.goto(f"{live_server.url}/runs/{run.pk}/")
    expect(page.locator("#timeline-empty")).to_be_visible()
    reason = page.get_by_label("Why cancel (optional)")
    reason.fill("half a sentence of mine")

    # A worker records the run's steps while the page is open.
    run_until_rest(run)
    assert Run.objects.get(pk=run.pk).status == "waiting"
    last = run.steps.order_by("-number").first().number
    expect(page.locator(f"#step-{last}")).to_contain_text("email_send")
    expect(page.locator("#timeline-empty")).to_have_count(0)
    expect(page.locator("#run-summary .status").first).to_have_text("waiting")
    # What the operator typed is still there, in the same box.
    expect(reason).to_have_value("half a sentence of mine")
    # Each step once: appended, never repeated.
    assert page.locator("#timeline > li.step").count() == last


@pytest.mark.django_db(transaction=True)
def test_no_page_is_wider_than_the_screen(live_server, page: Page):
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    waiting = run_start(task=task, run_input={"batch": "2026-11"}, user=None)
    run_until_rest(waiting)
    log_in(page, live_server.url)
    tool = waiting.steps.filter(kind="tool").first().tool_name
    pages = {
        "overview": "/",
        "runs": "/runs/",
        "run-waiting": f"/runs/{waiting.pk}/",
        "approvals": "/approvals/",
        "lineage": f"/runs/{waiting.pk}/lineage/",
        "tasks": "/tasks/",
        "task": f"/tasks/{task.slug}/",
        "tools": "/tools/",
        "tool": f"/tools/{tool}/",
        "changes": "/tasks/changes/waiting/",
        "tokens": "/accounts/tokens/",
    }
    wide = []
    for size, width in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": 900})
        for name, path in pages.items():
            response = page.goto(f"{live_server.url}{path}")
            assert response is not None and response.status == 200, path
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            if overflow > 0:
                wide.append(f"{path} at {width} px: {overflow} px too wide")
            shoot(page, f"{name}-{size}")
        # The navigation is reachable at every width: every link on screen.
        for link in ("Overview", "Runs", "Tasks", "Tools", "Approvals", "API tokens", "Admin"):
            box = page.get_by_role("link", name=link).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, link
    assert not wide, "\n".join(wide)


@pytest.mark.django_db(transaction=True)
def test_overview_figures_lineage_stepping_and_an_export_that_verifies(
    live_server, page: Page, tmp_path
):
    from approvals.models import Approval, ApprovalStatus
    from lineage.export_lines import lines_verify
    from lineage.models import LineageEvent

    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    waiting = run_start(task=task, run_input={"batch": "2026-11"}, user=None)
    run_until_rest(waiting)
    page.set_default_timeout(15_000)
    log_in(page, live_server.url)

    # The overview's figures are the database's.
    page.goto(f"{live_server.url}/")
    pending = Approval.objects.filter(status=ApprovalStatus.PENDING).count()
    expect(page.locator("#approvals-count .figure-value")).to_have_text(str(pending))

    # Step through the trail with the keyboard: the URL and the selection follow.
    events = LineageEvent.objects.filter(run_uuid=waiting.pk).count()
    page.goto(f"{live_server.url}/runs/{waiting.pk}/lineage/?at=1")
    expect(page.locator("#e1")).to_have_attribute("aria-current", "step")
    page.keyboard.press("j")
    expect(page).to_have_url(re.compile(r"\?at=2"))
    expect(page.locator("#e2")).to_have_attribute("aria-current", "step")
    expect(page.locator("#state")).to_be_visible()

    # Export the trail from the page and verify the file.
    with page.expect_download() as download:
        page.get_by_role("link", name="JSON Lines").click()
    path = tmp_path / "trail.jsonl"
    download.value.save_as(path)
    report = lines_verify(path.read_text().splitlines())
    assert report.intact and report.events == events, report.problems
