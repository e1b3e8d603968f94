"""The rails checked before every call: budgets (with the call's projected cost) and
loops (the same call repeated, no progress, plan churn)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from agentops import states
from agentops.runtime.budgets import (
    BudgetBreach,
    budget_check,
    extension_for,
)
from agentops.runtime.engine.context import Context, Outcome
from agentops.runtime.engine.leases import lease_fence
from agentops.runtime.engine.stops import run_end, run_wait
from agentops.runtime.loops import LoopFinding, LoopWatch, ToolCallRecord
from approvals.models import ApprovalKind
from approvals.services import approval_request
from tasks.models import (
    RunStatus,
    Step,
    StepKind,
    StepStatus,
)


def budget_gate(
    ctx: Context,
    *,
    tokens: int = 0,
    spend: Decimal = Decimal(0),
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> Outcome | None:
    """Before a call: stop the run here if the call could cross a budget (halt, or ask
    a person for more), or hand the breach to ``on_breach``."""
    breach = budget_check(ctx.limits, ctx.usage(), tokens=tokens, spend=spend)
    if breach is None:
        return None
    if on_breach is not None:
        return on_breach(breach)
    payload = {"budget": breach.budget, "limit": breach.limit, "used": breach.used}
    if ctx.setting("on_budget_breach") != "ask":
        return run_end(ctx, to=RunStatus.HALTED, reason=breach.reason, payload=payload)
    extension = extension_for(breach, ctx.limits)
    with ctx.transaction():
        lease_fence(ctx)
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.BUDGET_EXTENSION,
            gate=breach.reason,
            context={**payload, "extension": extension},
        )
        run_wait(ctx.run, f"more budget ({breach.reason})")
    return Outcome.WAITING


OK_STATUSES = (StepStatus.SUCCEEDED, StepStatus.SIMULATED)
# The calls the loop check reads: tool calls, and plans (plan churn is a stall).
WATCHED_KINDS = (StepKind.TOOL, StepKind.PLAN)


def loops_check(ctx: Context) -> LoopFinding | None:
    """The first loop or stall among the run's finished calls after the last one a
    person accepted (``loop_find`` over them, in step order).

    Carried forward within the slice: the steps up to the first call still unfinished
    (proposed, started, unknown: it may finish later, and count where it stands) are
    added to a ``LoopWatch`` once each, and only what follows is read again each turn."""
    carried = loops_carried(ctx)
    steps = ctx.steps
    while carried.finding is None and carried.through < len(steps):
        step = steps[carried.through]
        if loop_watched(ctx, step):
            if not states.STEP.terminal(step.status):
                break
            carried.finding = carried.watch.add(loop_record(step))
        carried.through += 1
    if carried.finding is not None or carried.through == len(steps):
        return carried.finding
    # Past an unfinished call: read what follows, on a copy of what was carried.
    watch = carried.watch.copy()
    for step in steps[carried.through :]:
        if loop_watched(ctx, step) and states.STEP.terminal(step.status):
            finding = watch.add(loop_record(step))
            if finding is not None:
                return finding
    return None


@dataclass
class LoopsCarried:
    """The loop check's state for a slice: ``watch`` has seen every watched step of
    ``steps[:through]``, which are all finished; ``finding``, if it found one."""

    steps: list[Step]
    key: tuple[int, int, int]
    watch: LoopWatch
    through: int = 0
    finding: LoopFinding | None = None


def loops_carried(ctx: Context) -> LoopsCarried:
    repeat_limit = int(ctx.setting("loop_repeat_limit"))
    stall_limit = int(ctx.setting("stall_limit"))
    key = (ctx.run.loops_accepted_through, repeat_limit, stall_limit)
    carried = ctx.carried.get("loops")
    if carried is None or carried.steps is not ctx.steps or carried.key != key:
        watch = LoopWatch(repeat_limit=repeat_limit, stall_limit=stall_limit)
        carried = ctx.carried["loops"] = LoopsCarried(ctx.steps, key, watch)
    return carried


def loop_watched(ctx: Context, step: Step) -> bool:
    return step.kind in WATCHED_KINDS and step.number > ctx.run.loops_accepted_through


def loop_record(step: Step) -> ToolCallRecord:
    """A finished call as the loop check compares it: tool, arguments and outcome."""
    # Every terminal status but these two is a failure or a refusal, with its error.
    outcome = step.result if step.status in OK_STATUSES else {"error": step.error}
    return ToolCallRecord(
        number=step.number, tool=step.tool_name, arguments=step.arguments, outcome=outcome
    )


def loop_stop(ctx: Context, finding: LoopFinding) -> Outcome:
    payload = {"finding": finding.kind, "through_step": finding.through_step}
    if ctx.setting("on_loop") != "ask":
        return run_end(ctx, to=RunStatus.HALTED, reason=finding.reason, payload=payload)
    with ctx.transaction():
        lease_fence(ctx)
        approval_request(
            run=ctx.run, kind=ApprovalKind.LOOP_REVIEW, gate=finding.reason, context=payload
        )
        run_wait(ctx.run, f"decide whether the run goes on ({finding.kind})")
    return Outcome.WAITING
