"""Loops and stalls, read from a run's tool steps.

A loop is one call (tool, arguments) that returned the same result ``repeat_limit``
times. A stall is ``stall_limit`` tool calls in a row of which none brought anything new:
each repeated a (tool, arguments, result) seen earlier in the run. Calls of one tool with
different arguments are new information, so they are neither.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoopFinding:
    kind: str  # "loop" or "stall"
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
    seen: set[str] = set()
    repeats: Counter[str] = Counter()
    stale_in_a_row = 0
    for call in calls:
        digest = call.digest
        repeats[digest] += 1
        if repeat_limit and repeats[digest] >= repeat_limit:
            arguments = json.dumps(call.arguments, sort_keys=True, default=str)
            return LoopFinding(
                "loop",
                f"loop: {call.tool} was called {repeats[digest]} times with the same "
                f"arguments {arguments[:200]} and returned the same result each time",
                call.number,
            )
        stale_in_a_row = stale_in_a_row + 1 if digest in seen else 0
        seen.add(digest)
        if stall_limit and stale_in_a_row >= stall_limit:
            return LoopFinding(
                "stall",
                f"stall: the last {stale_in_a_row} tool calls each repeated an earlier call "
                "and its result; nothing new was learned",
                call.number,
            )
    return None
