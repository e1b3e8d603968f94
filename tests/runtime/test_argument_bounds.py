"""A call's arguments are bounded (AGENTOPS_MAX_ARGUMENT_BYTES): past the bound the call
is refused saying so, only a small stand-in is kept (in the model step, the tool step
and their events), and the model reads the stand-in in its later turns."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.db.models import Sum, TextField
from django.db.models.functions import Cast, Length

from agentops.runtime.builtins import ASK_TOOL, PLAN_TOOL
from agentops.runtime.engine import Outcome
from agentops.runtime.models.base import ModelTurn, ToolCallRequest, turn_storable
from agentops.runtime.models.scripted import SCRIPTS, scripted_turn
from lineage.models import LineageEvent
from tasks.models import RunStatus, Step, StepKind, StepStatus
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

LIMIT = 64 * 1024
BIG = 2 * 1024 * 1024


def stored_chars(queryset, field: str) -> int:
    """The characters the database holds in ``field`` over ``queryset``, as its text."""
    total = queryset.aggregate(n=Sum(Length(Cast(field, output_field=TextField()))))["n"]
    return total or 0


def big_call_run(make_task, operator, tool: str, arguments: dict):
    """A run whose first turn asks for ``tool`` with ``arguments``, then answers; returns
    the run and the messages the model read in each turn."""
    seen: list[list[dict]] = []

    def agent(messages: list[dict]) -> ModelTurn:
        seen.append(messages)
        if len(seen) == 1:
            return scripted_turn({"calls": [(tool, arguments)]}, 0)
        return scripted_turn({"content": "done"}, len(seen))

    task = make_task([], tools=["test_echo"], autonomy_level=3, self_check=False)
    SCRIPTS[task.model.split(":", 1)[1]] = agent
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    return run, seen


@pytest.mark.parametrize("tool", ["test_echo", PLAN_TOOL, ASK_TOOL, "not_granted"])
def test_a_call_past_the_bound_is_refused_and_only_a_stand_in_is_kept(
    make_task, operator, settings, tool
):
    settings.AGENTOPS_MAX_ARGUMENT_BYTES = LIMIT
    text = "é" + "a" * BIG
    arguments = {"text": text} if tool not in (PLAN_TOOL, ASK_TOOL) else {"question": text}
    if tool == PLAN_TOOL:
        arguments = {"steps": [{"title": text}]}
    raw = json.dumps(arguments)
    run, seen = big_call_run(make_task, operator, tool, arguments)

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert EFFECTS == {}
    # The call was refused for its size, with the size and the limit.
    step = Step.objects.get(run=run, kind__in=[StepKind.TOOL, StepKind.PLAN])
    assert step.status == StepStatus.REFUSED
    size = len(raw.encode())
    assert f"the arguments are {size:,} bytes, more than the limit of {LIMIT:,} bytes" in (
        step.error
    )
    assert hashlib.sha256(raw.encode()).hexdigest() in step.error
    # What is kept: the stand-in, on the model step's call and as the step's arguments.
    model_step = Step.objects.get(run=run, kind=StepKind.MODEL, number=1)
    call = model_step.tool_calls[0]
    assert call["oversized"] == {
        "bytes": size,
        "limit": LIMIT,
        "sha256": hashlib.sha256(raw.encode()).hexdigest(),
    }
    stand_in = json.loads(call["arguments"])["oversized"]
    assert raw.startswith(stand_in["head"]) and 0 < len(stand_in["head"].encode()) <= 256
    assert step.arguments == json.loads(call["arguments"])
    assert "more than the limit" in model_step.result["normalised"][0]
    # Measured in the database: the steps and the events hold the stand-in, not the 2 MB.
    steps = Step.objects.filter(run=run)
    events = LineageEvent.objects.filter(run_uuid=run.pk)
    for field in ("tool_calls", "arguments", "content", "result", "error"):
        assert stored_chars(steps, field) < 8 * 1024, field
    assert stored_chars(events, "payload") < 16 * 1024
    # A resumed run reads the same refusal from what is stored.
    from agentops.runtime.engine.doors import call_read

    assert call_read(model_step.tool_calls[0]).refusal == step.error
    # The model's next turn is small: it reads the stand-in and the refusal.
    assert len(seen) == 2
    assert len(json.dumps(seen[1])) < 16 * 1024
    assistant = next(m for m in seen[1] if m["role"] == "assistant")
    assert assistant["tool_calls"][0]["function"]["arguments"] == call["arguments"]
    answer = next(m for m in seen[1] if m["role"] == "tool")
    assert f"more than the limit of {LIMIT:,} bytes" in answer["content"]


def test_arguments_within_the_bound_are_kept_whole(make_task, operator, settings):
    settings.AGENTOPS_MAX_ARGUMENT_BYTES = 4096
    run, _ = big_call_run(make_task, operator, "test_echo", {"text": "fits"})
    call = Step.objects.get(run=run, kind=StepKind.MODEL, number=1).tool_calls[0]
    assert json.loads(call["arguments"]) == {"text": "fits"} and "oversized" not in call
    assert Step.objects.get(run=run, kind=StepKind.TOOL).status == StepStatus.SUCCEEDED
    assert EFFECTS == {"echo:fits": 1}


def test_the_bound_counts_utf8_bytes_at_its_edge(settings):
    settings.AGENTOPS_MAX_ARGUMENT_BYTES = 4096

    def kept(arguments: str) -> ToolCallRequest:
        turn = ModelTurn(content="", tool_calls=[ToolCallRequest("c", "t", arguments)])
        return turn_storable(turn).tool_calls[0]

    at = '"' + "é" * ((4096 - 2) // 2) + '"'  # two bytes a character: 4,096 bytes
    assert len(at.encode()) == 4096 and kept(at).arguments == at and kept(at).oversized is None
    over = at[:-1] + "éa" + '"'
    assert kept(over).oversized["bytes"] == len(over.encode()) == 4099
    # A stand-in cuts no character in two, and is kept as it is when stored again.
    head = json.loads(kept(over).arguments)["oversized"]["head"]
    assert over.startswith(head)
    again = turn_storable(ModelTurn(content="", tool_calls=[kept(over)])).tool_calls[0]
    assert again == kept(over)


def test_a_refusal_quotes_a_long_value_cut_not_whole(make_task, operator, settings):
    """Within the bound, a schema error still quotes the value it refuses: cut, since the
    refusal is stored twice and read by the model in each later turn."""
    settings.AGENTOPS_MAX_ARGUMENT_BYTES = LIMIT
    run, seen = big_call_run(make_task, operator, "test_echo", {"text": "b" * 30_000})
    step = Step.objects.get(run=run, kind=StepKind.TOOL)
    assert step.status == StepStatus.REFUSED
    assert step.error.startswith("test_echo refused the arguments: text: 'bbb")
    assert step.error.endswith("…") and len(step.error) < 600
    assert len(json.dumps(seen[1])) < 40_000  # the call itself, once, and the short refusal
