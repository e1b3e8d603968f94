"""Scripted models: deterministic policies for the offline demo and the tests.

A script is a function of the conversation so far that returns the next turn. Because it
reads only the transcript, replaying a run's record gives the same answers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from agentops.runtime.models.base import ModelNotConfigured, ModelTurn, ToolCallRequest

Script = Callable[[list[dict]], ModelTurn]
SCRIPTS: dict[str, Script] = {}
# A script's self-check: called with the conversation when the engine asks the model to
# check its final answer; without one, a scripted model reports full confidence.
CHECKS: dict[str, Script] = {}


def script(name: str, *, check: Script | None = None) -> Callable[[Script], Script]:
    def register(function: Script) -> Script:
        SCRIPTS[name] = function
        if check is not None:
            CHECKS[name] = check
        else:
            CHECKS.pop(name, None)
        return function

    return register


def check_turn(confidence: float, evidence: str, *, objective_met: bool = True) -> ModelTurn:
    """A scripted self-check report."""
    from agentops.runtime.builtins import CHECK_TOOL

    arguments = {"objective_met": objective_met, "confidence": confidence, "evidence": evidence}
    return ModelTurn(
        content="",
        tool_calls=[ToolCallRequest(id="check", name=CHECK_TOOL, arguments=json.dumps(arguments))],
        model="scripted",
    )


def turns_script(turns: list[dict[str, Any]]) -> Script:
    """A script that plays fixed turns in order, one per model call:
    ``{"content": "...", "calls": [("tool_name", {...args}), ...]}``."""

    def play(messages: list[dict]) -> ModelTurn:
        index = sum(1 for message in messages if message["role"] == "assistant")
        if index >= len(turns):
            return ModelTurn(content="(the script has no more turns)")
        return scripted_turn(turns[index], index)

    return play


def scripted_turn(turn: dict[str, Any], index: int) -> ModelTurn:
    calls = [
        ToolCallRequest(
            id=f"call_{index}_{position}",
            name=name,
            arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
        )
        for position, (name, arguments) in enumerate(turn.get("calls", []))
    ]
    return ModelTurn(
        content=turn.get("content", ""),
        tool_calls=calls,
        tokens_in=turn.get("tokens_in", 0),
        tokens_out=turn.get("tokens_out", 0),
        model="scripted",
    )


class ScriptedClient:
    def __init__(self, name: str, play: Script, check: Script | None = None) -> None:
        self.label = f"scripted:{name}"
        self._play = play
        self._check = check

    @classmethod
    def named(cls, name: str) -> ScriptedClient:
        try:
            return cls(name, SCRIPTS[name], CHECKS.get(name))
        except KeyError:
            known = ", ".join(sorted(SCRIPTS)) or "none"
            raise ModelNotConfigured(
                f"no scripted model named {name!r} is installed (installed: {known})"
            ) from None

    def complete(
        self,
        *,
        messages: list[dict],
        tools: list[dict],
        tool_choice: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> ModelTurn:
        from agentops.runtime.builtins import CHECK_TOOL

        if tool_choice == CHECK_TOOL:
            if self._check is not None:
                turn = self._check(messages)
            else:
                turn = check_turn(1.0, "scripted model: it follows its script and checks nothing")
        else:
            turn = self._play(messages)
        # The trail names the script that answered, as it would name a served model.
        return dataclasses.replace(turn, model=self.label)
