"""Approvals through the API: those I may decide, approve (with edited arguments),
reject with a reason; the inbox's rules and service decide."""

from __future__ import annotations

import pytest

from approvals.models import Approval, ApprovalStatus
from tasks.models import RunStatus, Step
from tests.agent_tools import EFFECTS
from tests.approvals.conftest import person
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


@pytest.fixture
def decider(finance):
    return person("dora", groups=[finance])


@pytest.fixture
def deciding(api_client, make_token, decider):
    return api_client(make_token(decider, "approve"))


def test_the_list_holds_what_i_may_decide(deciding, held, api_client, make_token, finance):
    _run, approval = held(person("starter"))
    listed = deciding.get("/api/approvals").json()
    assert listed["count"] == 1
    item = listed["items"][0]
    assert item["id"] == approval.pk and item["tool"] == "test_send"
    assert item["arguments"] == {"text": "pay"} and item["group"] == "finance"
    # Four eyes: the starter, in the group, does not see it as theirs to decide.
    starter_in_group = person("stan", groups=[finance])
    _run2, _ = held(starter_in_group, four_eyes=True)
    mine = api_client(make_token(starter_in_group, "read")).get("/api/approvals").json()
    assert [row["id"] for row in mine["items"]] == [approval.pk]


def test_approving_lets_the_run_go_on(deciding, held):
    run, approval = held(person("starter"))
    response = deciding.post(f"/api/approvals/{approval.pk}/approve", {"reason": "fine"})
    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "approved" and response.json()["decided_by"] == "dora"
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"send:pay": 1}


def test_approving_with_edited_arguments_fires_the_edited_call(deciding, held):
    run, approval = held(person("starter"))
    response = deciding.post(
        f"/api/approvals/{approval.pk}/approve", {"arguments": {"text": "pay half"}}
    )
    assert response.status_code == 200, response.json()
    assert response.json()["edited_arguments"] == {"text": "pay half"}
    run_until_rest(run)
    assert EFFECTS == {"send:pay half": 1}


def test_edited_arguments_outside_the_tools_schema_are_refused(deciding, held):
    _run, approval = held(person("starter"))
    response = deciding.post(f"/api/approvals/{approval.pk}/approve", {"arguments": {"text": 5}})
    assert response.status_code == 409
    assert "schema" in response.json()["detail"]
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
    assert Step.objects.get(pk=approval.step_id).arguments == {"text": "pay"}


def test_rejecting_needs_a_reason_and_the_agent_reads_it(deciding, held):
    _run, approval = held(person("starter"))
    response = deciding.post(f"/api/approvals/{approval.pk}/reject", {"reason": ""})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/reason"
    response = deciding.post(f"/api/approvals/{approval.pk}/reject", {})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/reason"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING

    response = deciding.post(f"/api/approvals/{approval.pk}/reject", {"reason": "wrong payee"})
    assert response.status_code == 200
    approval.refresh_from_db()
    assert (approval.status, approval.decision_reason) == ("rejected", "wrong payee")


def test_a_decided_approval_cannot_be_decided_again(deciding, held):
    _run, approval = held(person("starter"))
    assert deciding.post(f"/api/approvals/{approval.pk}/approve", {}).status_code == 200
    again = deciding.post(f"/api/approvals/{approval.pk}/reject", {"reason": "too late"})
    assert again.status_code == 409
    assert "already approved by dora" in again.json()["detail"]
    assert Approval.objects.get(pk=approval.pk).status == ApprovalStatus.APPROVED


def test_a_resolution_belongs_to_an_unknown_outcome_only(deciding, held):
    _run, approval = held(person("starter"))
    response = deciding.post(f"/api/approvals/{approval.pk}/approve", {"resolution": "happened"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/resolution"


def test_an_approval_id_that_cannot_be_one_is_a_404(deciding):
    for raw in ("0", "-1", "abc", "9" * 30, "٣"):
        assert deciding.get(f"/api/approvals/{raw}").status_code == 404
