"""Every fired call's outcome is recorded, whatever it holds: a tool result, an error or
a model's answer that no database stores as sent (NaN, 1e999, NUL, a lone surrogate,
nesting past the limit, an int too long to write) is normalised, with a note saying
what changed, and never fails the run or leaves a call that took effect ``started``.

Driven through the engine with a python tool, a real HTTP service, a scripted model and
the local OpenAI-compatible server; on SQLite and on PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import json

import pytest

from agentops.runtime.engine import Outcome
from agentops.strict_json import MAX_DEPTH, json_storable
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.models import AutonomyLevel, Run, RunStatus, Step, StepKind, StepStatus
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import PLANNED, run_until_rest
from tests.peers.http_service import HttpService
from tests.peers.openai_server import OpenAICompatibleServer, completion

pytestmark = pytest.mark.django_db


def events(run: Run, kind: str) -> list[dict]:
    return [
        e.payload for e in LineageEvent.objects.filter(run_uuid=run.pk, kind=kind).order_by("seq")
    ]


def cut(levels: int) -> object:
    """What ``json_storable`` keeps of ``[[[...]]]`` nested past the limit, under
    ``{"value": ...}`` (one level) and the tool's own list."""
    value: object = f"[nested deeper than {MAX_DEPTH} levels]"
    for _ in range(levels):
        value = [value]
    return value


