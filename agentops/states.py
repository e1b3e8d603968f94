"""The one place where allowed status transitions are written down and checked.

Each stateful model (Run, Step, Approval) declares its table here; services move state
only through ``check`` and a conditional UPDATE on the old status, so a table edit is the
only way to allow a new move.
"""

from __future__ import annotations

from collections.abc import Mapping


class InvalidTransition(Exception):
    """A status change the table does not allow, or one that lost a race."""


class Transitions:
    def __init__(self, name: str, table: Mapping[str, set[str]]) -> None:
        self.name = name
        self.table = {source: frozenset(targets) for source, targets in table.items()}

    def allowed(self, source: str, target: str) -> bool:
        return target in self.table.get(source, frozenset())

    def check(self, source: str, target: str) -> None:
        if not self.allowed(source, target):
            raise InvalidTransition(f"a {self.name} cannot go from {source} to {target}")

    def terminal(self, status: str) -> bool:
        return not self.table.get(status)


RUN = Transitions(
    "run",
    {
        "queued": {"running", "cancelled"},
        "running": {"queued", "waiting", "succeeded", "failed", "halted", "cancelled"},
        # succeeded: a person accepted an outcome the agent was not sure of.
        "waiting": {"queued", "succeeded", "halted", "cancelled"},
        "succeeded": set(),
        "failed": set(),
        "halted": set(),
        "cancelled": set(),
    },
)

# Tool steps: proposed (waiting on a gate), started (committed before the call fires),
# then an outcome. ``refused`` never fired (invalid, denied, rejected); ``simulated`` is
# Shadow mode's record of a call that was not made; ``unknown`` is a call interrupted
# after it may have taken effect. Model, plan and check steps are recorded finished.
STEP = Transitions(
    "step",
    {
        # succeeded: a question to a person (ask_person), answered; it fires nothing.
        "proposed": {"started", "refused", "simulated", "succeeded"},
        "started": {"succeeded", "failed", "unknown"},
        "unknown": {"succeeded", "failed", "started", "refused"},
        "succeeded": set(),
        "failed": set(),
        "refused": set(),
        "simulated": set(),
    },
)

APPROVAL = Transitions(
    "approval",
    {
        "pending": {"approved", "rejected", "expired", "cancelled"},
        "approved": set(),
        "rejected": set(),
        "expired": set(),
        "cancelled": set(),
    },
)
