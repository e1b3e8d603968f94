"""The gate: given the task's autonomy level, the tool's side-effect class and the
agent's confidence in the call, does a call run, wait for a person, or (Shadow) get
recorded without being made?

The table is ARCHITECTURE.md's autonomy dial; a tool marked ``always_approve`` is a hard
gate at every level. Rules that require approval are applied on top of it by the engine
(``call_doors``), and low confidence in the outcome by the self-check before a run ends.

The agent states its confidence in each call it asks for: every granted tool's schema,
as the model sees it, gains one more argument, ``_confidence`` (0 to 1), which the engine
takes out before the call goes through the other doors. At Guarded a reversible call runs
only at or above the task's confidence threshold; below it, or with no usable confidence,
it waits for a person. Read-only calls run at every level, as at Supervised.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agentops.runtime.tools.base import CONFIDENCE_ARGUMENT
from tasks.models import AutonomyLevel, SideEffect


class Verdict(Enum):
    RUN = "run"
    HOLD = "hold"
    SIMULATE = "simulate"


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    reason: str
    # Held because of the agent's confidence in the call, not its class or a hard gate.
    by_confidence: bool = False


CONFIDENCE_SCHEMA = {
    "type": "number",
    "minimum": 0,
    "maximum": 1,
    "description": (
        "How sure you are, from 0 to 1, that this call is the right next step with the "
        "right arguments. Below the task's threshold, a person may have to approve it."
    ),
}


def schema_with_confidence(schema: dict) -> dict:
    """A tool's input schema as the model sees it: with ``_confidence`` required (no tool
    may declare it itself: ``reserved_schema_errors``)."""
    properties = schema.get("properties") or {}
    return {
        **schema,
        "properties": {**properties, CONFIDENCE_ARGUMENT: CONFIDENCE_SCHEMA},
        "required": [
            *(name for name in schema.get("required", []) if name != CONFIDENCE_ARGUMENT),
            CONFIDENCE_ARGUMENT,
        ],
    }


def confidence_split(arguments: dict) -> tuple[dict, float | None, str]:
    """A call's own arguments, the confidence the agent gave (None if it gave none or an
    unusable one), and what was wrong with it ("" if nothing)."""
    if CONFIDENCE_ARGUMENT not in arguments:
        return arguments, None, ""
    own = {name: value for name, value in arguments.items() if name != CONFIDENCE_ARGUMENT}
    value = arguments[CONFIDENCE_ARGUMENT]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return own, None, f"{CONFIDENCE_ARGUMENT} was {value!r}, not a number from 0 to 1"
    return own, float(value), ""


def gate_decide(
    *,
    autonomy_level: int,
    side_effect: str,
    always_approve: bool,
    confidence: float | None = None,
    threshold: float = 0.0,
    confidence_problem: str = "",
) -> GateDecision:
    level = AutonomyLevel(autonomy_level)
    effect = SideEffect(side_effect)
    if level == AutonomyLevel.SHADOW and effect != SideEffect.READ:
        return GateDecision(
            Verdict.SIMULATE, f"Shadow: a {effect.label.lower()} call is recorded, not made"
        )
    if always_approve:
        return GateDecision(Verdict.HOLD, "this tool is marked 'always approve'")
    if effect == SideEffect.READ:
        return GateDecision(Verdict.RUN, "read-only calls run at every level")
    if level == AutonomyLevel.SUPERVISED:
        return GateDecision(
            Verdict.HOLD, f"Supervised: every {effect.label.lower()} call waits for a person"
        )
    if level == AutonomyLevel.GUARDED and effect == SideEffect.IRREVERSIBLE:
        return GateDecision(Verdict.HOLD, "Guarded: irreversible calls wait for a person")
    if level == AutonomyLevel.GUARDED and threshold > 0:
        if confidence is None:
            why = confidence_problem or "the agent gave no confidence for this call"
            return GateDecision(
                Verdict.HOLD,
                f"Guarded: {why}, and the task's threshold is {threshold:.2f}",
                by_confidence=True,
            )
        if confidence < threshold:
            return GateDecision(
                Verdict.HOLD,
                f"Guarded: the agent's confidence {confidence:.2f} is below the task's "
                f"threshold {threshold:.2f}",
                by_confidence=True,
            )
    return GateDecision(Verdict.RUN, f"{level.label}: {effect.label.lower()} calls run")


def call_digest(tool_name: str, arguments: object) -> str:
    """The identity of one exact call: an approval binds to it, the engine checks it."""
    import hashlib
    import json

    canonical = json.dumps(
        {"tool": tool_name, "arguments": arguments}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
