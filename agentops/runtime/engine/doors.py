"""The four doors a requested call passes before anything is written: granted, valid
JSON and valid against its schema, permitted by the rules, and through the gate."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from agentops.runtime.engine.context import Context, clipped, slice_cached
from agentops.runtime.gates import (
    GateDecision,
    Verdict,
    confidence_split,
    gate_decide,
    schema_with_confidence,
)
from agentops.runtime.models.base import TOOL_NAME_CHARS
from agentops.runtime.rules import RuleSpec, rules_evaluate
from agentops.runtime.tools import executor_for
from agentops.strict_json import json_loads_strict
from tasks.models import (
    AutonomyLevel,
    StepKind,
    Task,
    Tool,
)


def granted_tools(definition: dict) -> dict[str, Tool]:
    names = tuple(definition["tools"])
    return slice_cached(
        ("tools", names),
        lambda: {tool.name: tool for tool in Tool.objects.filter(name__in=names)},
    )


def tool_spec(tool: Tool) -> dict:
    schema = schema_with_confidence(tool.input_schema or {"type": "object", "properties": {}})
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": schema},
    }


@dataclass(frozen=True)
class ParsedCall:
    """A call's arguments as the model sent them, parsed: its own arguments (without
    ``_confidence``), why they cannot be used ("" if they can), and the agent's
    confidence in the call (None if it gave no usable one, and what was wrong)."""

    arguments: Any
    refusal: str = ""
    confidence: float | None = None
    confidence_problem: str = ""


def call_parsed(raw: str) -> ParsedCall:
    try:
        arguments = json_loads_strict(raw or "{}")
    except json.JSONDecodeError as error:
        return ParsedCall(
            raw, f"the arguments are not valid JSON ({error.msg} at position {error.pos})"
        )
    if not isinstance(arguments, dict):
        return ParsedCall(arguments, "the arguments must be a JSON object")
    # Every call is asked for a confidence, the builtins' and ungranted tools' included:
    # it is never an argument of the call itself.
    own, confidence, problem = confidence_split(arguments)
    return ParsedCall(own, "", confidence, problem)


def call_arguments(raw: str) -> tuple[Any, str]:
    """A call's own arguments, and why they cannot be used ("" if they can)."""
    parsed = call_parsed(raw)
    return parsed.arguments, parsed.refusal


def call_read(call: dict) -> ParsedCall:
    """A requested call as stored on its model step (``calls_normalise``), parsed. Its
    arguments, if they were over AGENTOPS_MAX_ARGUMENT_BYTES, were not kept: the call is
    refused saying so, and its arguments are the stand-in that was kept."""
    oversized = call.get("oversized")
    if not oversized:
        return call_parsed(call["arguments"])
    stand_in = json.loads(call["arguments"])
    return ParsedCall(stand_in, oversized_refusal(oversized))


# The most of one validation error kept: a schema error quotes the value it refuses, and
# a refusal is stored on the step and its event and sent back to the model.
ERROR_CHARS = 500


def errors_said(errors: list[str]) -> str:
    """Validation errors as one refusal, each cut to ``ERROR_CHARS``."""
    return "; ".join(clipped(error, ERROR_CHARS) for error in errors)


def oversized_refusal(oversized: dict) -> str:
    return (
        f"the arguments are {oversized['bytes']:,} bytes, more than the limit of "
        f"{oversized['limit']:,} bytes (AGENTOPS_MAX_ARGUMENT_BYTES): the call was refused "
        f"and its arguments were not kept, only their first bytes and their sha256 "
        f"({oversized['sha256']})"
    )


@dataclass(frozen=True)
class Doors:
    """What the doors say of one requested call, before anything is written."""

    tool: Tool | None
    arguments: Any
    refusal: str
    decision: GateDecision | None
    # The agent's confidence in the call, taken out of its arguments (None: none given).
    confidence: float | None = None

    def step_fields(self, call: dict) -> dict[str, Any]:
        return {
            "kind": StepKind.TOOL,
            "tool": self.tool,
            "tool_name": call["name"][:TOOL_NAME_CHARS],
            "tool_call_id": call["id"],
            "arguments": self.arguments,
            "confidence": self.confidence,
        }

    @property
    def runs_now(self) -> bool:
        return self.decision is not None and self.decision.verdict is Verdict.RUN


def call_doors(ctx: Context, call: dict) -> Doors:
    """Granted, valid JSON, valid against the schema, (rules), and the gate."""
    tools = granted_tools(ctx.definition)
    tool = tools.get(call["name"])
    parsed = call_read(call)
    arguments, refusal, confidence = parsed.arguments, parsed.refusal, parsed.confidence
    # An oversized call is refused for its size, whatever it names: nothing else was kept.
    if tool is None and not call.get("oversized"):
        granted = ", ".join(sorted(tools)) or "none"
        refusal = f"the tool {call['name']!r} is not granted to this task (granted: {granted})"
    elif tool is not None and not refusal:
        errors = executor_for(tool).validate(tool, arguments)
        if errors:
            refusal = f"{tool.name} refused the arguments: " + errors_said(errors)
    if refusal or tool is None:
        return Doors(tool, arguments, refusal, None, confidence)
    rules = [
        RuleSpec(number, rule["expression"], rule["effect"], rule.get("description", ""))
        for number, rule in enumerate(ctx.definition.get("rules", {}).get(tool.name, []), 1)
    ]
    verdict = rules_evaluate(rules, arguments)
    if verdict.effect == "deny":
        return Doors(tool, arguments, verdict.reason, None, confidence)
    level, pinned = autonomy_level(ctx), ctx.definition["autonomy_level"]
    decision = gate_decide(
        autonomy_level=level,
        side_effect=tool.side_effect,
        always_approve=tool.always_approve,
        confidence=confidence,
        threshold=confidence_threshold(ctx),
        confidence_problem=parsed.confidence_problem,
    )
    if level < pinned and decision.verdict is not Verdict.RUN:
        decision = replace(
            decision, reason=f"{decision.reason} (the dial was turned down after this run started)"
        )
    if verdict.effect == "approve" and decision.verdict is Verdict.RUN:
        decision = GateDecision(Verdict.HOLD, verdict.reason)
    return Doors(tool, arguments, "", decision, confidence)


def confidence_threshold(ctx: Context) -> float:
    """The confidence a call needs to run by itself at Guarded: the task's threshold, for
    a version made since the gate weighs confidence (an older one runs as it did)."""
    return float(ctx.setting("confidence_threshold")) if ctx.setting("confidence_gate") else 0.0


def autonomy_level(ctx: Context) -> int:
    """The level the gate applies: the one the run started with, or the task's dial now
    if it was turned down since (a step-down after a rejection or an incident reaches a
    run already going at its next slice; turning the dial up never does). A run that
    started making real calls is not switched to simulated ones: turned down to Shadow,
    its calls wait for a person, as at Supervised."""
    live = slice_cached(("autonomy", ctx.run.task_id), lambda: task_autonomy(ctx.run.task_id))
    pinned = ctx.definition["autonomy_level"]
    if live is None:
        return pinned
    return min(pinned, max(live, AutonomyLevel.SUPERVISED))


def task_autonomy(task_id: int) -> int | None:
    return Task.objects.filter(pk=task_id).values_list("autonomy_level", flat=True).first()
