"""What may follow a run's end in its trail: one rule, for the database's verifier
(lineage.verification) and the export's (lineage.export), so the two never disagree.
Imports neither Django nor the database.

After the event that ends a run, only two things are recorded honestly:

- the outcome of a call that was in flight at the end (a call that fired is recorded
  whatever became of its run): one outcome for each step that has a ``tool.started``
  and no settled outcome (``tool.succeeded``, ``tool.failed``) before the end, or that
  was marked ``tool.unknown`` before it (its first call may still answer, after a person
  settled it);
- ``approval.cancelled`` for an approval that was requested and not decided before the
  end (``approvals_withdraw`` closes the run's open questions), once each, matched by
  the approval's id in the payload;
- ``incident.flagged``, once per incident id: a person flags an incident only on a run
  that has ended (``tasks.autonomy.incident_flag``).

Anything else after the end, or a second event for the same step or approval, was
added later. Row content is never trusted: text that does not parse is an event that
matches nothing, never an exception.
"""

from __future__ import annotations

import json
from typing import Any

TERMINAL_KINDS = frozenset({"run.succeeded", "run.failed", "run.halted", "run.cancelled"})
CALL_STARTED_KIND = "tool.started"
CALL_UNKNOWN_KIND = "tool.unknown"
CALL_SETTLED_KINDS = frozenset({"tool.succeeded", "tool.failed"})
LATE_OUTCOME_KINDS = frozenset({"tool.succeeded", "tool.failed", "tool.late_outcome"})
APPROVAL_REQUESTED_KIND = "approval.requested"
APPROVAL_CLOSED_KINDS = frozenset(
    {"approval.approved", "approval.rejected", "approval.expired", "approval.cancelled"}
)
APPROVAL_WITHDRAWN_KIND = "approval.cancelled"
INCIDENT_KIND = "incident.flagged"
# The kinds before the end whose text the rule may need: kept (unparsed) until an
# event follows the end, which most runs never have.
KEPT_KINDS = frozenset(
    {CALL_STARTED_KIND, CALL_UNKNOWN_KIND, APPROVAL_REQUESTED_KIND}
    | CALL_SETTLED_KINDS
    | APPROVAL_CLOSED_KINDS
)


def payload_of(record: tuple[bool, Any]) -> dict[str, Any] | None:
    """The payload an event holds, or None where its text is not an event's:
    ``record`` is (True, its canonical text) for hash version 1, or (False, its
    payload, as text or parsed) for version 0."""
    canonical, value = record
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if canonical:
        value = value.get("payload") if isinstance(value, dict) else None
    return value if isinstance(value, dict) else None


def key_of(payload: dict[str, Any] | None, name: str) -> int | str | None:
    """A step number or approval id from a payload: a plain int or string, else None."""
    value = payload.get(name) if payload is not None else None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return value


def record_of(version: int, canonical: str, payload: Any) -> tuple[bool, Any]:
    return (True, canonical) if version == 1 else (False, payload)


class RunEnd:
    """Fed a chain's events in order (``allows``), says whether each may stand there."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.kept: list[tuple[str, tuple[bool, Any]]] = []
        self.open_steps: set[int | str] | None = None
        self.open_approvals: set[int | str] | None = None
        self.incidents: set[int | str] = set()

    def allows(self, seq: int, kind: str, record: tuple[bool, Any]) -> bool:
        if self.at is None:
            if kind in TERMINAL_KINDS:
                self.at = seq
            elif kind in KEPT_KINDS:
                self.kept.append((kind, record))
            return True
        if self.open_steps is None:
            self.open_left()
        assert self.open_steps is not None and self.open_approvals is not None
        if kind in LATE_OUTCOME_KINDS:
            opened = self.open_steps
            key = key_of(payload_of(record), "step")
        elif kind == APPROVAL_WITHDRAWN_KIND:
            opened = self.open_approvals
            key = key_of(payload_of(record), "approval")
        elif kind == INCIDENT_KIND:
            key = key_of(payload_of(record), "incident")
            if key is None or key in self.incidents:
                return False
            self.incidents.add(key)
            return True
        else:
            return False
        if key is None or key not in opened:
            return False
        opened.discard(key)
        return True

    def open_left(self) -> None:
        """What the run left open at its end, from the events kept before it."""
        started: set[int | str] = set()
        settled: set[int | str] = set()
        unknown: set[int | str] = set()
        requested: set[int | str] = set()
        closed: set[int | str] = set()
        for kind, record in self.kept:
            payload = payload_of(record)
            if kind == APPROVAL_REQUESTED_KIND or kind in APPROVAL_CLOSED_KINDS:
                key = key_of(payload, "approval")
                if key is not None:
                    (requested if kind == APPROVAL_REQUESTED_KIND else closed).add(key)
                continue
            key = key_of(payload, "step")
            if key is None:
                continue
            if kind == CALL_STARTED_KIND:
                started.add(key)
                settled.discard(key)  # fired again (a person said the call did not happen)
            elif kind == CALL_UNKNOWN_KIND:
                unknown.add(key)
            else:
                settled.add(key)
        self.open_steps = (started - settled) | unknown
        self.open_approvals = requested - closed
        self.kept = []
