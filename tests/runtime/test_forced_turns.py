"""A turn that names a tool the model must call (``tool_choice``: the first turn's
plan_update, the self-check's report_check) is held to it, whether or not the model's
server enforces it: an answer without the call is recorded and not acted on, the model
is told and asked again within ``model_max_attempts``, and past that the run fails (the
first turn) or a person reviews the answer unchecked (the self-check)."""

from __future__ import annotations

import json

import pytest

from agentops.runtime.builtins import CHECK_TOOL, PLAN_TOOL
from agentops.runtime.engine import Outcome
from agentops.runtime.models.base import ModelTurn
from agentops.runtime.models.scripted import CHECKS, SCRIPTS, check_turn, scripted_turn
from approvals.models import ApprovalKind
from lineage.models import LineageEvent
from tasks.models import RunStatus, StepKind
from tasks.services import run_start
from tests.conftest import run_until_rest
from tests.peers.openai_server import OpenAICompatibleServer, completion

pytestmark = pytest.mark.django_db

PLAN = {"steps": [{"title": "answer the question"}]}


def reminded(messages: list[dict], tool: str) -> bool:
    """Whether the engine just told the model that its turn must call ``tool``."""
    last = messages[-1]
    return last["role"] == "user" and f"did not call {tool}" in last["content"]


def refused_answers(run) -> list[dict]:
    events = LineageEvent.objects.filter(run_uuid=run.pk, kind="model.answer_refused")
    return [event.payload for event in events.order_by("seq")]


def scripted_task(make_task, agent, **fields):
    task = make_task([], **fields)
    SCRIPTS[task.model.split(":", 1)[1]] = agent
    return task


def test_a_plain_answer_to_the_forced_first_turn_is_not_the_runs_answer(make_task, operator):
    asked: list[list[dict]] = []

    def agent(messages: list[dict]) -> ModelTurn:
        asked.append(messages)
        if len(asked) == 1:
            return scripted_turn({"content": "Done already!", "tokens_out": 5}, 0)
        if reminded(messages, PLAN_TOOL):
            return scripted_turn({"calls": [(PLAN_TOOL, PLAN)], "tokens_out": 7}, 1)
        return scripted_turn({"content": "the real answer"}, 2)

    run = run_start(task=scripted_task(make_task, agent, self_check=False), run_input={})
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED
    assert run.outcome == "the real answer"  # not "Done already!"
    assert [s.kind for s in run.steps.order_by("number")] == ["model", "plan", "model"]
    # The refused answer is in the trail, and what it cost is counted.
    (refused,) = refused_answers(run)
    assert refused["required"] == PLAN_TOOL and refused["asked"] == 1
    assert refused["content"] == "Done already!" and refused["tokens_out"] == 5
    assert run.tokens_out == 5 + 7
    # The model was told, right after its own answer, and the next turn forced the plan.
    assert asked[1][-2] == {"role": "assistant", "content": "Done already!"}
    assert "which this turn requires" in asked[1][-1]["content"]
    assert len(asked) == 3


def test_a_model_that_never_plans_fails_the_run_saying_why(make_task, operator):
    asked = []

    def agent(messages: list[dict]) -> ModelTurn:
        asked.append(messages)
        return scripted_turn({"content": f"no plan {len(asked)}", "tokens_in": 10}, 0)

    task = scripted_task(make_task, agent, self_check=False, model_max_attempts=3)
    run = run_start(task=task, run_input={})
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.FAILED
    assert run.reason == (
        f"the model did not call {PLAN_TOOL}, which its first turn requires, in 3 attempts: "
        "it answered without any tool call, which is not taken as a final answer before the "
        "work has begun"
    )
    assert run.outcome == ""
    assert len(asked) == 3
    assert [a["content"] for a in refused_answers(run)] == ["no plan 1", "no plan 2", "no plan 3"]
    assert run.tokens_in == 30  # every answer counted, the last in the failing commit
    assert not run.steps.exists()


def test_a_first_turn_that_calls_another_tool_goes_on(make_task, operator):
    """A server that ignores tool_choice may act at once: the call passes the doors as
    any call does (the plan is asked for, the rails hold either way)."""
    task = make_task(
        [{"calls": [("test_echo", {"text": "hi"})]}, {"content": "ok"}],
        tools=["test_echo"],
        self_check=False,
    )
    run = run_start(task=task, run_input={})
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and run.outcome == "ok"
    assert refused_answers(run) == []


def test_a_self_check_answered_without_its_report_is_asked_again(make_task, operator):
    turns = [{"calls": [(PLAN_TOOL, PLAN)]}, {"content": "the answer"}]
    task = make_task(turns, self_check=True, confidence_threshold=0.8)
    checks = []

    def check(messages: list[dict]) -> ModelTurn:
        checks.append(messages)
        if reminded(messages, CHECK_TOOL):
            return check_turn(0.9, "the totals match")
        return scripted_turn({"content": "Looks right to me."}, 0)

    CHECKS[task.model.split(":", 1)[1]] = check
    run = run_start(task=task, run_input={})
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED and run.outcome == "the answer"
    assert run.confidence == 0.9
    (refused,) = refused_answers(run)
    assert refused["required"] == CHECK_TOOL and refused["content"] == "Looks right to me."
    assert len(checks) == 2
    assert checks[1][-2] == {"role": "assistant", "content": "Looks right to me."}


def test_a_self_check_never_reported_goes_to_a_person_saying_so(make_task, operator):
    turns = [{"calls": [(PLAN_TOOL, PLAN)]}, {"content": "the answer"}]
    task = make_task(turns, self_check=True, model_max_attempts=2)
    CHECKS[task.model.split(":", 1)[1]] = lambda messages: scripted_turn({"content": "ok"}, 0)
    run = run_start(task=task, run_input={})
    assert run_until_rest(run) is Outcome.WAITING

    check = run.steps.get(kind=StepKind.CHECK)
    assert check.error == (
        f"the model did not report its self-check: it did not call {CHECK_TOOL} in 2 attempts"
    )
    approval = run.approvals.get()
    assert approval.kind == ApprovalKind.OUTCOME_REVIEW
    assert approval.context["outcome"] == "the answer"
    assert len(refused_answers(run)) == 1  # the first; the last is the check step's


def test_a_served_model_that_ignores_tool_choice_is_held_to_it(make_task, operator, settings):
    with OpenAICompatibleServer() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.OPENAI_API_KEY = "test"
        server.reply(completion("I am done.", prompt_tokens=20, completion_tokens=4))
        server.reply(completion(None, [("p1", PLAN_TOOL, PLAN)]))
        server.reply(completion("the answer"))
        task = make_task([], self_check=False)
        task.model = "test-model"
        task.save()
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED and run.outcome == "the answer"
    bodies = [request["body"] for request in server.requests]
    forced = {"type": "function", "function": {"name": PLAN_TOOL}}
    assert [body.get("tool_choice") for body in bodies] == [forced, forced, None]
    assert bodies[1]["messages"][-2] == {"role": "assistant", "content": "I am done."}
    assert "which this turn requires" in bodies[1]["messages"][-1]["content"]
    (refused,) = refused_answers(run)
    assert refused["content"] == "I am done." and refused["tokens_in"] == 20
    assert json.loads(run.steps.get(kind=StepKind.MODEL, number=1).tool_calls[0]["arguments"])
