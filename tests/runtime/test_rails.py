"""Budgets, loops, retries, the plan and the self-check, driven through the engine."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agentops.runtime.budgets import Limits, Usage, budget_check, budget_note, tokens_estimate
from agentops.runtime.engine import Outcome, advance
from agentops.runtime.loops import ToolCallRecord, loop_find
from agentops.runtime.models.scripted import CHECKS, SCRIPTS, check_turn, scripted_turn
from approvals.models import ApprovalKind, ApprovalStatus
from approvals.services import approval_decide
from lineage.models import LineageEvent
from tasks.models import ModelPrice, RunStatus, StepKind, StepStatus
from tasks.services import RunStartError, run_start
from tests.agent_tools import EFFECTS
from tests.conftest import PLANNED, planning, run_until_rest

pytestmark = pytest.mark.django_db


def event_kinds(run) -> list[str]:
    return list(
        LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq").values_list("kind", flat=True)
    )


def echoes(count: int, *, same: bool = False) -> list[dict]:
    return [{"calls": [("test_echo", {"text": "x" if same else str(n)})]} for n in range(count)]


# Budgets ------------------------------------------------------------------------------


def test_the_token_budget_halts_before_a_call_that_could_cross_it(make_task, operator):
    turns = [{**turn, "tokens_in": 900, "tokens_out": 100} for turn in echoes(10)]
    task = make_task(turns, tools=["test_echo"], max_tokens=2500, self_check=False)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith("token budget: 2000 of 2500 tokens used")
    # Two turns were made (1000 tokens each); the third could not fit a prompt and answer.
    assert run.steps.filter(kind=StepKind.MODEL).count() == 2
    assert run.tokens_in + run.tokens_out == 2000


def test_the_answer_is_capped_to_the_tokens_left(make_task, operator):
    seen = {}

    def spy(messages):
        return scripted_turn({"content": "done"}, 0)

    task = make_task([], max_tokens=3000, self_check=False)
    name = task.model.split(":", 1)[1]
    SCRIPTS[name] = planning(spy)
    from agentops.runtime.models import scripted

    real = scripted.ScriptedClient.complete

    def recording(self, **kwargs):
        seen.update(kwargs)
        return real(self, **kwargs)

    scripted.ScriptedClient.complete = recording
    try:
        run = run_start(task=task, run_input={}, user=operator)
        run_until_rest(run)
    finally:
        scripted.ScriptedClient.complete = real
    assert run.status == RunStatus.SUCCEEDED
    prompt = tokens_estimate(seen["messages"], seen["tools"])
    assert seen["max_tokens"] == 3000 - prompt


def test_a_call_whose_projected_spend_would_cross_the_limit_is_not_made(make_task, operator):
    asked = []

    def expensive(messages):
        asked.append(1)
        return scripted_turn({"content": "done"}, 0)

    task = make_task([], max_spend=Decimal("0.01"), self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = expensive
    # 4096 answer tokens at 10.00 per million could cost 0.04: more than the 0.01 budget.
    ModelPrice.objects.create(
        model=task.model, input_per_million=Decimal("1"), output_per_million=Decimal("10")
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith("spend budget: 0.0000 of 0.0100 spent; the next call could cost")
    assert asked == []  # refused before it was made


def test_spend_is_counted_from_the_price_table(make_task, operator):
    turns = [PLANNED, {"content": "done", "tokens_in": 1000, "tokens_out": 500}]
    task = make_task(turns, max_spend=Decimal("5"), self_check=False)
    ModelPrice.objects.create(
        model=task.model, input_per_million=Decimal("2"), output_per_million=Decimal("8")
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    assert run.spend == Decimal("0.006")  # 1000 x 2 + 500 x 8 per million


def test_a_spend_budget_without_a_price_is_refused_at_start(make_task, operator, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    task = make_task([], max_spend=Decimal("1"))
    task.model = "unpriced-model"
    task.save()
    with pytest.raises(RunStartError, match="has no price: add one under Model prices"):
        run_start(task=task, run_input={}, user=operator)


def test_the_time_budget_counts_work_and_halts(make_task, operator):
    def slow(messages):
        import time

        time.sleep(0.3)
        return scripted_turn({"calls": [("test_echo", {"text": str(len(messages))})]}, 0)

    task = make_task([], tools=["test_echo"], max_seconds=1, self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = slow
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith("time budget spent:")
    assert run.seconds_used >= 1.0
    # A turn (0.3 s) is begun only while less than the budget's second is spent: four at
    # most; on a loaded machine the engine's own work takes more of the second.
    assert 2 <= run.steps.filter(kind=StepKind.MODEL).count() <= 4


def test_a_breach_can_ask_a_person_for_more_and_go_on(make_task, operator):
    task = make_task(
        [*echoes(6), {"content": "done"}],
        tools=["test_echo"],
        max_steps=4,
        on_budget_breach="ask",
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get(status=ApprovalStatus.PENDING)
    assert approval.kind == ApprovalKind.BUDGET_EXTENSION
    assert approval.context["budget"] == "steps" and approval.context["extension"] == {"steps": 5}
    approval_decide(approval=approval, user=operator, approve=True)
    run.refresh_from_db()
    assert run.budget_extra == {"steps": 5}
    assert run_until_rest(run) is Outcome.WAITING  # 9 steps now, spent again
    approval_decide(
        approval=run.approvals.get(status=ApprovalStatus.PENDING),
        user=operator,
        approve=False,
        reason="enough",
    )
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED and run.reason == "stopped by olivia: enough"


def test_the_model_is_told_its_budget_and_to_wind_up_near_the_end():
    limits = Limits(steps=10, tokens=1000, spend=Decimal("1"))
    calm = budget_note(limits, Usage(steps=2, tokens=100, spend=Decimal("0.1")))
    assert calm == "Budget left: 8 of 10 steps, 900 of 1000 tokens, 0.9000 of 1.0000."
    late = budget_note(limits, Usage(steps=2, tokens=850, spend=Decimal("0.1")))
    assert late.endswith("wind up now and give your best final answer.")


def test_budget_check_names_the_budget_and_the_figures():
    limits = Limits(steps=5, seconds=10.0)
    assert budget_check(limits, Usage(steps=4)) is None
    assert budget_check(limits, Usage(steps=5)).budget == "steps"
    breach = budget_check(limits, Usage(steps=1, seconds=12.5))
    assert breach.budget == "seconds" and "12.5 of 10 seconds" in breach.reason


# Loops and stalls --------------------------------------------------------------------


def test_the_same_call_with_the_same_result_three_times_is_a_loop(make_task, operator):
    task = make_task(echoes(10, same=True), tools=["test_echo"], self_check=False)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith("loop: test_echo was called 3 times with the same arguments")
    assert EFFECTS == {"echo:x": 3}


def test_calls_of_one_tool_with_different_arguments_are_not_a_loop(make_task, operator):
    task = make_task([*echoes(12), {"content": "done"}], tools=["test_echo"], self_check=False)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert len(EFFECTS) == 12


def test_a_loop_can_be_put_to_a_person_who_lets_it_go_on(make_task, operator):
    task = make_task(
        [*echoes(4, same=True), {"content": "done"}],
        tools=["test_echo"],
        on_loop="ask",
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get(kind=ApprovalKind.LOOP_REVIEW)
    assert (approval.context["finding"], approval.context["through_step"]) == ("loop", 6)
    approval_decide(approval=approval, user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED


def test_a_stall_is_calls_that_repeat_earlier_ones_in_a_cycle():
    a = ToolCallRecord(1, "t", {"q": "a"}, {"r": 1})
    b = ToolCallRecord(2, "t", {"q": "b"}, {"r": 2})
    cycle = [a, b] + [
        ToolCallRecord(n, "t", {"q": "ab"[n % 2]}, {"r": 1 + n % 2}) for n in range(3, 9)
    ]
    assert loop_find(cycle, repeat_limit=0, stall_limit=4).kind == "stall"
    assert loop_find(cycle, repeat_limit=0, stall_limit=0) is None
    fresh = [ToolCallRecord(n, "t", {"q": n}, {"r": n}) for n in range(20)]
    assert loop_find(fresh, repeat_limit=3, stall_limit=4) is None


# Retries -----------------------------------------------------------------------------


def test_a_transient_tool_failure_is_retried_with_backoff_then_succeeds(make_task, operator):
    from tasks.models import Tool

    Tool.objects.filter(name="test_flaky").update(retry_backoff_seconds=0.01)
    task = make_task(
        [{"calls": [("test_flaky", {"text": "2"})]}, {"content": "ok"}],
        tools=["test_flaky"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    assert EFFECTS == {"flaky:2": 3}  # failed twice, then worked
    assert event_kinds(run).count("tool.retrying") == 2


def test_a_tool_that_keeps_failing_goes_back_to_the_model_after_its_attempts(make_task, operator):
    from tasks.models import Tool

    Tool.objects.filter(name="test_flaky").update(retry_backoff_seconds=0.01, retry_max_attempts=2)
    task = make_task(
        [{"calls": [("test_flaky", {"text": "5"})]}, {"content": "gave up"}],
        tools=["test_flaky"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert step.error == "not yet (attempt 2 of 5) (tried 2 times)"
    assert run.status == RunStatus.SUCCEEDED


def test_a_permanent_tool_error_is_not_retried(make_task, operator):
    task = make_task(
        [{"calls": [("test_broken", {"text": "x"})]}, {"content": "ok"}],
        tools=["test_broken"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert "tool.retrying" not in event_kinds(run)


# The plan and the self-check ---------------------------------------------------------


def test_the_plan_is_kept_on_the_run_and_each_revision_is_a_step(make_task, operator):
    plan = [{"title": "look"}, {"title": "answer"}]
    revised = [{"title": "look", "status": "done"}, {"title": "answer", "status": "doing"}]
    task = make_task(
        [
            {"calls": [("plan_update", {"steps": plan})]},
            {"calls": [("plan_update", {"steps": revised, "reason": "looked"})]},
            {"content": "done"},
        ],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.plan == revised
    plans = run.steps.filter(kind=StepKind.PLAN).order_by("number")
    assert [p.result["version"] for p in plans] == [1, 2]
    assert "plan.drafted" in event_kinds(run) and "plan.revised" in event_kinds(run)


def test_a_malformed_plan_is_refused_and_returned(make_task, operator):
    task = make_task(
        [{"calls": [("plan_update", {"steps": []})]}, {"content": "ok"}], self_check=False
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind=StepKind.PLAN)
    assert step.status == StepStatus.REFUSED and "should be non-empty" in step.error
    assert run.plan == []


def test_a_confident_self_check_finishes_the_run(make_task, operator):
    task = make_task([PLANNED, {"content": "the answer"}], confidence_threshold=0.8)
    CHECKS[task.model.split(":", 1)[1]] = lambda messages: check_turn(0.9, "verified")
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and run.confidence == 0.9
    check = run.steps.get(kind=StepKind.CHECK)
    assert check.result == {"objective_met": True, "confidence": 0.9, "evidence": "verified"}


def test_low_confidence_waits_for_a_person_who_accepts_the_outcome(make_task, operator):
    task = make_task([PLANNED, {"content": "probably right"}], confidence_threshold=0.8)
    CHECKS[task.model.split(":", 1)[1]] = lambda messages: check_turn(0.4, "one source only")
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get()
    assert approval.kind == ApprovalKind.OUTCOME_REVIEW
    assert approval.confidence == 0.4 and approval.reasoning == "one source only"
    assert "confidence 0.40 is below 0.80" in approval.gate
    approval_decide(approval=approval, user=operator, approve=True)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED and run.outcome == "probably right"


def test_a_rejected_outcome_goes_back_to_the_agent_with_the_reason(make_task, operator):
    seen = []

    def agent(messages):
        seen.append(messages[-1])
        return scripted_turn({"content": f"answer {len(seen)}"}, 0)

    task = make_task([], confidence_threshold=0.8)
    name = task.model.split(":", 1)[1]
    SCRIPTS[name] = planning(agent)
    confidences = iter([0.4, 0.95])
    CHECKS[name] = lambda messages: check_turn(next(confidences), "evidence")
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    approval_decide(
        approval=run.approvals.get(), user=operator, approve=False, reason="check March too"
    )
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and run.outcome == "answer 2"
    assert seen[-1]["role"] == "user" and "check March too" in seen[-1]["content"]
    assert run.steps.get(kind=StepKind.HUMAN).content == "check March too"


def test_a_transient_model_error_is_retried_and_a_permanent_one_fails_the_run(
    make_task, operator, settings
):
    from agentops.runtime.models import ModelError

    settings.AGENTOPS_MODEL_BACKOFF_SECONDS = 0.01
    errors = iter([ModelError("503 busy", transient=True), None])

    def flaky(messages):
        error = next(errors)
        if error:
            raise error
        return scripted_turn({"content": "done"}, 0)

    task = make_task([], self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = planning(flaky)
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    assert event_kinds(run).count("model.retrying") == 1

    def refused(messages):
        raise ModelError("400 bad request", transient=False)

    task = make_task([], self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = refused
    run = run_start(task=task, run_input={}, user=operator)
    assert advance(run.pk) is Outcome.FINISHED
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.reason == "the model call failed: 400 bad request"


def test_a_model_that_does_not_report_its_check_gets_its_outcome_reviewed(make_task, operator):
    task = make_task([PLANNED, {"content": "the answer"}])
    CHECKS[task.model.split(":", 1)[1]] = lambda messages: scripted_turn({"content": "fine"}, 0)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    check = run.steps.get(kind=StepKind.CHECK)
    assert check.error == (
        "the model did not report its self-check: it did not call report_check in 3 attempts"
    )
    assert run.approvals.get().kind == ApprovalKind.OUTCOME_REVIEW


def test_a_final_answer_the_budget_cannot_check_goes_to_a_person(make_task, operator):
    task = make_task([PLANNED, {"content": "the answer"}], max_steps=3)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get()
    assert approval.kind == ApprovalKind.OUTCOME_REVIEW
    assert approval.gate.startswith("the self-check could not run: step budget spent: 3 of 3")
    approval_decide(approval=approval, user=operator, approve=True)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED and run.outcome == "the answer"


def test_a_refused_call_repeated_is_a_loop_too(make_task, operator):
    task = make_task(
        [{"calls": [("test_echo", {"text": 1})]} for _ in range(5)],
        tools=["test_echo"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.HALTED and run.reason.startswith("loop: test_echo")
