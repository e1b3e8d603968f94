"""The rails checked before every call: budgets (with the call's projected cost) and
loops (the same call repeated, no progress, plan churn)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from agentops.runtime.budgets import (
    BudgetBreach,
    budget_check,
    extension_for,
)
from agentops.runtime.engine.context import Context, Outcome, step_derived
from agentops.runtime.engine.leases import lease_fence
from agentops.runtime.engine.stops import run_end, run_wait
from agentops.runtime.loops import LoopFinding, ToolCallRecord, loop_find
from approvals.models import ApprovalKind
from approvals.services import approval_request
from tasks.models import (
    RunStatus,
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


def loops_check(ctx: Context) -> LoopFinding | None:
    calls = (
        step_derived(
            s,
            "loop_record",
            lambda s=s: ToolCallRecord(
                number=s.number,
                tool=s.tool_name,
                arguments=s.arguments,
                outcome=s.result if s.status in OK_STATUSES else {"error": s.error},
            ),
        )
        for s in ctx.steps
        if s.kind in (StepKind.TOOL, StepKind.PLAN)  # plans too: plan churn is a stall
        and s.number > ctx.run.loops_accepted_through
        and s.status in (*OK_STATUSES, StepStatus.FAILED, StepStatus.REFUSED)
    )
    return loop_find(
        calls,
        repeat_limit=int(ctx.setting("loop_repeat_limit")),
        stall_limit=int(ctx.setting("stall_limit")),
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
