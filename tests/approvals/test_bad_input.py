"""Bad input to the approval pages gets a clear 4xx naming what was wrong, never a 500,
and changes nothing: out-of-range and malformed ids, nesting past the limit, lone
surrogates and NUL in JSON, NUL in text, missing fields. Through real HTTP, on SQLite
and on PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

from html import unescape

import pytest
from django.urls import reverse

from approvals.models import Approval, ApprovalStatus
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

HUGE = "9" * 30
HTMX = {"headers": {"HX-Request": "true"}}


@pytest.fixture
def waiting_run(make_task, operator):
    from tasks.services import run_start

    task = make_task(
        [{"content": "Sending.", "calls": [("test_send", {"text": "hello"})]}, {"content": "ok"}],
        tools=["test_send"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.WAITING
    return run


def unchanged(run: Run, events_before: int) -> None:
    """Nothing was decided, nothing ran, nothing was written to the trail."""
    approval = Approval.objects.get(run=run)
    assert approval.status == ApprovalStatus.PENDING and approval.edited_arguments is None
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING
    assert LineageEvent.objects.filter(run_uuid=run.pk).count() == events_before
    assert EFFECTS == {}


def events_of(run: Run) -> int:
    return LineageEvent.objects.filter(run_uuid=run.pk).count()


# Ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [HUGE, str(2**63), "-1", "²", "abc", "1.5", "0x1", " "])
def test_bulk_approve_refuses_an_id_that_is_not_one_naming_it(waiting_run, operator_client, value):
    approval = Approval.objects.get(run=waiting_run)
    before = events_of(waiting_run)
    response = operator_client.post(
        reverse("approvals:bulk_approve"), {"ids": [str(approval.pk), value]}
    )
    assert response.status_code == 400
    page = unescape(response.content.decode())
    assert f"Nothing was approved: ids: {value!r} is not an approval id" in page
    unchanged(waiting_run, before)


def test_bulk_approve_takes_the_largest_id_there_can_be(waiting_run, operator_client):
    response = operator_client.post(reverse("approvals:bulk_approve"), {"ids": str(2**63 - 1)})
    assert response.status_code == 303  # no such approval: nothing to approve, said so


@pytest.mark.parametrize("view", ["approvals:decide", "approvals:reassign"])
def test_an_approval_id_out_of_range_in_the_url_is_a_400_naming_it(
    waiting_run, operator_client, view
):
    before = events_of(waiting_run)
    response = operator_client.post(
        reverse(view, args=[0]).replace("/0/", f"/{HUGE}/"), {"decision": "approve"}
    )
    assert response.status_code == 400
    assert f"approval id {HUGE} is out of range" in response.content.decode()
    unchanged(waiting_run, before)


# The decision form -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "text", "why"),
    [
        ("arguments", '{"text": ' + "[" * 200 + "]" * 200 + "}", "nesting deeper than 100"),
        ("arguments", '{"text": "\\ud800"}', "an unpaired surrogate"),
        ("arguments", '{"text": "a\\u0000b"}', "a NUL character (\\u0000) cannot be stored"),
        ("arguments", "[" * 100_000, "nesting deeper than 100"),
        ("arguments", '{"text": ' + "9" * 5000 + "}", "more than 3900 digits"),
        ("reason", "why\x00not", "The reason holds a NUL character, which cannot be stored"),
        ("reason", "r" * 2001, "The reason is longer than 2,000 characters"),
    ],
)
@pytest.mark.parametrize("htmx", [False, True])
def test_a_decision_with_bad_input_is_refused_naming_the_field(
    waiting_run, operator_client, field, text, why, htmx
):
    approval = Approval.objects.get(run=waiting_run)
    before = events_of(waiting_run)
    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]),
        {"decision": "approve", field: text},
        **(HTMX if htmx else {}),
    )
    # An htmx request gets its item back, with the refusal in it, to swap in place (htmx
    # swaps no 4xx); a plain request gets a 400 page.
    assert response.status_code == (200 if htmx else 400)
    page = unescape(response.content.decode())
    assert why in page and field in page
    unchanged(waiting_run, before)


def test_a_decision_without_a_decision_says_which_field_is_missing(waiting_run, operator_client):
    approval = Approval.objects.get(run=waiting_run)
    before = events_of(waiting_run)
    response = operator_client.post(reverse("approvals:decide", args=[approval.pk]), {})
    assert response.status_code == 400
    assert '<p class="error">Give the decision.</p>' in response.content.decode()
    unchanged(waiting_run, before)


@pytest.mark.parametrize("group", [HUGE, "-1", "abc", "1\x00"])
def test_a_reassignment_to_a_group_that_cannot_be_is_refused(held, finance, operator, group):
    from django.contrib.auth.models import Group
    from django.test import Client

    from tests.approvals.conftest import person

    mia = person("mia", groups=[finance])
    person("olga", groups=[Group.objects.create(name="ops")])
    run, approval = held(operator)
    before = events_of(run)
    client = Client()
    client.force_login(mia)
    response = client.post(
        reverse("approvals:reassign", args=[approval.pk]), {"group": group, "reason": "r"}
    )
    assert response.status_code == 400
    assert "Not reassigned: choose one of the groups listed" in unescape(response.content.decode())
    approval.refresh_from_db()
    assert approval.group == finance and approval.status == ApprovalStatus.PENDING
    assert events_of(run) == before


@pytest.mark.parametrize(
    ("reason", "why"),
    [
        ("why\x00", "the reason holds a NUL character, which cannot be stored"),
        ("r" * 2001, "the reason is longer than 2,000 characters"),
    ],
)
def test_a_reassignment_with_a_reason_that_cannot_be_is_refused(
    held, finance, operator, reason, why
):
    from django.contrib.auth.models import Group
    from django.test import Client

    from tests.approvals.conftest import person

    mia = person("mia", groups=[finance])
    ops = Group.objects.create(name="ops")
    person("olga", groups=[ops])
    _, approval = held(operator)
    client = Client()
    client.force_login(mia)
    response = client.post(
        reverse("approvals:reassign", args=[approval.pk]), {"group": ops.pk, "reason": reason}
    )
    assert response.status_code == 400
    assert f"Not reassigned: {why}" in unescape(response.content.decode())
    approval.refresh_from_db()
    assert approval.group == finance


# The inbox ---------------------------------------------------------------------------


def test_a_search_holding_nul_is_a_400_naming_it(waiting_run, operator_client):
    response = operator_client.get(reverse("approvals:inbox"), {"q": "te\x00st"})
    assert response.status_code == 400
    assert "Not searched: q: a NUL character" in unescape(response.content.decode())


def test_a_long_search_is_refused_naming_its_length(waiting_run, operator_client):
    response = operator_client.get(reverse("approvals:inbox"), {"q": "x" * 5000})
    assert response.status_code == 400
    assert "q: the search is longer than 200 characters (5,000)" in response.content.decode()
    assert operator_client.get(reverse("approvals:inbox"), {"q": "x" * 200}).status_code == 200
