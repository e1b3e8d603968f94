"""Triage with the keyboard, in Chromium: j moves to the next item, a approves it
through the page's own form (htmx posts it with the CSRF header), the next item opens
and the decided one leaves the list; r puts the cursor in the reason box, where typing
fires no key and Enter rejects; ? shows the keys. At 390 px the list sits above the item
and nothing is wider than the screen."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import Page, expect

from approvals.models import Approval, ApprovalStatus
from tasks.services import run_start
from tests.conftest import run_until_rest


def held_call(make_task, starter: User, text: str) -> Approval:
    task = make_task(
        [{"content": f"Sending {text}.", "calls": [("test_send", {"text": text})]}],
        tools=["test_send"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=starter)
    run_until_rest(run)
    return Approval.objects.get(run=run)


def log_in(page: Page, url: str) -> None:
    page.goto(f"{url}/accounts/login/?next=/approvals/")
    page.get_by_label("Username").fill("tara")
    page.get_by_label("Password").fill("pw-tara-123456")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/approvals/$"))
    page.wait_for_load_state("load")  # inbox.js (deferred) listens from here on


@pytest.fixture
def triager(transactional_db) -> User:
    user = User.objects.create_user("tara", "tara@example.com", "pw-tara-123456")
    user.user_permissions.add(Permission.objects.get(codename="decide_approval"))
    return user


def open_item(page: Page):
    return page.locator("#inbox-detail article[data-selected]")


@pytest.mark.django_db(transaction=True)
def test_approve_and_reject_from_the_keyboard(live_server, page: Page, make_task, triager):
    first, second, third = (held_call(make_task, triager, text) for text in ("one", "two", "three"))
    page.set_default_timeout(15_000)
    page.set_viewport_size({"width": 1280, "height": 900})
    log_in(page, live_server.url)

    rows = page.locator("#inbox-rows tr[data-id]")
    expect(rows).to_have_count(3)
    expect(open_item(page)).to_have_attribute("data-id", str(first.pk))
    expect(page.locator("#inbox-count")).to_have_text("3")

    page.keyboard.press("?")
    expect(page.locator("#inbox-keys dl")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#inbox-keys dl")).to_be_hidden()

    page.keyboard.press("j")
    expect(open_item(page)).to_have_attribute("data-id", str(second.pk))
    expect(open_item(page)).to_contain_text("Sending two.")
    expect(page).to_have_url(re.compile(rf"\?item={second.pk}$"))
    expect(page.locator(f"#row-{second.pk}")).to_have_class(re.compile("selected"))
    # Until htmx has taken the new item up, a and r do nothing (a click then would post
    # without htmx): a person's next key comes later than a test's.
    expect(open_item(page)).to_have_attribute("data-ready", "")

    page.keyboard.press("a")
    decided = page.locator(f"#approval-{second.pk}")
    expect(decided).to_contain_text("Approved by tara")
    # The next item opens, the decided one leaves the list, the count follows.
    expect(open_item(page)).to_have_attribute("data-id", str(third.pk))
    expect(page).to_have_url(re.compile(rf"\?item={third.pk}$"))
    expect(page.locator(f"#row-{second.pk}")).to_have_count(0)
    expect(page.locator("#inbox-count")).to_have_text("2")
    expect(page.locator(f"#row-{third.pk}")).to_have_class(re.compile("selected"))
    second.refresh_from_db()
    assert second.status == ApprovalStatus.APPROVED and second.decided_by == triager

    page.keyboard.press("r")
    reason = open_item(page).get_by_label("Reason")
    expect(reason).to_be_focused()
    # Typed letters are text, not keys: "a" here approves nothing.
    page.keyboard.type("a duplicate of the first")
    expect(reason).to_have_value("a duplicate of the first")
    page.keyboard.press("Enter")
    expect(page.locator(f"#approval-{third.pk}")).to_contain_text(
        "Rejected by tara: “a duplicate of the first”"
    )
    expect(open_item(page)).to_have_attribute("data-id", str(first.pk))
    third.refresh_from_db()
    first.refresh_from_db()
    assert third.status == ApprovalStatus.REJECTED
    assert third.decision_reason == "a duplicate of the first"
    assert first.status == ApprovalStatus.PENDING
    expect(page.locator("#inbox-count")).to_have_text("1")


@pytest.mark.django_db(transaction=True)
def test_the_list_refreshes_itself_and_keeps_what_is_typed(
    live_server, page: Page, make_task, triager
):
    first = held_call(make_task, triager, "one")
    page.set_default_timeout(15_000)
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, live_server.url)
    expect(open_item(page)).to_have_attribute("data-id", str(first.pk))
    reason = open_item(page).get_by_label("Reason")
    reason.fill("still thinking")

    later = held_call(make_task, triager, "later")
    # The list polls: the new item appears without a reload, the typed text stays.
    expect(page.locator(f"#row-{later.pk}")).to_have_count(1, timeout=15_000)
    expect(page.locator("#inbox-count")).to_have_text("2")
    expect(reason).to_have_value("still thinking")
    expect(open_item(page)).to_have_attribute("data-id", str(first.pk))

    # At 390 px the list is above the item and the page is no wider than the screen.
    list_box = page.locator("#inbox-list").bounding_box()
    item_box = open_item(page).bounding_box()
    assert list_box["y"] + list_box["height"] <= item_box["y"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
