"""Model turns: the transcript as the model reads it, the call within budget (retries,
Retry-After), the first call of the answer started in the same commit, the self-check."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from agentops.runtime.budgets import (
    BudgetBreach,
    budget_check,
    budget_note,
    cost,
    tokens_estimate,
)
from agentops.runtime.builtins import (
    ASK_TOOL,
    CHECK_PROMPT,
    CHECK_TOOL,
    PLAN_TOOL,
    PLANNING_NOTE,
    builtin_spec,
    check_read,
)
from agentops.runtime.engine import waits
from agentops.runtime.engine.calls import call_start
from agentops.runtime.engine.context import Context, Outcome, normalised, slice_cached, step_derived
from agentops.runtime.engine.doors import call_arguments, call_doors, granted_tools, tool_spec
from agentops.runtime.engine.fire import backoff, call_fire
from agentops.runtime.engine.leases import lease_fence
from agentops.runtime.engine.ledger import retry_note, step_add, step_entry, steps_add, steps_commit
from agentops.runtime.engine.rails import budget_gate
from agentops.runtime.engine.stops import outcome_review, run_end, run_succeed
from agentops.runtime.models import ModelError, ModelTurn, client_for
from agentops.runtime.models.base import turn_storable
from tasks.models import (
    RunStatus,
    Step,
    StepKind,
    StepStatus,
)
from tasks.services import (
    price_for,
)

SYSTEM_PREAMBLE = (
    "You are an agent run by agentops. Work towards the objective with the tools you are "
    "given. Call tools when you need information or to act; a person may have to approve "
    "some calls, and may reject one with a reason: then re-plan. With every call, give "
    "_confidence: how sure you are, from 0 to 1, that it is the right next step with the "
    "right arguments. When the work is done, reply with your final answer and no tool calls."
)


def model_turn(ctx: Context) -> Outcome:
    # The tools as the model sees them do not change within a slice: made once.
    specs = slice_cached(
        ("specs", tuple(ctx.definition["tools"])),
        lambda: [
            builtin_spec(PLAN_TOOL),
            builtin_spec(ASK_TOOL),
            *(tool_spec(t) for t in granted_tools(ctx.definition).values()),
        ],
    )
    # The first turn drafts the plan before anything else happens.
    first = not any(s.kind == StepKind.MODEL for s in ctx.steps)
    answer = model_call(ctx, transcript(ctx), specs, tool_choice=PLAN_TOOL if first else None)
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    calls = calls_normalise(turn, ctx.steps, ctx.number)
    # The common case, a first call that runs at once, is started in this same commit:
    # the ledger entry still precedes the call, with one commit fewer per agent step.
    doors = None
    if (
        calls
        and calls[0]["name"] != PLAN_TOOL
        and not budget_check(ctx.limits, ctx.usage(), steps=2)
    ):
        doors = call_doors(ctx, calls[0])
        if not doors.runs_now:
            doors = None
    # A final answer that needs no check ends the run in the same commit.
    final = not calls and not ctx.setting("self_check")
    added = usage_added(turn, turn_cost)
    if doors is not None:
        added["steps_used"] = 2
    model_step = step_entry(
        event="model.responded",
        payload={
            "content": turn.content,
            "tool_calls": calls,
            "model": turn.model,
            "tokens_in": turn.tokens_in,
            "tokens_out": turn.tokens_out,
            "cost": str(turn_cost),
            **normalised(turn.normalised),
        },
        kind=StepKind.MODEL,
        status=StepStatus.SUCCEEDED,
        content=turn.content,
        tool_calls=calls,
        result=normalised(turn.normalised) or None,
        tokens_in=turn.tokens_in,
        tokens_out=turn.tokens_out,
        duration_ms=duration_ms,
        finished_at=timezone.now(),
    )
    entries = [model_step]
    if doors is not None:
        entries.append(call_start(ctx, calls[0], doors, ctx.number + 1))
    if final:
        with ctx.transaction():
            lease_fence(ctx, add=added)
            steps_add(ctx, *entries)
            run_succeed(ctx, turn.content)
        return Outcome.FINISHED
    steps = steps_commit(ctx, added, entries)
    if doors is not None:
        return call_fire(ctx, steps[1], doors.tool)
    return Outcome.CONTINUE


def usage_added(turn: ModelTurn, turn_cost: Decimal) -> dict[str, Any]:
    return {
        "steps_used": 1,
        "tokens_in": turn.tokens_in,
        "tokens_out": turn.tokens_out,
        "spend": turn_cost,
    }


def model_call(
    ctx: Context,
    messages: list[dict],
    specs: list[dict],
    *,
    tool_choice: str | None,
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> tuple[ModelTurn, int, Decimal] | Outcome:
    """Ask the model, within budget, retrying transient failures with backoff.

    The call's cost is projected before it is made: the prompt is estimated, the answer
    is capped with max_tokens, so a call that could cross the token or spend budget is
    not made. Returns (turn, milliseconds, cost), or the Outcome that stopped the run."""
    price = slice_cached(("price", ctx.run.model_label), lambda: price_for(ctx.run.model_label))
    limits, usage = ctx.limits, ctx.usage()
    if price is None and limits.spend is not None:
        return run_end(
            ctx,
            to=RunStatus.FAILED,
            reason=f"the model {ctx.run.model_label!r} has no price, so spend cannot be kept",
        )
    price_in, price_out = price or (Decimal(0), Decimal(0))
    prompt = tokens_estimate(messages, specs)
    max_out = settings.AGENTOPS_MAX_OUTPUT_TOKENS
    if limits.tokens is not None:
        max_out = min(max_out, max(0, limits.tokens - usage.tokens - prompt))
        if max_out < MIN_ANSWER_TOKENS:
            # Not even a short answer fits: this always breaches the token budget.
            max_out = MIN_ANSWER_TOKENS
    projected = cost(tokens_in=prompt, tokens_out=max_out, price_in=price_in, price_out=price_out)
    stopped = budget_gate(ctx, tokens=prompt + max_out, spend=projected, on_breach=on_breach)
    if stopped:
        return stopped
    timeout = settings.AGENTOPS_MODEL_TIMEOUT
    if limits.seconds is not None:
        timeout = max(1.0, min(timeout, limits.seconds - usage.seconds))
    client = client_for(ctx.run.model_label)
    attempts = int(ctx.setting("model_max_attempts"))
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            turn = waits.model_complete(
                client,
                messages=messages,
                tools=specs,
                tool_choice=tool_choice,
                max_tokens=max_out,
                timeout=timeout,
            )
        except ModelError as error:
            if not error.transient or attempt == attempts:
                tried = f" (tried {attempt} times)" if attempt > 1 else ""
                return run_end(
                    ctx, to=RunStatus.FAILED, reason=f"the model call failed{tried}: {error}"
                )
            # The server's Retry-After where it gave one, within the run's time budget.
            default = backoff(settings.AGENTOPS_MODEL_BACKOFF_SECONDS, attempt)
            delay = error.retry_wait(default, limits, ctx.usage())
            retry_note(ctx, "model.retrying", attempt=attempt, error=str(error), delay=delay)
            waits.pause(delay)
            continue
        duration_ms = int((time.monotonic() - started) * 1000)
        # Everything after reads the turn as stored, so a resumed run acts on the same.
        turn = turn_storable(turn)
        turn_cost = cost(
            tokens_in=turn.tokens_in,
            tokens_out=turn.tokens_out,
            price_in=price_in,
            price_out=price_out,
        )
        return turn, duration_ms, turn_cost
    raise AssertionError("unreachable: the loop returns on its last attempt")


MIN_ANSWER_TOKENS = 64


def check_turn(ctx: Context, final: Step) -> Outcome:
    """Ask the model to check its final answer against the objective. If the budget
    leaves no room for the check, the answer exists: a person reviews it unchecked."""
    messages = [*transcript(ctx), {"role": "user", "content": CHECK_PROMPT}]

    def unchecked(breach: BudgetBreach) -> Outcome:
        return outcome_review(
            ctx, final, None, f"the self-check could not run: {breach.reason}", {}
        )

    answer = model_call(
        ctx, messages, [builtin_spec(CHECK_TOOL)], tool_choice=CHECK_TOOL, on_breach=unchecked
    )
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    call = next((c for c in turn.tool_calls if c.name == CHECK_TOOL), None)
    arguments = call_arguments(call.arguments)[0] if call else None
    report, problem = check_read(arguments)
    with ctx.transaction():
        lease_fence(ctx, add=usage_added(turn, turn_cost), confidence=report["confidence"])
        step_add(
            ctx,
            event="check.reported",
            payload={
                **report,
                "problem": problem,
                "tokens_in": turn.tokens_in,
                "tokens_out": turn.tokens_out,
                **normalised(turn.normalised),
            },
            kind=StepKind.CHECK,
            status=StepStatus.SUCCEEDED,
            content=report["evidence"],
            result=report,
            error=problem,
            tokens_in=turn.tokens_in,
            tokens_out=turn.tokens_out,
            duration_ms=duration_ms,
            finished_at=timezone.now(),
        )
    return Outcome.CONTINUE


def calls_normalise(turn: ModelTurn, steps: list[Step], number: int) -> list[dict]:
    """Give every call an id unique in the run: some servers send none, or repeat them."""
    seen = {call["id"] for step in steps for call in step.tool_calls}
    calls = []
    for position, call in enumerate(turn.tool_calls):
        call_id = call.id
        if not call_id or call_id in seen:
            call_id = f"call_{number}_{position}"
        seen.add(call_id)
        calls.append({"id": call_id, "name": call.name, "arguments": call.arguments})
    return calls


def transcript(ctx: Context) -> list[dict]:
    """The conversation as the model sees it, rebuilt from the run's record."""
    run, definition, steps = ctx.run, ctx.definition, ctx.steps
    system = SYSTEM_PREAMBLE + "\n\n" + PLANNING_NOTE
    if definition["instructions"]:
        system += "\n\nInstructions:\n" + definition["instructions"]
    system += "\n\n" + budget_note(ctx.limits, ctx.usage())
    user = f"Objective: {run.objective}"
    if run.input:
        user += "\n\nInput:\n" + json.dumps(run.input, indent=2, sort_keys=True)
    messages: list[dict] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    answers = {s.tool_call_id: s for s in steps if s.kind in (StepKind.TOOL, StepKind.PLAN)}
    for step in steps:
        if step.kind == StepKind.HUMAN:
            messages.append(
                {
                    "role": "user",
                    "content": "A person reviewed your outcome and did not accept it: "
                    f"{step.content}\nKeep working on the objective.",
                }
            )
        if step.kind != StepKind.MODEL:
            continue
        message: dict[str, Any] = {"role": "assistant", "content": step.content or None}
        if step.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in step.tool_calls
            ]
        messages.append(message)
        for call in step.tool_calls:
            answer = answers.get(call["id"])
            if answer is not None:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": tool_message(answer)}
                )
    return messages


def tool_message(step: Step) -> str:
    """The call's outcome as the model reads it. Keys sorted: PostgreSQL's jsonb keeps
    them in an order of its own, and the transcript rebuilt from the record after a
    restart must read exactly as the one the slice kept in memory."""
    return step_derived(step, "tool_message", lambda: tool_message_made(step))


def tool_message_made(step: Step) -> str:
    if step.status in (StepStatus.SUCCEEDED, StepStatus.SIMULATED):
        return json.dumps(step.result, default=str, sort_keys=True)
    return json.dumps({"error": step.error or f"the call ended {step.status}"})
