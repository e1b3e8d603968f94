"""The agentops app's own scripted model: the agent of ``manage.py chaos``.

It lives here, in the app's ``agent_tools`` module, because every process imports these
modules at start-up (``AgentopsConfig.ready``): the queue workers the chaos command
starts (``manage.py qcluster``, ``celery -A agentops worker``) know the script without
loading anything of the command's. It registers no tool: the chaos run's tools are
http tools, rows the command makes, pointing at its effect sink (``agentops.chaos``).
"""

from __future__ import annotations

import json
from typing import Any

from agentops.runtime.builtins import PLAN_TOOL
from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import script, scripted_turn

CHAOS_SCRIPT = "chaos-agent"
INPUT_MARK = "\n\nInput:\n"  # how the engine hands the run's input to the model


def run_input_of(messages: list[dict]) -> dict[str, Any]:
    """The run's input, as the engine writes it into the first user message."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    # The last mark: the objective before it may hold the text "Input:" on a line of its
    # own (an email's subject rendered into it); the input after it is JSON, which
    # escapes every line break.
    _, _, text = user.rpartition(INPUT_MARK)
    return json.loads(text) if text else {}


def chaos_call(order: dict[str, Any], number: int) -> tuple[str, dict[str, Any]]:
    """The ``number``-th call of a chaos run (from 1): odd numbers go to the idempotent
    tool, even ones to the other, each with its number, so that no two calls of a run
    are the same call (the loop rails would rightly stop a run that repeats one)."""
    tool = order["idempotent_tool"] if number % 2 else order["plain_tool"]
    return tool, {"n": number, "_confidence": 0.99}


@script(CHAOS_SCRIPT)
def chaos_agent(messages: list[dict]) -> ModelTurn:
    """Plan, make the input's ``calls`` side-effecting calls one a turn, then answer.

    A function of the transcript only, as every script: turn k (counted in the
    assistant messages so far) makes call k whatever became of the calls before it, so a
    worker that recovers the run is given the same turns, and a call that was refused or
    failed is not asked for again."""
    order = run_input_of(messages)
    calls = int(order["calls"])
    turn = sum(1 for m in messages if m["role"] == "assistant")
    if turn == 0:
        plan = {
            "steps": [
                {
                    "title": f"make {calls} calls, {order['idempotent_tool']} and "
                    f"{order['plain_tool']} in turn"
                },
                {"title": "report what the far side answered"},
            ]
        }
        return scripted_turn({"content": "planning", "calls": [(PLAN_TOOL, plan)]}, turn)
    if turn <= calls:
        return scripted_turn(
            {"content": f"call {turn} of {calls}", "calls": [chaos_call(order, turn)]}, turn
        )
    return scripted_turn({"content": f"done: {calls} calls made"}, turn)
