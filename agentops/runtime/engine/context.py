"""The slice's view of a run: its record in memory (``Context``), the clock of its
seconds of work, the reads kept for the slice, and the small value helpers every module
of the engine shares."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from django.db import transaction
from django.db.models import F

from agentops import states
from agentops.runtime.budgets import (
    Limits,
    Usage,
    limits_for,
)
from agentops.strict_json import text_storable
from tasks.models import (
    Run,
    RunStatus,
    Step,
)


class Outcome(Enum):
    NOT_CLAIMED = "not_claimed"  # another worker holds the run, or it is not runnable
    CONTINUE = "continue"
    YIELDED = "yielded"  # the slice ended; the run is queued again
    WAITING = "waiting"  # a person must act
    FINISHED = "finished"  # succeeded, failed, halted
    STOPPED = "stopped"  # the run was cancelled or taken over while this worker worked


class LeaseLost(Exception):
    """This worker no longer owns the run; it must stop without writing."""


class WorkClock:
    """Seconds of work for the time budget: counted while a worker holds the run, and
    added to the run at each commit, so waiting for a person or in the queue is not."""

    def __init__(self) -> None:
        self.mark = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        elapsed, self.mark = now - self.mark, now
        return elapsed

    def pending(self) -> float:
        return time.monotonic() - self.mark


_clock: ContextVar[WorkClock | None] = ContextVar("agentops_work_clock", default=None)


# Reads that cannot change what a slice does, kept for the slice: the granted tools of
# the pinned definition, and the model's price. An edit takes effect at the next slice.
_slice_cache: ContextVar[dict | None] = ContextVar("agentops_slice_cache", default=None)


def slice_cached(key: tuple, load: Callable[[], Any]) -> Any:
    cache = _slice_cache.get()
    if cache is None:
        return load()
    if key not in cache:
        cache[key] = load()
    return cache[key]


def step_derived(step: Step, name: str, derive: Callable[[], Any]) -> Any:
    """What ``derive`` makes of ``step``. A step in a final status never changes again,
    so that is made once per slice and kept; the transcript and the loop check read
    every earlier step each turn, and would otherwise redo it all, O(steps²) a run."""
    if not states.STEP.terminal(step.status):
        return derive()
    return slice_cached((name, step.pk, step.status), derive)


def clock_added(add: dict[str, Any] | None = None) -> dict[str, Any]:
    """``add`` plus the seconds of work since the last commit, for the run's counters."""
    added = dict(add or {})
    clock = _clock.get()
    if clock:
        added["seconds_used"] = added.get("seconds_used", 0.0) + clock.lap()
    return added


