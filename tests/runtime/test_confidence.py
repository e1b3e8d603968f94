"""The gate weighs the agent's confidence in each call (ARCHITECTURE.md: Guarded runs
read and reversible calls above the confidence threshold). The agent gives it as one
more argument, ``_confidence``, which the engine takes out before the call's other
doors and records on the step; below the task's threshold, a reversible call at
Guarded waits for a person, who sees the confidence beside the call."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse
from django.utils.html import escape

from agentops.runtime.engine import Outcome, tool_spec
from agentops.runtime.gates import Verdict, gate_decide
from agentops.runtime.models import ModelTurn
from agentops.runtime.models.base import ToolCallRequest
from agentops.runtime.models.scripted import CHECKS
from agentops.runtime.tools import tool
from agentops.runtime.tools.python import REGISTRY
from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from lineage.models import LineageEvent
from tasks.management.commands.mcp_import import schema_problem
from tasks.models import AutonomyLevel, RunStatus, Step, TaskVersion, Tool
from tasks.services import run_start
from tests.agent_tools import EFFECTS, TEXT
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

GUARDED = AutonomyLevel.GUARDED


def note(confidence: object, text: str = "n") -> dict:
    """A turn that writes a note (a reversible call), with the confidence given."""
    return {
        "content": "Writing the note.",
        "calls": [("test_note", {"text": text, "_confidence": confidence})],
    }


# The gate's table -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "effect", "confidence", "verdict"),
    [
        (GUARDED, "reversible", 0.9, Verdict.RUN),
        (GUARDED, "reversible", 0.7, Verdict.RUN),  # at the threshold is enough
        (GUARDED, "reversible", 0.69, Verdict.HOLD),
        (GUARDED, "reversible", None, Verdict.HOLD),
        (GUARDED, "read", 0.1, Verdict.RUN),  # read-only calls run at every level
        (GUARDED, "irreversible", 1.0, Verdict.HOLD),  # confidence never opens a hard door
        (AutonomyLevel.AUTONOMOUS, "reversible", 0.1, Verdict.RUN),
        (AutonomyLevel.AUTONOMOUS, "irreversible", None, Verdict.RUN),
        (AutonomyLevel.SUPERVISED, "reversible", 1.0, Verdict.HOLD),
    ],
)
def test_the_gate_weighs_confidence_for_reversible_calls_at_guarded_only(
    level, effect, confidence, verdict
):
    decision = gate_decide(
        autonomy_level=level,
        side_effect=effect,
        always_approve=False,
        confidence=confidence,
        threshold=0.7,
    )
    assert decision.verdict is verdict
    assert decision.by_confidence is (
        level == GUARDED and effect == "reversible" and verdict is Verdict.HOLD
    )


def test_a_threshold_of_zero_lets_every_reversible_call_run_at_guarded():
    decision = gate_decide(
        autonomy_level=GUARDED, side_effect="reversible", always_approve=False, threshold=0.0
    )
    assert decision.verdict is Verdict.RUN


# What the model sees ----------------------------------------------------------------


def test_every_tool_the_model_sees_asks_for_confidence_and_the_tool_keeps_its_schema(
    make_task,
):
    make_task([], tools=["test_note"])
    stored = Tool.objects.get(name="test_note")
    parameters = tool_spec(stored)["function"]["parameters"]
    assert parameters["required"] == ["text", "_confidence"]
    assert parameters["properties"]["_confidence"]["minimum"] == 0
    assert parameters["properties"]["_confidence"]["maximum"] == 1
    assert parameters["additionalProperties"] is False
    stored.refresh_from_db()
    assert stored.input_schema == TEXT


def test_a_tool_declared_in_code_may_not_declare_the_confidence_argument():
    schema = {"type": "object", "properties": {"_confidence": {"type": "string"}}}

    def confident_tool(ctx, **arguments):
        return {}

    with pytest.raises(ValueError, match="may not have a property named '_confidence'"):
        tool(schema=schema, side_effect="read")(confident_tool)
    assert "confident_tool" not in REGISTRY


# Runs -------------------------------------------------------------------------------


def test_guarded_runs_a_confident_reversible_call_without_its_confidence_in_the_arguments(
    make_task, operator, operator_client
):
    task = make_task([note(0.9), {"content": "done"}], tools=["test_note"], autonomy_level=GUARDED)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    # The tool's schema allows no other field: it was called with its own arguments only.
    assert EFFECTS == {"note:n": 1}
    step = run.steps.get(kind="tool")
    assert step.arguments == {"text": "n"} and step.confidence == 0.9
    started = LineageEvent.objects.get(run_uuid=run.pk, kind="tool.started")
    assert started.payload["confidence"] == 0.9 and started.payload["arguments"] == {"text": "n"}
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert '<span class="muted">confidence 0.90</span>' in page


def test_guarded_holds_a_reversible_call_below_the_threshold_and_shows_why(
    make_task, operator, operator_client
):
    task = make_task([note(0.4), {"content": "done"}], tools=["test_note"], autonomy_level=GUARDED)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    assert EFFECTS == {}
    approval = Approval.objects.get(run=run)
    gate = "Guarded: the agent's confidence 0.40 is below the task's threshold 0.70"
    assert approval.gate == gate
    assert approval.confidence == 0.4 and approval.context["threshold"] == 0.7
    assert approval.arguments == {"text": "n"}
    assert approval.reasoning == "Writing the note."
    step = run.steps.get(kind="tool")
    assert step.status == "proposed" and step.confidence == 0.4 and step.gate == gate

    page = operator_client.get(reverse("approvals:inbox")).content.decode()
    assert escape(gate) in page
    assert "<dt>Confidence</dt><dd>0.40 (the task asks for 0.70)</dd>" in page

    response = operator_client.post(
        reverse("approvals:decide", args=[approval.pk]), {"decision": "approve"}
    )
    assert response.status_code == 303
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"note:n": 1}


@pytest.mark.parametrize(
    ("confidence", "why"),
    [
        (None, "the agent gave no confidence for this call"),
        ("high", "_confidence was 'high', not a number from 0 to 1"),
        (1.5, "_confidence was 1.5, not a number from 0 to 1"),
        (True, "_confidence was True, not a number from 0 to 1"),
    ],
)
def test_guarded_holds_a_reversible_call_with_no_usable_confidence(
    make_task, operator, confidence, why
):
    arguments = {"text": "n"} if confidence is None else {"text": "n", "_confidence": confidence}
    turn = {"content": "Writing.", "calls": [("test_note", arguments)]}
    task = make_task([turn, {"content": "done"}], tools=["test_note"], autonomy_level=GUARDED)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run)
    assert approval.gate == f"Guarded: {why}, and the task's threshold is 0.70"
    assert approval.confidence is None and approval.arguments == {"text": "n"}
    # The model's turn keeps the call as the model asked for it, confidence and all.
    asked = run.steps.get(kind="model").tool_calls[0]["arguments"]
    assert ("_confidence" in asked) is (confidence is not None)
    assert EFFECTS == {}


def test_a_read_call_and_an_autonomous_task_do_not_wait_on_low_confidence(make_task, operator):
    echo = {"calls": [("test_echo", {"text": "e", "_confidence": 0.1})]}
    guarded = make_task([echo, {"content": "done"}], tools=["test_echo"], autonomy_level=GUARDED)
    autonomous = make_task(
        [note(0.1), {"content": "done"}],
        tools=["test_note"],
        autonomy_level=AutonomyLevel.AUTONOMOUS,
    )
    for task in (guarded, autonomous):
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED and run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"echo:e": 1, "note:n": 1}
    assert sorted(Step.objects.filter(kind="tool").values_list("confidence", flat=True)) == [
        0.1,
        0.1,
    ]


def test_a_task_with_a_threshold_of_zero_runs_guarded_calls_without_confidence(make_task, operator):
    turn = {"calls": [("test_note", {"text": "n"})]}
    task = make_task(
        [turn, {"content": "done"}],
        tools=["test_note"],
        autonomy_level=GUARDED,
        confidence_threshold=0.0,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED and run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"note:n": 1}


def test_a_version_made_before_the_gate_weighed_confidence_runs_as_it_did(make_task, operator):
    turn = {"calls": [("test_note", {"text": "n"})]}
    task = make_task([turn, {"content": "done"}], tools=["test_note"], autonomy_level=GUARDED)
    run = run_start(task=task, run_input={}, user=operator)
    # As a version pinned before this release: its definition has no "confidence_gate".
    definition = dict(run.task_version.definition)
    assert definition.pop("confidence_gate") is True
    TaskVersion.objects.filter(pk=run.task_version_id).update(definition=definition)
    assert run_until_rest(run) is Outcome.FINISHED and run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"note:n": 1}


# The builtins and refused calls: the confidence is never an argument ----------------


def test_the_builtins_take_a_confidence_given_with_them_out_of_their_arguments(make_task, operator):
    plan = {"steps": [{"title": "ask"}, {"title": "report"}], "_confidence": 0.9}
    question = {"question": "Which batch?", "_confidence": 0.8}
    task = make_task(
        [
            {"calls": [("plan_update", plan)]},
            {"calls": [("ask_person", question)]},
            {"content": "done"},
        ]
    )
    CHECKS[task.slug] = lambda messages: check_turn_with(
        {"objective_met": True, "confidence": 0.9, "evidence": "asked", "_confidence": 0.9}
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    assert run.plan == [{"title": "ask"}, {"title": "report"}]
    asked = run.steps.get(tool_name="ask_person")
    assert asked.status == "proposed" and asked.arguments == {"question": "Which batch?"}

    approval_decide(
        approval=Approval.objects.get(run=run), user=operator, approve=True, reason="2026-11"
    )
    assert run_until_rest(run) is Outcome.FINISHED
    # The self-check's report, with a confidence beside its own, is read as it is.
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.confidence == 0.9


def check_turn_with(arguments: dict) -> ModelTurn:
    call = ToolCallRequest(id="check", name="report_check", arguments=json.dumps(arguments))
    return ModelTurn(content="", tool_calls=[call])


def test_a_repeated_call_of_a_tool_not_granted_is_a_loop_whatever_the_confidence(
    make_task, operator
):
    turns = [
        {"calls": [("test_send", {"text": "x", "_confidence": 0.5 + n / 100})]} for n in range(6)
    ]
    task = make_task([*turns, {"content": "done"}], self_check=False)
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    assert run.reason.startswith("loop: test_send was called 3 times with the same arguments")
    refused = run.steps.filter(kind="tool")
    assert [step.arguments for step in refused] == [{"text": "x"}] * 3
    assert EFFECTS == {}


def test_an_mcp_tool_that_declares_the_confidence_argument_is_not_imported():
    schema = {"type": "object", "properties": {"_confidence": {"type": "string"}}}
    assert schema_problem(schema) == (
        "its input schema has a property named '_confidence', which agentops adds to every "
        "tool for the agent's confidence in the call"
    )
    assert schema_problem({"type": "object", "properties": {"text": {"type": "string"}}}) == ""