def odd_run(make_task, operator, name: str, text: str) -> Run:
    task = make_task(
        [{"calls": [(name, {"text": text})]}, {"content": "done"}],
        tools=[name],
        autonomy_level=AutonomyLevel.AUTONOMOUS,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    return run


# A python tool -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stored", "said"),
    [
        ("nan", "NaN", 'NaN is not a JSON number; stored as the text "NaN"'),
        ("infinity", "Infinity", "Infinity is not a JSON number"),
        ("nul", "a\ufffdb", "NUL characters (\\u0000) were replaced by U+FFFD"),
        ("surrogate", "a\ufffdb", "unpaired surrogates were replaced by U+FFFD"),
        ("long_int", "[an integer too long to store]", "an integer of more than 3900 digits"),
        ("key", {"k\ufffd": 1, "k\ufffd (again)": 2}, "one was renamed"),
        ("set", "{1, 2}", "a set is not JSON; stored as its repr"),
        # 2,000 levels: kept to the limit, counted from where the value stands in the
        # event's payload (three levels down; the tool's own dict is one more), then cut.
        ("deep", cut(MAX_DEPTH - 4), f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_a_tool_result_no_database_stores_is_recorded_normalised_with_a_note(
    make_task, operator, text, stored, said
):
    run = odd_run(make_task, operator, "test_odd_value", text)

    assert run.status == RunStatus.SUCCEEDED, run.reason
    made_once = {f"odd:{text}": 1}
    assert dict(EFFECTS) == made_once  # and its outcome kept
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.SUCCEEDED
    assert step.result["value"] == {"value": stored}
    assert any(said in note for note in step.result["normalised"]), step.result["normalised"]
    # The trail says the same, and its chain is whole.
    (succeeded,) = events(run, "tool.succeeded")
    assert succeeded["result"] == step.result
    assert succeeded["normalised"] == step.result["normalised"]
    assert chain_verify(run.pk).intact


def test_a_result_that_needs_no_change_is_stored_as_returned(make_task, operator):
    run = odd_run(make_task, operator, "test_echo", "plain")
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.result == {"echo": "plain"}
    assert "normalised" not in events(run, "tool.succeeded")[0]


def test_a_tool_error_holding_nul_and_a_surrogate_is_recorded_with_a_note(make_task, operator):
    run = odd_run(make_task, operator, "test_odd_error", "x")

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert EFFECTS == {"odd_error:x": 1}
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.FAILED
    assert step.error.startswith("the backend said \ufffd and \ufffd about x")
    assert "[normalised: error: NUL characters" in step.error
    assert "unpaired surrogates were replaced" in step.error
    (failed,) = events(run, "tool.failed")
    assert failed["error"] == step.error and len(failed["normalised"]) == 2


# A real HTTP service -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stored", "said"),
    [
        ('{"v": NaN}', {"v": "NaN"}, "$.body.v: NaN is not a JSON number"),
        ('{"v": 1e999}', {"v": "Infinity"}, "$.body.v: Infinity is not a JSON number"),
        ('{"v": -Infinity}', {"v": "-Infinity"}, "$.body.v: -Infinity is not a JSON number"),
        ('{"v": "a\\u0000b"}', {"v": "a\ufffdb"}, "$.body.v: NUL characters"),
        ('{"v": "a\\ud800b"}', {"v": "a\ufffdb"}, "$.body.v: unpaired surrogates"),
        ('{"a\\u0000": 1}', {"a\ufffd": 1}, "$.body (a key): NUL characters"),
    ],
)
def test_an_http_answer_no_database_stores_is_recorded_normalised_with_a_note(
    make_task, operator, body, stored, said
):
    from tests.runtime.tools.test_http import http_tool

    with HttpService() as service:
        tool = http_tool(
            f"{service.url}/answer",
            save=True,
            side_effect="reversible",
            config_method="POST",
            config_query={"body": "{text}"},
        )
        task = make_task(
            [{"calls": [(tool.name, {"text": body})]}, {"content": "done"}],
            tools=[tool.name],
            autonomy_level=AutonomyLevel.AUTONOMOUS,
        )
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED
        assert service.hits("/answer") == 1

    assert run.status == RunStatus.SUCCEEDED, run.reason
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.SUCCEEDED
    assert step.result["value"]["body"] == stored
    assert any(said in note for note in step.result["normalised"]), step.result["normalised"]
    assert events(run, "tool.succeeded")[0]["normalised"] == step.result["normalised"]
    assert chain_verify(run.pk).intact


def test_an_http_answer_nested_past_the_parser_is_kept_as_text(make_task, operator):
    from tests.runtime.tools.test_http import http_tool

    deep = "[" * 5000 + "]" * 5000
    with HttpService() as service:
        tool = http_tool(f"{service.url}/answer", save=True, config_query={"body": deep})
        task = make_task(
            [{"calls": [(tool.name, {})]}, {"content": "done"}],
            tools=[tool.name],
            autonomy_level=AutonomyLevel.AUTONOMOUS,
        )
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.SUCCEEDED
    assert step.result["body"] == deep


# A scripted model --------------------------------------------------------------------


def test_a_models_text_no_database_stores_is_recorded_normalised_with_a_note(make_task, operator):
    task = make_task([PLANNED, {"content": "the answer: \x00 and \ud800, done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.outcome == "the answer: \ufffd and \ufffd, done"
    step = Step.objects.filter(run=run, kind=StepKind.MODEL).order_by("number").last()
    assert step.content == run.outcome
    notes = step.result["normalised"]
    assert any(n.startswith("content: NUL characters") for n in notes), notes
    assert any(n.startswith("content: unpaired surrogates") for n in notes), notes
    assert events(run, "model.responded")[-1]["normalised"] == notes
    assert chain_verify(run.pk).intact


def test_arguments_holding_a_raw_surrogate_fire_as_stored_with_a_note(make_task, operator):
    # Raw in the JSON text (not an escape): stored as U+FFFD, and the call reads that.
    task = make_task(
        [{"calls": [("test_echo", '{"text": "hi \ud800"}')]}, {"content": "done"}],
        tools=["test_echo"],
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert EFFECTS == {"echo:hi \ufffd": 1}
    model = Step.objects.filter(run=run, kind=StepKind.MODEL).first()
    assert model.tool_calls[0]["arguments"] == '{"text": "hi \ufffd"}'
    assert model.result["normalised"] == [
        "tool_calls[0].arguments: unpaired surrogates were replaced by U+FFFD"
    ]
    assert Step.objects.get(run=run, kind=StepKind.TOOL).arguments == {"text": "hi \ufffd"}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ('{"text": "a\\u0000b"}', "a NUL character (\\u0000) cannot be stored"),
        ('{"text": "a\\ud800b"}', "an unpaired surrogate"),
        ('{"text": ' + "[" * 200 + "]" * 200 + "}", f"nesting deeper than {MAX_DEPTH} levels"),
        ('{"text": ' + "9" * 5000 + "}", "an integer of more than 3900 digits"),
    ],
)
def test_arguments_no_database_stores_are_refused_never_fired(make_task, operator, raw, why):
    task = make_task([{"calls": [("test_echo", raw)]}, {"content": "done"}], tools=["test_echo"])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.REFUSED
    assert "not valid JSON" in step.error and why in step.error
    assert step.arguments == raw  # the model's text, kept as sent
    assert EFFECTS == {}


def test_a_call_id_and_name_too_long_for_their_columns_are_recorded(make_task, operator):
    from agentops.runtime.models.base import ModelTurn, ToolCallRequest
    from agentops.runtime.models.scripted import SCRIPTS

    task = make_task([], tools=["test_echo"])
    name = "x" * 200

    def play(messages: list[dict]) -> ModelTurn:
        if any(m["role"] == "tool" for m in messages):
            return ModelTurn(content="done")
        return ModelTurn(
            content="", tool_calls=[ToolCallRequest(id="i" * 300, name=name, arguments="{}")]
        )

    SCRIPTS[task.model.removeprefix("scripted:")] = play
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.REFUSED
    assert step.tool_name == "x" * 63 + "…"
    assert step.tool_call_id == "call_1_0"
    notes = Step.objects.filter(run=run, kind=StepKind.MODEL).first().result["normalised"]
    assert "tool_calls[0].id: longer than 100 characters; replaced" in notes
    assert "tool_calls[0].name: longer than 64 characters; cut" in notes


def test_a_question_longer_than_the_gate_is_asked_whole(make_task, operator):
    question = "Which one? " + "q" * 1500
    task = make_task([{"calls": [("ask_person", {"question": question})]}])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING

    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.arguments == {"question": question}
    approval = step.approvals.get()
    assert len(approval.gate) == 300 and approval.gate.endswith("…")


# The OpenAI-compatible server --------------------------------------------------------


def served_run(make_task, operator, settings, reply: dict, *, status: int = 200):
    """A run on the local OpenAI-compatible server answering ``reply`` after the plan
    (which uses no tokens), worked until it rests; returns (run, outcome)."""
    with OpenAICompatibleServer() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.OPENAI_API_KEY = "test"
        plan = {"steps": [{"title": "answer"}]}
        server.reply(
            completion(
                None, [("call_plan", "plan_update", plan)], prompt_tokens=0, completion_tokens=0
            )
        )
        server.reply(reply, status=status)
        task = make_task([], self_check=False)
        task.model = "test-model"
        task.save()
        run = run_start(task=task, run_input={}, user=operator)
        return run, run_until_rest(run)


def test_a_served_models_odd_answer_is_recorded_normalised_with_notes(
    make_task, operator, settings
):
    reply = completion("said \x00 and \ud800", prompt_tokens=11, completion_tokens=7)
    reply["usage"]["prompt_tokens"] = -5
    reply["usage"]["completion_tokens"] = float("nan")  # json.dumps writes NaN
    run, outcome = served_run(make_task, operator, settings, reply)

    assert outcome is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.outcome == "said \ufffd and \ufffd"
    assert (run.tokens_in, run.tokens_out) == (0, 0)
    notes = Step.objects.filter(run=run, kind=StepKind.MODEL).last().result["normalised"]
    assert "tokens_in: -5 is not a count of tokens; counted as 0" in notes
    assert "tokens_out: nan is not a count of tokens; counted as 0" in notes
    assert any(n.startswith("content: NUL characters") for n in notes)


def test_a_served_answer_of_the_wrong_shape_fails_the_run_saying_so(make_task, operator, settings):
    reply = completion("hello")
    reply["choices"][0]["message"] = None
    run, outcome = served_run(make_task, operator, settings, reply)
    assert outcome is Outcome.FINISHED

    assert run.status == RunStatus.FAILED
    assert "the model server's answer is malformed" in run.reason


def test_a_model_servers_error_text_is_stored_normalised(make_task, operator, settings):
    error = {"error": {"message": "bad \x00 request \ud800"}}
    run, outcome = served_run(make_task, operator, settings, error, status=400)
    assert outcome is Outcome.FINISHED

    assert run.status == RunStatus.FAILED
    assert "bad \ufffd request \ufffd" in run.reason
    assert "[normalised: reason: NUL characters" in run.reason


# json_storable itself ----------------------------------------------------------------


def test_json_storable_leaves_a_storable_value_equal_with_no_notes():
    value = {"a": [1, 2.5, "ü😀", None, True, {"b": -0.0}], "big": 10**30}
    assert json_storable(value) == (value, [])
    assert json.loads(json.dumps(value)) == value