def increments(added: dict[str, Any]) -> dict[str, Any]:
    """``{"steps_used": 1}`` as the UPDATE's ``steps_used = steps_used + 1``."""
    return {name: F(name) + delta for name, delta in added.items()}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Context:
    """The slice's view of the run: the run row, its pinned definition, its steps.

    It is read once when the slice starts and then kept in step with what this worker
    commits, since while it holds the lease nobody else writes the run's steps or
    counters: the fence in every transaction proves that it still holds it. Where a
    commit may have met someone else's write, the record is marked ``stale`` and read
    again before the next step."""

    run: Run
    owner: str
    definition: dict
    steps: list[Step]
    stale: bool = False
    _committed: list[Callable[[], None]] | None = field(default=None, repr=False)
    # What the slice carries forward turn by turn, made from ``steps`` as they grow (the
    # transcript, the loop check's state: turns, rails), so a turn's cost does not grow
    # with the run. Dropped when the record is read again.
    carried: dict[str, Any] = field(default_factory=dict, repr=False)

    def run_changed(self, added: dict[str, Any], values: dict[str, Any]) -> None:
        """What a committed fence did to the run's row, mirrored in memory."""
        for name, delta in added.items():
            setattr(self.run, name, getattr(self.run, name) + delta)
        for name, value in values.items():
            setattr(self.run, name, value)

    def steps_committed(self, steps: list[Step]) -> None:
        self.steps.extend(steps)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One of the slice's transactions. What it wrote reaches the record in memory
        when the block commits; after an error, nothing does. (Not Django's
        ``on_commit``, which waits for the outermost transaction: a test wraps each test
        in one.) A block inside another leaves it to the outer one."""
        if self._committed is not None:
            with transaction.atomic():
                yield
            return
        self._committed = []
        try:
            with transaction.atomic():
                yield
            applies = self._committed
        finally:
            self._committed = None
        for apply in applies:
            apply()

    def outside_transaction(self) -> bool:
        """Whether a write now would be a commit of its own, not part of a block's."""
        return self._committed is None

    def on_commit(self, apply: Callable[[], None]) -> None:
        if self._committed is None:
            raise RuntimeError("a slice's write must be inside ctx.transaction()")
        self._committed.append(apply)

    def reload(self) -> None:
        fresh = context_load(self.run.pk, self.owner)
        self.run, self.definition, self.steps = fresh.run, fresh.definition, fresh.steps
        self.stale = False
        self.carried.clear()

    def setting(self, name: str) -> Any:
        return self.definition.get(name, DEFINITION_DEFAULTS.get(name))

    @property
    def limits(self) -> Limits:
        return limits_for(self.definition, self.run.budget_extra)

    def usage(self) -> Usage:
        clock = _clock.get()
        return Usage(
            steps=self.run.steps_used,
            tokens=self.run.tokens_in + self.run.tokens_out,
            seconds=self.run.seconds_used + (clock.pending() if clock else 0.0),
            spend=self.run.spend,
        )

    @property
    def number(self) -> int:
        """The number the next step gets."""
        return (self.steps[-1].number + 1) if self.steps else 1


# A task version made before a setting existed runs as it did then: without the rail
# (no self-check, no confidence threshold), or with the default the rail had.
DEFINITION_DEFAULTS: dict[str, Any] = {
    "max_tokens": None,
    "max_seconds": None,
    "max_spend": None,
    "on_budget_breach": "halt",
    "loop_repeat_limit": 3,
    "stall_limit": 8,
    "on_loop": "halt",
    "self_check": False,
    "confidence_threshold": 0.0,
    "confidence_gate": False,
    "model_max_attempts": 3,
}


def context_load(run_id: uuid.UUID, owner: str) -> Context:
    """Read the run's record for a slice; stop if this worker does not hold the run."""
    return context_for(Run.objects.select_related("task_version").get(pk=run_id), owner)


def context_for(run: Run, owner: str) -> Context:
    """The slice's record of ``run``, read just now with its pinned version: its steps."""
    if run.status != RunStatus.RUNNING or run.lease_owner != owner:
        raise LeaseLost(f"run {run.pk} is {run.status}, leased to {run.lease_owner or 'nobody'}")
    steps = list(Step.objects.filter(run=run).select_related("tool").order_by("number"))
    return Context(run=run, owner=owner, definition=run.task_version.definition, steps=steps)


# How deep a call's result stands in its event's payload: payload, "result", "value".
OUTCOME_DEPTH = 3


# Step.gate and Approval.gate hold 300 characters (PostgreSQL refuses more).
GATE_CHARS = 300


def normalised(notes: list[str]) -> dict[str, Any]:
    """``{"normalised": notes}`` for a payload or a result, or nothing if none."""
    return {"normalised": list(notes)} if notes else {}


def with_notes(text: str, notes: list[str]) -> str:
    """``text`` with what was changed to store it, so a text field says so too."""
    return f"{text} [normalised: {'; '.join(notes)}]" if notes else text


def text_noted(text: str, *, where: str) -> str:
    """``text`` as both databases store it, ending with a note of any change."""
    stored, notes = text_storable(text, where=where)
    return with_notes(stored, notes)


def clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "…" if it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
