"""Model turns: the transcript as the model reads it, the call within budget (retries,
Retry-After), the first call of the answer started in the same commit, the self-check."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from agentops import states, telemetry
from agentops.runtime.budgets import (
    BudgetBreach,
    budget_check,
    budget_note,
    cost,
    json_chars,
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
from agentops.runtime.engine.doors import (
    call_arguments,
    call_doors,
    granted_tools,
    oversized_refusal,
    tool_spec,
)
from agentops.runtime.engine.fire import backoff, call_fire
from agentops.runtime.engine.leases import lease_fence
from agentops.runtime.engine.ledger import retry_note, step_add, step_entry, steps_add, steps_commit
from agentops.runtime.engine.rails import budget_gate
from agentops.runtime.engine.stops import outcome_review, run_end, run_succeed
from agentops.runtime.models import ModelError, ModelTurn
from agentops.runtime.models.base import turn_storable
from lineage.services import event_append
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
    # The first turn drafts the plan before anything else happens: it must call a tool
    # (plan_update, which it is asked for), so a plain answer to it is never the run's.
    first = not any(s.kind == StepKind.MODEL for s in ctx.steps)
    messages, messages_chars = transcript_sized(ctx)
    answer = model_call_forced(
        ctx,
        messages,
        specs,
        tool_choice=PLAN_TOOL if first else None,
        complies=lambda turn: bool(turn.tool_calls),
        messages_chars=messages_chars,
    )
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    if first and not turn.tool_calls:
        return forced_turn_failed(ctx, turn, turn_cost, tool=PLAN_TOOL)
    calls = calls_normalise(ctx, turn)
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


def model_call_forced(
    ctx: Context,
    messages: list[dict],
    specs: list[dict],
    *,
    tool_choice: str | None,
    complies: Callable[[ModelTurn], bool],
    messages_chars: int | None = None,
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> tuple[ModelTurn, int, Decimal] | Outcome:
    """``model_call`` for a turn that names a tool the model must call (``tool_choice``;
    None: an ordinary turn, asked once). Some servers do not enforce ``tool_choice``: an
    answer that does not do what the turn asks (``complies``) is not acted on. It is
    recorded (``model.answer_refused``, its usage counted), and the model is told that
    it must call the tool and asked again, within budget, up to ``model_max_attempts``
    times in all. The last answer is returned whatever it is: the caller decides what a
    turn that never called the tool becomes.

    The answers refused are in the trail, not in the run's steps: a slice that resumes
    after a crash asks the turn again from its start (as after a transient error)."""
    attempts = int(ctx.setting("model_max_attempts")) if tool_choice else 1
    for asked in range(1, attempts + 1):
        answer = model_call(
            ctx,
            messages,
            specs,
            tool_choice=tool_choice,
            messages_chars=messages_chars,
            on_breach=on_breach,
        )
        if isinstance(answer, Outcome) or asked == attempts or complies(answer[0]):
            return answer
        turn, _, turn_cost = answer
        with ctx.transaction():
            forced_answer_refused(ctx, turn, turn_cost, tool=tool_choice, asked=asked)
        told = [
            *([{"role": "assistant", "content": turn.content}] if turn.content else []),
            {"role": "user", "content": forced_reminder(tool_choice)},
        ]
        messages = [*messages, *told]
        if messages_chars is not None:
            messages_chars += sum(json_chars(message) for message in told)
    raise AssertionError("unreachable: the loop returns on its last attempt")


def forced_reminder(tool: str) -> str:
    return (
        f"Your answer did not call {tool}, which this turn requires, so it was not taken. "
        f"Call {tool} now."
    )


def attempts_said(count: int) -> str:
    return f"{count} attempt{'s' if count != 1 else ''}"


def forced_answer_refused(
    ctx: Context, turn: ModelTurn, turn_cost: Decimal, *, tool: str, asked: int
) -> None:
    """Inside a fenced transaction: an answer that did not call ``tool`` as its turn
    required is recorded, and what it cost is counted; nothing acts on it."""
    added = usage_added(turn, turn_cost)
    added.pop("steps_used")  # it made no step
    lease_fence(ctx, add=added)
    event_append(
        run_uuid=ctx.run.pk,
        kind="model.answer_refused",
        actor="engine",
        payload={
            "required": tool,
            "asked": asked,
            "content": turn.content,
            "tool_calls": [call.name for call in turn.tool_calls],
            "model": turn.model,
            "tokens_in": turn.tokens_in,
            "tokens_out": turn.tokens_out,
            "cost": str(turn_cost),
            **normalised(turn.normalised),
        },
    )


def forced_turn_failed(ctx: Context, turn: ModelTurn, turn_cost: Decimal, *, tool: str) -> Outcome:
    """The model never called ``tool`` in all the attempts its turn had: the last answer
    is recorded as refused, and the run fails saying why, in one commit."""
    attempts = int(ctx.setting("model_max_attempts"))
    with ctx.transaction():
        forced_answer_refused(ctx, turn, turn_cost, tool=tool, asked=attempts)
        return run_end(
            ctx,
            to=RunStatus.FAILED,
            reason=f"the model did not call {tool}, which its first turn requires, in "
            f"{attempts_said(attempts)}: it answered without any tool "
            "call, which is not taken as a final answer before the work has begun",
        )


def model_call(
    ctx: Context,
    messages: list[dict],
    specs: list[dict],
    *,
    tool_choice: str | None,
    messages_chars: int | None = None,
    on_breach: Callable[[BudgetBreach], Outcome] | None = None,
) -> tuple[ModelTurn, int, Decimal] | Outcome:
    """Ask the model, within budget, retrying transient failures with backoff.

    The call's cost is projected before it is made: the prompt is estimated, the answer
    is capped with max_tokens, so a call that could cross the token or spend budget is
    not made. Returns (turn, milliseconds, cost), or the Outcome that stopped the run.
    ``messages_chars``: the messages' JSON lengths summed, where the caller keeps it."""
    price = slice_cached(("price", ctx.run.model_label), lambda: price_for(ctx.run.model_label))
    limits, usage = ctx.limits, ctx.usage()
    if price is None and limits.spend is not None:
        return run_end(
            ctx,
            to=RunStatus.FAILED,
            reason=f"the model {ctx.run.model_label!r} has no price, so spend cannot be kept",
        )
    price_in, price_out = price or (Decimal(0), Decimal(0))
    prompt = tokens_estimate(messages, specs, messages_chars=messages_chars)
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
    client = waits.model_client(ctx.run.model_label)
    attempts = int(ctx.setting("model_max_attempts"))
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            turn = telemetry.chat_traced(
                ctx.run,
                max_tokens=max_out,
                call=lambda: waits.model_complete(
                    client,
                    messages=messages,
                    tools=specs,
                    tool_choice=tool_choice,
                    max_tokens=max_out,
                    timeout=timeout,
                ),
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
    messages, messages_chars = transcript_sized(ctx)
    prompt = {"role": "user", "content": CHECK_PROMPT}
    messages, messages_chars = [*messages, prompt], messages_chars + json_chars(prompt)

    def unchecked(breach: BudgetBreach) -> Outcome:
        return outcome_review(
            ctx, final, None, f"the self-check could not run: {breach.reason}", {}
        )

    def reported(turn: ModelTurn) -> bool:
        return any(c.name == CHECK_TOOL for c in turn.tool_calls)

    answer = model_call_forced(
        ctx,
        messages,
        [builtin_spec(CHECK_TOOL)],
        tool_choice=CHECK_TOOL,
        complies=reported,
        messages_chars=messages_chars,
        on_breach=unchecked,
    )
    if isinstance(answer, Outcome):
        return answer
    turn, duration_ms, turn_cost = answer
    call = next((c for c in turn.tool_calls if c.name == CHECK_TOOL), None)
    if call is None:
        # Asked as often as a turn may be, it never reported: a person reviews the
        # answer unchecked (check_read's failed report, with the reason).
        attempts = int(ctx.setting("model_max_attempts"))
        problem = (
            f"the model did not report its self-check: it did not call {CHECK_TOOL} in "
            f"{attempts_said(attempts)}"
        )
        report = {**check_read(None)[0], "evidence": problem}
    elif call.oversized:
        problem = f"the self-check report was refused: {oversized_refusal(call.oversized)}"
        report = {**check_read(None)[0], "evidence": problem}
    else:
        report, problem = check_read(call_arguments(call.arguments)[0])
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


def calls_normalise(ctx: Context, turn: ModelTurn) -> list[dict]:
    """Give every call an id unique in the run: some servers send none, or repeat them.
    A call whose arguments were over the bound keeps the note of what was not kept."""
    used, number = call_ids_used(ctx), ctx.number
    calls, given = [], set()
    for position, call in enumerate(turn.tool_calls):
        call_id = call.id
        if not call_id or call_id in used or call_id in given:
            call_id = f"call_{number}_{position}"
        given.add(call_id)
        calls.append(call.as_dict() | {"id": call_id})
    return calls


def call_ids_used(ctx: Context) -> set[str]:
    """The ids of every call the run's model steps asked for, carried within the slice:
    a model step's calls never change, so each step is read once."""
    carried = ctx.carried.get("call_ids")
    if carried is None or carried[0] is not ctx.steps:
        carried = ctx.carried["call_ids"] = [ctx.steps, 0, set()]
    steps, through, used = carried
    for step in steps[through:]:
        used.update(call["id"] for call in step.tool_calls)
    carried[1] = len(steps)
    return used


# The transcript ------------------------------------------------------------------------
#
# What the model reads each turn: a system message (with the budget left, new each
# turn), the objective, then each step's messages in order. A step's messages can change
# only until it and the answers to its calls are finished (a terminal status never
# changes), so those of the finished steps at the front are made once and kept for the
# slice (``CarriedTranscript``), with their JSON lengths summed for the token estimate;
# each turn adds the new ones. A slice that starts, after a restart or not, makes them
# all from the record at once, and reads exactly the same (tests/runtime/
# test_turns_carried.py holds the two equal over long runs).


def transcript(ctx: Context) -> list[dict]:
    """The conversation as the model sees it, made from the run's record."""
    return transcript_sized(ctx)[0]


def transcript_sized(ctx: Context) -> tuple[list[dict], int]:
    """The transcript, and its messages' JSON lengths summed (``json_chars``): the
    token estimate reads that instead of encoding the whole transcript again. The
    messages are shared with what the slice carries: read them, never change them."""
    carried = transcript_carried(ctx)
    system = {"role": "system", "content": carried.system + budget_note(ctx.limits, ctx.usage())}
    tail = [
        message
        for step in ctx.steps[carried.through :]
        for message in step_messages(step, carried.answers)
    ]
    messages = [system, carried.objective, *carried.messages, *tail]
    chars = json_chars(system) + carried.chars + sum(json_chars(message) for message in tail)
    return messages, chars


@dataclass
class CarriedTranscript:
    """For one slice: the messages of ``steps[:through]``, all finished, and their JSON
    lengths summed (with the objective's); the answers to calls by call id among
    ``steps[:seen]`` (the last one wins, as a rebuild's dict has it); and the ids of the
    calls whose answers are in ``messages`` already."""

    steps: list[Step]
    system: str  # the system message, less the budget note that ends it
    objective: dict
    chars: int
    messages: list[dict] = field(default_factory=list)
    through: int = 0
    answers: dict[str, Step] = field(default_factory=dict)
    seen: int = 0
    answered: set[str] = field(default_factory=set)


def transcript_carried(ctx: Context) -> CarriedTranscript:
    """The slice's carried transcript, brought up to ``ctx.steps``."""
    carried = ctx.carried.get("transcript")
    if carried is None or carried.steps is not ctx.steps:
        carried = ctx.carried["transcript"] = transcript_started(ctx)
    steps = ctx.steps
    for step in steps[carried.seen :]:
        if step.kind not in ANSWER_KINDS:
            continue
        if step.tool_call_id in carried.answered:
            # A second answer to a call already in the messages (no run records one):
            # the rebuild's dict would take it, so make everything again.
            carried = ctx.carried["transcript"] = transcript_started(ctx)
            return transcript_carried(ctx)
        carried.answers[step.tool_call_id] = step
    carried.seen = len(steps)
    while carried.through < len(steps):
        step = steps[carried.through]
        if not step_finished(step, carried.answers):
            break
        for message in step_messages(step, carried.answers):
            carried.messages.append(message)
            carried.chars += json_chars(message)
        carried.answered.update(call["id"] for call in step.tool_calls)
        carried.through += 1
    return carried


def transcript_started(ctx: Context) -> CarriedTranscript:
    run, definition = ctx.run, ctx.definition
    system = SYSTEM_PREAMBLE + "\n\n" + PLANNING_NOTE
    if definition["instructions"]:
        system += "\n\nInstructions:\n" + definition["instructions"]
    user = f"Objective: {run.objective}"
    if run.input:
        user += "\n\nInput:\n" + json.dumps(run.input, indent=2, sort_keys=True)
    objective = {"role": "user", "content": user}
    return CarriedTranscript(
        steps=ctx.steps, system=system + "\n\n", objective=objective, chars=json_chars(objective)
    )


# The steps that answer a model step's calls.
ANSWER_KINDS = (StepKind.TOOL, StepKind.PLAN)


def step_finished(step: Step, answers: dict[str, Step]) -> bool:
    """Whether ``step``'s messages are final: it is finished, and so is an answer to
    each of its calls (a call unanswered yet would gain its answer later)."""
    if not states.STEP.terminal(step.status):
        return False
    for call in step.tool_calls:
        answer = answers.get(call["id"])
        if answer is None or not states.STEP.terminal(answer.status):
            return False
    return True


def step_messages(step: Step, answers: dict[str, Step]) -> list[dict]:
    """What ``step`` says in the conversation: a person's feedback; the model's turn
    and the answers to its calls (those answered); nothing for the other kinds."""
    if step.kind == StepKind.HUMAN:
        return [
            {
                "role": "user",
                "content": "A person reviewed your outcome and did not accept it: "
                f"{step.content}\nKeep working on the objective.",
            }
        ]
    if step.kind != StepKind.MODEL:
        return []
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
    messages = [message]
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
