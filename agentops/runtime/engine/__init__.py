"""The durable step loop, one module a concern (docs/runtime.md has the map).

``advance(run_id)`` claims the run's lease, works a bounded slice, and leaves the run
queued, waiting, or finished. It keeps no state of its own between slices: each slice
reads the run's record once (again when a commit may have met another writer's,
``Context.stale``) and keeps it in step with what it commits (``Context``), so a run
resumes from its record after any stop.

- ``loop``: ``advance`` and ``step_next``, the one next thing a run's record calls for;
- ``context``: the slice's view of the run (``Context``), its clock and cache;
- ``leases``: claiming a run, the fence every commit passes, heartbeats, recovery;
- ``ledger``: new steps and their events, committed under the fence;
- ``turns``: model turns: the transcript, the call, the self-check;
- ``doors``: the four doors a requested call passes (granted, valid, rules, gate);
- ``calls``: what a call becomes: refused, simulated, held for a person, started;
- ``fire``: making a started call and recording its outcome (the ledger's other half);
- ``rails``: the budget and loop checks before every call;
- ``stops``: how a slice stops: back to the queue, waiting for a person, ended;
- ``waits``: the slow I/O (model, tool, sleep): inline, or on the async worker's loop;
- ``runner``: the async worker, where hundreds of runs wait at once holding nothing.

The guarantees (docs/guarantees.md):
- every change to a run commits in one transaction with its lineage events;
- a tool step is committed ``started``, with its idempotency key, before the call fires;
  on resume an idempotent tool is called again with the same key, any other becomes
  ``unknown`` and the run waits for a person: nothing re-fires blindly;
- a recorded model turn is reused, never asked again;
- every commit is fenced by the lease: a worker that lost the run writes nothing, except
  the outcome of a call it already made and the notes of that call's retries;
- budgets are checked before every model and tool call, with the call's projected cost.
"""

from agentops.runtime.engine.context import Context, LeaseLost, Outcome, context_load
from agentops.runtime.engine.doors import tool_spec
from agentops.runtime.engine.leases import (
    ClaimFailed,
    LeaseHeartbeat,
    fence,
    lease_claim,
    lease_claim_run,
    lease_fence,
)
from agentops.runtime.engine.ledger import step_entry, steps_add, steps_commit
from agentops.runtime.engine.loop import advance, step_next

__all__ = [
    "ClaimFailed",
    "Context",
    "LeaseHeartbeat",
    "LeaseLost",
    "Outcome",
    "advance",
    "context_load",
    "fence",
    "lease_claim",
    "lease_claim_run",
    "lease_fence",
    "step_entry",
    "step_next",
    "steps_add",
    "steps_commit",
    "tool_spec",
]
