"""New steps and their lineage events, committed under the fence (on PostgreSQL the
common case in one statement, ``agentops.runtime.commits``), and the notes of retries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentops.runtime import commits
from agentops.runtime.engine.context import Context, clock_added, normalised
from agentops.runtime.engine.leases import lease_deadline, lease_fence
from agentops.strict_json import json_storable
from lineage.services import event_append
from tasks.models import (
    Run,
    Step,
)
from tasks.services import (
    step_transition,
    steps_built,
    steps_create,
)


def retry_note(ctx: Context, kind: str, *, fenced: bool = True, **payload: Any) -> None:
    """Record a retry. Inside a tool call (``fenced=False``) the note is written even if
    the lease moved meanwhile: the call is in flight and its trail must be whole."""
    payload, notes = json_storable(payload)  # an error's text, as the far side wrote it
    payload.update(normalised(notes))
    with ctx.transaction():
        if fenced:
            lease_fence(ctx)
        event_append(run_uuid=ctx.run.pk, kind=kind, actor="engine", payload=payload)


def step_entry(*, event: str, payload: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """One new step for ``steps_add``: its fields, its event and the event's payload."""
    return {"event": event, "payload": payload, **fields}


def steps_add(ctx: Context, *entries: dict[str, Any]) -> list[Step]:
    """Inside a fenced transaction: new steps, numbered on from the run's last, with
    their events. The slice's record gains them when the transaction commits."""
    steps = steps_create(run=ctx.run, entries=entries_numbered(ctx, entries))
    ctx.on_commit(lambda: ctx.steps_committed(steps))
    return steps


def entries_numbered(ctx: Context, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """New steps' entries, numbered on from the run's last step."""
    return [{**entry, "number": ctx.number + offset} for offset, entry in enumerate(entries)]


def steps_commit(ctx: Context, add: dict[str, Any], entries: list[dict[str, Any]]) -> list[Step]:
    """One commit of its own: the fence, adding ``add`` to the run's counters, and new
    steps with their events. On PostgreSQL, one statement (agentops.runtime.commits);
    where that does not apply or its checks fail, having written nothing, a transaction."""
    added = clock_added(add)
    steps, events = steps_built(run=ctx.run, entries=entries_numbered(ctx, entries))
    if ctx.outside_transaction() and commits.steps_insert_commit(
        run=ctx.run,
        owner=ctx.owner,
        lease_expires_at=lease_deadline(),
        added=added,
        steps=steps,
        events=events,
    ):
        ctx.run_changed(added, {})
        ctx.steps_committed(steps)
        return steps
    with ctx.transaction():
        lease_fence(ctx, add=added)
        return steps_add(ctx, *entries)


def step_add(ctx: Context, **entry: Any) -> Step:
    return steps_add(ctx, step_entry(**entry))[0]


def budget_context(ctx: Context, added: dict[str, Any]) -> dict[str, Any]:
    """Budget used and limits, for a person deciding on the run: as this transaction
    leaves them, with ``added`` (what its fence adds, which reaches ``ctx.run`` only once
    it commits)."""
    limits, usage = ctx.limits, ctx.usage()
    used = {
        "steps": usage.steps + added.get("steps_used", 0),
        "tokens": usage.tokens + added.get("tokens_in", 0) + added.get("tokens_out", 0),
        "seconds": usage.seconds + added.get("seconds_used", 0.0),
        "spend": usage.spend + added.get("spend", 0),
    }
    return {
        "budgets": {
            budget: {"limit": str(limits.get(budget)), "used": str(used[budget])}
            for budget in used
            if limits.get(budget) is not None
        }
    }


def step_move(ctx: Context, step: Step, **transition: Any) -> None:
    """One fenced transaction that moves one step (``step_transition``'s arguments)."""
    with ctx.transaction():
        lease_fence(ctx)
        step_transition(step=step, **transition)


def idempotency_key(run: Run, number: int) -> str:
    return f"{run.pk}:{number}"
