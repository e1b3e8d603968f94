"""Loops and stalls, read from a run's tool steps.

A loop is one call (tool, arguments) that returned the same result ``repeat_limit``
times. A stall is ``stall_limit`` tool calls in a row of which none brought anything new:
each repeated a (tool, arguments, result) seen earlier in the run. Calls of one tool with
different arguments are new information, so they are neither.

Plan churn is a stall too: ``plan_update`` calls with no other tool call between them
learn nothing and change nothing outside the run. The same plan ``repeat_limit`` times in
a row, or ``stall_limit`` plan calls in a row (revised or refused), is found as a stall
whose reason names plan churn. A plan call neither adds to nor breaks the streak of
repeated tool calls: it is not a call to the world.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from agentops.runtime.builtins import PLAN_TOOL


@dataclass(frozen=True)
class LoopFinding:
    kind: str  # "loop" or "stall" (plan churn is a stall; its reason says so)
    reason: str
    through_step: int


@dataclass(frozen=True)
class ToolCallRecord:
    number: int
    tool: str
    arguments: Any
    outcome: Any
    # What makes two calls the same: tool, arguments and outcome. Made once per record,
    # so a caller that keeps records of finished calls hashes each call once per run.
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = (self.tool, self.arguments, self.outcome)
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
        object.__setattr__(self, "digest", digest.hexdigest())


def loop_find(
    calls: Iterable[ToolCallRecord], *, repeat_limit: int, stall_limit: int
) -> LoopFinding | None:
    """The first loop or stall in ``calls``, in order; None if there is none."""
    watch = LoopWatch(repeat_limit=repeat_limit, stall_limit=stall_limit)
    for call in calls:
        finding = watch.add(call)
        if finding is not None:
            return finding
    return None


@dataclass
class LoopWatch:
    """``loop_find`` one call at a time: what it has seen of a run's calls so far. The
    engine keeps one for a slice and adds each finished call once, so that checking
    before a turn costs the same at the run's two-hundredth step as at its first."""

    repeat_limit: int
    stall_limit: int
    seen: set[str] = field(default_factory=set)
    repeats: Counter[str] = field(default_factory=Counter)
    stale_in_a_row: int = 0
    churn: PlanChurn = field(default_factory=lambda: PlanChurn())

    def add(self, call: ToolCallRecord) -> LoopFinding | None:
        """The finding ``call`` completes, after the calls added before it, or None."""
        repeat_limit, stall_limit = self.repeat_limit, self.stall_limit
        if call.tool == PLAN_TOOL:
            return self.churn.add(call, repeat_limit=repeat_limit, stall_limit=stall_limit)
        self.churn = PlanChurn()  # the agent acted: the plans before this call were not churn
        digest = call.digest
        self.repeats[digest] += 1
        if repeat_limit and self.repeats[digest] >= repeat_limit:
            arguments = json.dumps(call.arguments, sort_keys=True, default=str)
            return LoopFinding(
                "loop",
                f"loop: {call.tool} was called {self.repeats[digest]} times with the same "
                f"arguments {arguments[:200]} and returned the same result each time",
                call.number,
            )
        self.stale_in_a_row = self.stale_in_a_row + 1 if digest in self.seen else 0
        self.seen.add(digest)
        if stall_limit and self.stale_in_a_row >= stall_limit:
            return LoopFinding(
                "stall",
                f"stall: the last {self.stale_in_a_row} tool calls each repeated an earlier "
                "call and its result; nothing new was learned",
                call.number,
            )
        return None

    def copy(self) -> LoopWatch:
        """A watch that goes on from here without changing this one."""
        return replace(
            self,
            seen=set(self.seen),
            repeats=Counter(self.repeats),
            churn=replace(self.churn),
        )


def plan_digest(arguments: Any) -> str:
    """What makes two plans the same: their steps (titles and statuses), not the reason
    given for them, so a plan resubmitted with new words around it is still the same."""
    steps = arguments.get("steps") if isinstance(arguments, dict) else arguments
    return hashlib.sha256(json.dumps(steps, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class PlanChurn:
    """The ``plan_update`` calls since the agent last called any other tool."""

    in_a_row: int = 0
    same_in_a_row: int = 0
    last: str | None = None

    def add(
        self, call: ToolCallRecord, *, repeat_limit: int, stall_limit: int
    ) -> LoopFinding | None:
        digest = plan_digest(call.arguments)
        self.in_a_row += 1
        self.same_in_a_row = self.same_in_a_row + 1 if digest == self.last else 1
        self.last = digest
        if repeat_limit and self.same_in_a_row >= repeat_limit:
            return LoopFinding(
                "stall",
                f"plan churn: {PLAN_TOOL} was called {self.same_in_a_row} times in a row "
                "with the same plan and no other call between; the agent re-plans instead "
                "of acting",
                call.number,
            )
        if stall_limit and self.in_a_row >= stall_limit:
            return LoopFinding(
                "stall",
                f"plan churn: the last {self.in_a_row} calls all revised the plan "
                f"({PLAN_TOOL}) and none acted on it",
                call.number,
            )
        return None
