"""The engine, driven directly: the loop, the doors, the gate, the ledger, the lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from agentops.runtime.engine import Outcome, advance, lease_claim
from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.models import Run, RunStatus, Step, StepStatus
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import PLANNED, run_until_rest
from tests.peers.workers import ROOT

pytestmark = pytest.mark.django_db


def events(run: Run) -> list[str]:
    return list(
        LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq").values_list("kind", flat=True)
    )


def test_demo_task_runs_end_to_end_with_one_approval(demo_task, operator, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    run = run_start(task=demo_task, run_input={"batch": "2026-11"}, user=operator)

    assert run_until_rest(run) is Outcome.WAITING
    assert run.status == RunStatus.WAITING
    approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
    assert approval.tool_name == "email_send"
    assert "INV-1003" in approval.arguments["body"] and "INV-1006" in approval.arguments["body"]
    assert "INV-1001" not in approval.arguments["body"]
    assert mail.outbox == []  # nothing sent before a person approves

    approval_decide(approval=approval, user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED
    assert "3 mismatches" in run.outcome
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["finance@example.com"]
    kinds = [s.kind for s in run.steps.order_by("number")]
    assert kinds == [
        "model",
        "plan",
        "tool",  # plan first, then list the invoices
        "model",
        "tool",  # the payments
        "model",
        "plan",
        "tool",  # revise the plan, email finance (approved)
        "model",
        "plan",  # mark the plan done
        "model",
        "check",  # the final answer, checked
    ]
    assert run.steps_used == 12 and run.tokens_in > 0
    assert all(step["status"] == "done" for step in run.plan)
    assert run.confidence == 0.95
    assert chain_verify(run.pk).intact
    assert events(run)[0] == "run.queued" and events(run)[-1] == "run.succeeded"
    assert "approval.approved" in events(run)


def test_invalid_arguments_are_recorded_and_returned_never_fired(make_task, operator):
    task = make_task(
        [
            {"content": "echo a number", "calls": [("test_echo", {"text": 42})]},
            {"content": "done"},
        ],
        tools=["test_echo"],
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert "text: 42 is not of type 'string'" in step.error
    assert EFFECTS == {}
    # The model's next turn saw the error as the call's answer.
    assert run.status == RunStatus.SUCCEEDED
    assert "tool.refused" in events(run) and "tool.started" not in events(run)


@pytest.mark.parametrize(
    ("raw", "why"),
    [("{not json", "Expecting property name"), ('{"text": NaN}', "NaN is not a JSON number")],
)
def test_arguments_that_are_not_json_are_refused(make_task, operator, raw, why):
    task = make_task([{"calls": [("test_echo", raw)]}, {"content": "done"}], tools=["test_echo"])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert "not valid JSON" in step.error and why in step.error
    assert EFFECTS == {}


def test_a_tool_not_granted_is_refused(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "hi"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert "not granted" in step.error and "test_echo" in step.error
    assert EFFECTS == {}


def test_read_calls_run_without_a_person_at_supervised(make_task, operator):
    task = make_task(
        [{"calls": [("test_echo", {"text": "hi"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert EFFECTS == {"echo:hi": 1}
    assert run.steps.get(kind="tool").result == {"echo": "hi"}


def test_rejection_returns_the_reason_to_the_model(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "hello all"})]}, {"content": "understood"}],
        tools=["test_send"],
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run)
    approval_decide(approval=approval, user=operator, approve=False, reason="not to everyone")
    assert run_until_rest(run) is Outcome.FINISHED

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert "olivia rejected this call: not to everyone" in step.error
    assert EFFECTS == {}
    assert run.status == RunStatus.SUCCEEDED


def test_the_model_sees_the_rejection_in_its_next_turn(make_task, operator):
    seen = []

    def spy(messages):
        seen.append(messages)
        from agentops.runtime.models.scripted import scripted_turn

        if len(seen) == 1:
            return scripted_turn({"calls": [("test_send", {"text": "x"})]}, 0)
        return scripted_turn({"content": "ok"}, 1)

    task = make_task([], tools=["test_send"])
    from agentops.runtime.models.scripted import SCRIPTS

    SCRIPTS[task.model.split(":", 1)[1]] = spy
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    approval_decide(approval=run.approvals.get(), user=operator, approve=False, reason="wrong text")
    run_until_rest(run)
    tool_message = seen[1][-1]
    assert tool_message["role"] == "tool"
    assert json.loads(tool_message["content"]) == {"error": "olivia rejected this call: wrong text"}


def test_an_approved_call_fires_exactly_once_with_what_was_approved(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "pay"})]}, {"content": "sent"}], tools=["test_send"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    approval_decide(approval=run.approvals.get(), user=operator, approve=True)
    run_until_rest(run)
    assert EFFECTS == {"send:pay": 1}
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    assert step.idempotency_key == f"{run.pk}:{step.number}"


def test_a_call_whose_arguments_changed_after_approval_is_not_made(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "a"})]}, {"content": "ok"}], tools=["test_send"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    Step.objects.filter(run=run, kind="tool").update(arguments={"text": "b"})
    approval_decide(approval=run.approvals.get(), user=operator, approve=True)
    run_until_rest(run)
    assert EFFECTS == {}
    assert "does not match this exact call" in run.steps.get(kind="tool").error


def test_shadow_records_side_effects_as_simulated_and_fires_none(make_task, operator):
    task = make_task(
        [
            {"calls": [("test_echo", {"text": "r"}), ("test_send", {"text": "s"})]},
            {"content": "ok"},
        ],
        tools=["test_echo", "test_send"],
        autonomy_level=0,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert EFFECTS == {"echo:r": 1}
    send = run.steps.get(tool_name="test_send")
    assert send.status == StepStatus.SIMULATED and send.result["simulated"] is True


def test_guarded_runs_reversible_calls_and_holds_irreversible_ones(make_task, operator):
    task = make_task(
        [
            {
                "calls": [
                    ("test_note", {"text": "n", "_confidence": 0.9}),
                    ("test_send", {"text": "s", "_confidence": 0.9}),
                ]
            },
            {"content": "ok"},
        ],
        tools=["test_note", "test_send"],
        autonomy_level=2,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    assert EFFECTS == {"note:n": 1}
    assert run.approvals.get().tool_name == "test_send"


def test_always_approve_holds_even_an_autonomous_task(make_task, operator):
    from tasks.models import Tool

    Tool.objects.filter(name="test_note").update(always_approve=True)
    task = make_task(
        [{"calls": [("test_note", {"text": "n"})]}, {"content": "ok"}],
        tools=["test_note"],
        autonomy_level=3,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    assert "always approve" in run.approvals.get().gate


def test_the_step_budget_halts_the_run_before_the_next_call(make_task, operator):
    looping = [{"calls": [("test_echo", {"text": str(i)})]} for i in range(10)]
    task = make_task(looping, tools=["test_echo"], max_steps=4)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason == "step budget spent: 4 of 4 steps used"
    assert run.steps.count() == 4
    assert EFFECTS == {"echo:0": 1, "echo:1": 1}


def test_a_failing_tool_goes_back_to_the_model(make_task, operator):
    task = make_task(
        [{"calls": [("test_broken", {"text": "x"})]}, {"content": "gave up"}], tools=["test_broken"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED and "the backend said no" in step.error
    assert run.status == RunStatus.SUCCEEDED


def test_a_recorded_model_turn_is_reused_not_asked_again(make_task, operator):
    calls = []

    def counting(messages):
        from agentops.runtime.models.scripted import scripted_turn

        calls.append(len(messages))
        if len(calls) == 1:
            return scripted_turn({"calls": [("test_echo", {"text": "once"})]}, 0)
        return scripted_turn({"content": "done"}, 1)

    task = make_task([], tools=["test_echo"])
    from agentops.runtime.models.scripted import SCRIPTS

    SCRIPTS[task.model.split(":", 1)[1]] = counting
    run = run_start(task=task, run_input={}, user=operator)
    # One worker records the model turn and stops (as if it died) before the tool call.
    assert lease_claim(run.pk, "worker-a")
    from agentops.runtime.engine import context_load, step_next

    assert step_next(context_load(run.pk, "worker-a")) is Outcome.CONTINUE
    Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    # Another worker recovers the run and goes on from the record.
    assert run_until_rest(run) is Outcome.FINISHED
    assert len(calls) == 2
    assert EFFECTS == {"echo:once": 1}
    assert "run.recovered" in events(run)


def _started_then_crashed(make_task, operator, tool_name):
    task = make_task(
        [{"calls": [(tool_name, {"text": "t"})]}, {"content": "ok"}],
        tools=[tool_name],
        autonomy_level=3,
    )
    run = run_start(task=task, run_input={}, user=operator)
    from agentops.runtime.engine import context_load, step_next

    assert lease_claim(run.pk, "worker-a")
    # The model turn commits the tool step 'started' with it, as the engine does for a
    # call that runs at once; then the worker 'crashes' before the call is made.
    from agentops.runtime.engine import turns

    real_fire = turns.call_fire
    turns.call_fire = lambda *args, **kwargs: Outcome.CONTINUE
    try:
        assert step_next(context_load(run.pk, "worker-a")) is Outcome.CONTINUE
    finally:
        turns.call_fire = real_fire
    assert run.steps.get(kind="tool").status == StepStatus.STARTED
    Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    return run


def test_an_interrupted_non_idempotent_call_is_not_repeated_and_waits_for_a_person(
    make_task, operator
):
    run = _started_then_crashed(make_task, operator, "test_send")
    assert run_until_rest(run) is Outcome.WAITING
    assert run.status == RunStatus.WAITING
    assert "the outcome of test_send is unknown" in run.reason
    assert run.steps.get(kind="tool").status == StepStatus.UNKNOWN
    approval = run.approvals.get(status=ApprovalStatus.PENDING)
    assert approval.kind == "unknown_outcome"
    assert EFFECTS == {}


def test_an_unknown_outcome_resolved_as_happened_records_the_given_result(make_task, operator):
    run = _started_then_crashed(make_task, operator, "test_send")
    run_until_rest(run)
    approval_decide(
        approval=run.approvals.get(),
        user=operator,
        approve=True,
        resolution="happened",
        result={"sent": "t", "checked": "in the outbox"},
    )
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    assert step.result == {"sent": "t", "checked": "in the outbox"}
    assert EFFECTS == {}  # a person said it happened: it is not made again


def test_an_unknown_outcome_resolved_as_not_happened_makes_the_call_once(make_task, operator):
    run = _started_then_crashed(make_task, operator, "test_send")
    run_until_rest(run)
    approval_decide(approval=run.approvals.get(), user=operator, approve=True, resolution="refire")
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"send:t": 1}


def test_stopping_on_an_unknown_outcome_halts_the_run(make_task, operator):
    run = _started_then_crashed(make_task, operator, "test_send")
    run_until_rest(run)
    approval_decide(
        approval=run.approvals.get(), user=operator, approve=False, reason="checking by hand"
    )
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED
    assert run.reason == "stopped by olivia: checking by hand"
    assert advance(run.pk) is Outcome.NOT_CLAIMED
    assert EFFECTS == {}


def test_an_interrupted_idempotent_call_is_retried_with_the_same_key(make_task, operator):
    run = _started_then_crashed(make_task, operator, "test_charge")
    key = run.steps.get(kind="tool").idempotency_key
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert {f"charge:{key}": 1} == EFFECTS
    assert "tool.retried" in events(run)


def test_a_live_lease_keeps_a_second_worker_out(make_task, operator):
    task = make_task([{"content": "done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert lease_claim(run.pk, "worker-a") is True
    assert lease_claim(run.pk, "worker-b") is False
    assert advance(run.pk, owner="worker-b") is Outcome.NOT_CLAIMED


def test_a_worker_that_lost_its_lease_writes_nothing(make_task, operator):
    task = make_task(
        [{"calls": [("test_echo", {"text": "x"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    from agentops.runtime.engine import LeaseLost, context_load, step_next

    assert lease_claim(run.pk, "worker-a")
    Run.objects.filter(pk=run.pk).update(lease_owner="worker-b")
    with pytest.raises(LeaseLost):
        step_next(context_load(run.pk, "worker-a"))
    assert run.steps.count() == 0


def test_a_cancelled_run_stops_at_the_next_step(make_task, operator):
    from tasks.services import run_cancel

    task = make_task(
        [{"calls": [("test_send", {"text": "x"})]}, {"content": "ok"}], tools=["test_send"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    run_cancel(run=run, user=operator)
    assert advance(run.pk) is Outcome.NOT_CLAIMED
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert run.approvals.get().status == ApprovalStatus.CANCELLED
    assert EFFECTS == {}


def test_a_slice_that_runs_out_of_time_requeues_the_run(make_task, operator):
    task = make_task(
        [{"calls": [("test_echo", {"text": "x"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert advance(run.pk, max_seconds=0.000001) is Outcome.YIELDED
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED and run.lease_owner == ""
    assert run_until_rest(run) is Outcome.FINISHED


def test_always_approve_holds_a_read_only_tool_too(make_task, operator):
    from tasks.models import Tool

    Tool.objects.filter(name="test_echo").update(always_approve=True)
    task = make_task(
        [{"calls": [("test_echo", {"text": "r"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    assert EFFECTS == {}


def test_the_trail_names_the_script_that_answered(make_task, operator):
    task = make_task([PLANNED, {"content": "done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    responded = LineageEvent.objects.filter(run_uuid=run.pk, kind="model.responded")
    assert [event.payload["model"] for event in responded] == [task.model] * 2
    assert task.model.startswith("scripted:")


def test_a_held_calls_approval_shows_the_budget_as_the_run_has_it(make_task, operator):
    task = make_task([{"calls": [("test_note", {"text": "x"})]}], tools=["test_note"])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run)
    # The held call's own step is counted, as on the run's page.
    assert approval.context["budgets"]["steps"]["used"] == str(run.steps_used)
    assert run.steps_used == run.steps.count()


def test_the_model_library_is_imported_with_the_engine_not_in_a_runs_time():
    """A worker's first job imports the engine before it claims a run; the openai
    package, most of a second to import, must come with it, not at the run's first model
    call, where the run's clock would count it as the run's seconds of work."""
    code = (
        "import os, sys, django; django.setup(); import agentops.runtime.engine; "
        "print('openai' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "agentops.test_settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "True", result.stderr
