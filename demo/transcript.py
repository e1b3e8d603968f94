"""What the demo's scripted models read from a run's transcript, and the plan updates
they write: shared by the three workflows' scripts (demo.agent_tools, demo.support,
demo.leads)."""

from __future__ import annotations

import json

from agentops.agent_tools import run_input_of


def run_input(messages: list[dict]) -> dict:
    """The run's input, as the engine puts it in the first user message."""
    return run_input_of(messages)


def tool_results(messages: list[dict]) -> dict[str, dict]:
    """The latest result of each tool, read from the transcript."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
    results = {}
    for message in messages:
        if message["role"] == "tool":
            results[names.get(message["tool_call_id"], "?")] = json.loads(message["content"])
    return results


def plan_steps(plan: list[str], done: int, reason: str) -> tuple[str, dict]:
    """A plan_update call with the first ``done`` steps of ``plan`` done and the next one
    doing."""
    steps = [
        {"title": title, "status": "done" if n < done else "doing" if n == done else "todo"}
        for n, title in enumerate(plan)
    ]
    return ("plan_update", {"steps": steps, "reason": reason})
