"""The loop: ``advance`` works one slice of a run; ``step_next`` does the one next thing
the run's record calls for."""

from __future__ import annotations

import logging
import time
import uuid

from django.conf import settings

from agentops import states, telemetry
from agentops.runtime.engine import waits
from agentops.runtime.engine.calls import (
    call_after_gate,
    call_after_unknown,
    call_propose,
    call_recover,
)
from agentops.runtime.engine.context import (
    Context,
    LeaseLost,
    Outcome,
    WorkClock,
    _clock,
    _slice_cache,
    context_for,
    worker_name,
)
from agentops.runtime.engine.leases import LeaseHeartbeat, lease_claim_reconnecting, lease_fence
from agentops.runtime.engine.rails import loop_stop, loops_check
from agentops.runtime.engine.stops import outcome_review, run_fail_on_error, run_succeed, run_yield
from agentops.runtime.engine.turns import check_turn, model_turn
from tasks.models import (
    RunStatus,
    Step,
    StepKind,
    StepStatus,
)

logger = logging.getLogger("agentops.engine")


def advance(
    run_id: uuid.UUID, *, owner: str | None = None, max_seconds: float | None = None
) -> Outcome:
    """Work on the run until it waits, ends, or the slice is spent."""
    owner = owner or worker_name()
    run = lease_claim_reconnecting(run_id, owner)
    if run is None:
        return Outcome.NOT_CLAIMED
    if run.status != RunStatus.RUNNING:  # halted as it was claimed: its worker kept stopping
        return Outcome.FINISHED
    slice_ends = time.monotonic() + (max_seconds or settings.AGENTOPS_SLICE_SECONDS)
    clock = _clock.set(WorkClock())
    cache = _slice_cache.set({})
    working = waits.slice_run.set((run_id, owner))
    # The lease is renewed while the slice works: inline by a thread of its own, on the
    # async worker with all the leases it holds, in one statement a beat.
    runner = waits.current_runner()
    if runner is None:
        heartbeat = LeaseHeartbeat(run_id, owner).start()
    else:
        runner.lease_hold(run_id, owner)
    try:
        ctx = context_for(run, owner)
        with telemetry.run_slice(ctx):  # the slice's span, in the run's trace
            while True:
                outcome = step_next(ctx)
                if outcome is not Outcome.CONTINUE:
                    return outcome
                # A stopping async worker hands its runs back to the queue at their next step.
                if time.monotonic() >= slice_ends or (runner and runner.stopping.is_set()):
                    return run_yield(ctx)
    except (LeaseLost, states.InvalidTransition) as stop:
        logger.info("run %s: worker %s stops: %s", run_id, owner, stop)
        return Outcome.STOPPED
    except Exception as error:
        logger.exception("run %s: the engine failed", run_id)
        return run_fail_on_error(run_id, owner, error)
    finally:
        if runner is None:
            heartbeat.stop()
        else:
            runner.lease_release(owner)
        waits.slice_run.reset(working)
        _slice_cache.reset(cache)
        _clock.reset(clock)


def step_next(ctx: Context) -> Outcome:
    """Do the one next thing the run's record calls for."""
    if ctx.stale:
        ctx.reload()
    steps = ctx.steps
    last_model = next((s for s in reversed(steps) if s.kind == StepKind.MODEL), None)
    if last_model is not None:
        answers = {
            s.tool_call_id: s
            for s in steps
            if s.kind in (StepKind.TOOL, StepKind.PLAN) and s.number > last_model.number
        }
        for call in last_model.tool_calls:
            step = answers.get(call["id"])
            if step is None:
                return call_propose(ctx, last_model, call)
            if step.status == StepStatus.PROPOSED:
                return call_after_gate(ctx, step)
            if step.status == StepStatus.STARTED:
                return call_recover(ctx, step)
            if step.status == StepStatus.UNKNOWN:
                return call_after_unknown(ctx, step)
        if not last_model.tool_calls:
            later = [s for s in steps if s.number > last_model.number]
            if not any(s.kind == StepKind.HUMAN for s in later):
                return run_finish(ctx, last_model, later)
    finding = loops_check(ctx)
    if finding is not None:
        return loop_stop(ctx, finding)
    return model_turn(ctx)


def run_finish(ctx: Context, final: Step, later: list[Step]) -> Outcome:
    """The model gave its final answer: check it if the task asks, then finish or ask a
    person to review it."""
    if not ctx.setting("self_check"):
        with ctx.transaction():
            lease_fence(ctx)
            run_succeed(ctx, final.content)
        return Outcome.FINISHED
    check = next((s for s in later if s.kind == StepKind.CHECK), None)
    if check is None:
        return check_turn(ctx, final)
    report = check.result or {}
    threshold = float(ctx.setting("confidence_threshold"))
    if report.get("objective_met") and report.get("confidence", 0) >= threshold:
        with ctx.transaction():
            lease_fence(ctx)
            run_succeed(ctx, final.content, confidence=report["confidence"])
        return Outcome.FINISHED
    why = (
        "the agent says the objective is not met"
        if not report.get("objective_met")
        else f"the agent's confidence {report.get('confidence', 0):.2f} is below {threshold:.2f}"
    )
    return outcome_review(ctx, final, check, why, report)
