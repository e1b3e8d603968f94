"""Scripted models: deterministic policies for the offline demo and the tests.

A script is a function of the conversation so far that returns the next turn. Because it
reads only the transcript, replaying a run's record gives the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from agentops.runtime.models.base import ModelNotConfigured, ModelTurn, ToolCallRequest

Script = Callable[[list[dict]], ModelTurn]
SCRIPTS: dict[str, Script] = {}


def script(name: str) -> Callable[[Script], Script]:
    def register(function: Script) -> Script:
        SCRIPTS[name] = function
        return function

    return register


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
    def __init__(self, name: str, play: Script) -> None:
        self.label = f"scripted:{name}"
        self._play = play

    @classmethod
    def named(cls, name: str) -> ScriptedClient:
        try:
            return cls(name, SCRIPTS[name])
        except KeyError:
            known = ", ".join(sorted(SCRIPTS)) or "none"
            raise ModelNotConfigured(
                f"no scripted model named {name!r} is installed (installed: {known})"
            ) from None

    def complete(self, *, messages: list[dict], tools: list[dict]) -> ModelTurn:
        return self._play(messages)
