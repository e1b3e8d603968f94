"""The gate: given the task's autonomy level and the tool's side-effect class, does a
call run, wait for a person, or (Shadow) get recorded without being made?

The table is ARCHITECTURE.md's autonomy dial; a tool marked ``always_approve`` is a hard
gate at every level. Rules that require approval are applied on top of it by the engine
(``call_doors``), and low confidence by the self-check before a run ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tasks.models import AutonomyLevel, SideEffect


class Verdict(Enum):
    RUN = "run"
    HOLD = "hold"
    SIMULATE = "simulate"


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    reason: str


def gate_decide(*, autonomy_level: int, side_effect: str, always_approve: bool) -> GateDecision:
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
    return GateDecision(Verdict.RUN, f"{level.label}: {effect.label.lower()} calls run")


def call_digest(tool_name: str, arguments: object) -> str:
    """The identity of one exact call: an approval binds to it, the engine checks it."""
    import hashlib
    import json

    canonical = json.dumps(
        {"tool": tool_name, "arguments": arguments}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
