"""Plan churn: an agent that revises its plan again and again without acting is stalled,
and the rails halt it, or ask a person, with a reason that says so."""

from __future__ import annotations

import pytest

from agentops.runtime.engine import Outcome
from agentops.runtime.loops import ToolCallRecord, loop_find
from approvals.models import ApprovalKind
from approvals.services import approval_decide
from lineage.models import LineageEvent
from tasks.models import RunStatus, StepKind
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

PLAN = [{"title": "look it up"}, {"title": "answer"}]


def plans(count: int, *, same: bool = True) -> list[dict]:
    """``count`` turns that each only call plan_update: the same plan, or a new one each."""
    return [
        {"calls": [("plan_update", {"steps": PLAN if same else [{"title": f"try {n}"}]})]}
        for n in range(count)
    ]


def test_the_same_plan_three_times_in_a_row_halts_as_plan_churn(make_task, operator):
    task = make_task(plans(10), tools=["test_echo"], self_check=False, max_steps=40)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith(
        "plan churn: plan_update was called 3 times in a row with the same plan"
    )
    # Halted at the third plan, long before the step budget: 3 model turns, 3 plans.
    assert run.steps.filter(kind=StepKind.PLAN).count() == 3
    assert run.steps_used < 10
    halted = LineageEvent.objects.filter(run_uuid=run.pk, kind="run.halted").get()
    assert halted.payload["finding"] == "stall"


def test_a_plan_resubmitted_with_only_a_new_reason_is_the_same_plan(make_task, operator):
    turns = [
        {"calls": [("plan_update", {"steps": PLAN, "reason": f"thinking, take {n}"})]}
        for n in range(6)
    ]
    task = make_task(turns, self_check=False, max_steps=40)
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.HALTED and run.reason.startswith("plan churn:")
    assert run.steps.filter(kind=StepKind.PLAN).count() == 3


def test_revising_the_plan_stall_limit_times_in_a_row_without_acting_halts(make_task, operator):
    # A small model's failure seen live: each revision differs, none is acted on.
    task = make_task(
        plans(12, same=False), tools=["test_echo"], self_check=False, stall_limit=6, max_steps=40
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason == (
        "plan churn: the last 6 calls all revised the plan (plan_update) and none acted on it"
    )
    assert run.steps.filter(kind=StepKind.PLAN).count() == 6


def test_plan_revisions_between_calls_that_act_are_not_churn(make_task, operator):
    turns = []
    for n in range(6):
        turns.append({"calls": [("plan_update", {"steps": PLAN})]})
        turns.append({"calls": [("test_echo", {"text": str(n)})]})
    task = make_task(
        [*turns, {"content": "done"}], tools=["test_echo"], self_check=False, stall_limit=3
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert len(EFFECTS) == 6


def test_plan_churn_can_be_put_to_a_person_who_lets_the_run_go_on(make_task, operator):
    task = make_task(
        [*plans(4), {"content": "done"}],
        tools=["test_echo"],
        self_check=False,
        on_loop="ask",
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get(kind=ApprovalKind.LOOP_REVIEW)
    assert approval.gate.startswith("plan churn: plan_update was called 3 times in a row")
    assert approval.context["finding"] == "stall"
    assert "stall" in run.reason
    approval_decide(approval=approval, user=operator, approve=True)
    # The person let it go on: the plans before count no more, one more plan is not churn.
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason


def test_loop_find_sees_plan_churn_and_limits_of_zero_turn_it_off():
    same = [ToolCallRecord(n, "plan_update", {"steps": PLAN}, {"v": n}) for n in range(1, 6)]
    finding = loop_find(same, repeat_limit=3, stall_limit=8)
    assert (finding.kind, finding.through_step) == ("stall", 3)
    assert finding.reason.startswith("plan churn:")
    assert loop_find(same, repeat_limit=0, stall_limit=0) is None
    assert loop_find(same, repeat_limit=0, stall_limit=5).through_step == 5
    # A call to any other tool between plans breaks the streak.
    acted = []
    for n in range(1, 20, 2):
        acted.append(ToolCallRecord(n, "plan_update", {"steps": PLAN}, {"v": n}))
        acted.append(ToolCallRecord(n + 1, "t", {"q": n}, {"r": n}))
    assert loop_find(acted, repeat_limit=3, stall_limit=3) is None
