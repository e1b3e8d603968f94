"""The durable step loop.

``advance(run_id)`` claims the run's lease, works a bounded slice, and leaves the run
queued, waiting, or finished. It keeps no state of its own between steps: everything it
needs is re-read from the run's steps, so a run resumes from its record after any stop.

The guarantees (docs/guarantees.md):
- every change to a run commits in one transaction with its lineage events;
- a tool step is committed ``started``, with its idempotency key, before the call fires;
  on resume an idempotent tool is called again with the same key, any other becomes
  ``unknown`` and the run halts for a person: nothing re-fires blindly;
- a recorded model turn is reused, never asked again;
- every commit is fenced by the lease: a worker that lost the run writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from enum import Enum
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from agentops import states
from agentops.runtime.budgets import budget_note, steps_check
from agentops.runtime.gates import Verdict, call_digest, gate_decide
from agentops.runtime.models import ModelError, ModelTurn, client_for
from agentops.runtime.tools import ToolContext, ToolResult, executor_for
from approvals.models import ApprovalStatus, Resolution
from approvals.services import approval_request_action, approval_request_unknown
from lineage.services import event_append, json_plain
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus, Tool
from tasks.services import run_transition, step_create, step_transition

logger = logging.getLogger("agentops.engine")

SYSTEM_PREAMBLE = (
    "You are an agent run by agentops. Work towards the objective with the tools you are "
    "given. Call tools when you need information or to act; a person may have to approve "
    "some calls, and may reject one with a reason: then re-plan. When the work is done, "
    "reply with your final answer and no tool calls."
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


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def advance(
    run_id: uuid.UUID, *, owner: str | None = None, max_seconds: float | None = None
) -> Outcome:
    """Work on the run until it waits, ends, or the slice is spent."""
    owner = owner or worker_name()
    if not lease_claim(run_id, owner):
        return Outcome.NOT_CLAIMED
    slice_ends = time.monotonic() + (max_seconds or settings.AGENTOPS_SLICE_SECONDS)
    try:
        while True:
            outcome = step_next(run_id, owner)
            if outcome is not Outcome.CONTINUE:
                return outcome
            if time.monotonic() >= slice_ends:
                return run_yield(run_id, owner)
    except (LeaseLost, states.InvalidTransition) as stop:
        logger.info("run %s: worker %s stops: %s", run_id, owner, stop)
        return Outcome.STOPPED
    except Exception as error:
        logger.exception("run %s: the engine failed", run_id)
        return run_fail_on_error(run_id, owner, error)


# Leases ------------------------------------------------------------------------------


def lease_deadline() -> Any:
    return timezone.now() + timedelta(seconds=settings.AGENTOPS_LEASE_SECONDS)


def lease_claim(run_id: uuid.UUID, owner: str) -> bool:
    """Take the run if it is runnable and nobody holds a live lease on it.

    The claim is a conditional UPDATE whose row count says who won: two workers racing
    for one run cannot both see 1."""
    with transaction.atomic():
        claimed = (
            Run.objects.filter(pk=run_id, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
            .filter(Q(lease_owner="") | Q(lease_expires_at__lt=timezone.now()))
            .update(lease_owner=owner, lease_expires_at=lease_deadline())
        )
        if claimed != 1:
            return False
        run = Run.objects.get(pk=run_id)
        if run.status == RunStatus.QUEUED:
            run_transition(run=run, to=RunStatus.RUNNING, actor="engine", payload={"worker": owner})
        else:
            event_append(
                run_uuid=run_id,
                kind="run.recovered",
                actor="engine",
                payload={"worker": owner, "reason": "the previous worker's lease expired"},
            )
    return True


def lease_fence(run_id: uuid.UUID, owner: str, **changes: Any) -> None:
    """Inside a step's transaction: renew the lease, apply counters, and prove this worker
    still owns a running run. Anything else rolls the step back."""
    updated = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING, lease_owner=owner).update(
        lease_expires_at=lease_deadline(), **changes
    )
    if updated != 1:
        raise LeaseLost(f"worker {owner} no longer owns run {run_id}")


def run_yield(run_id: uuid.UUID, owner: str) -> Outcome:
    from agentops.runtime import dispatch

    with transaction.atomic():
        lease_fence(run_id, owner)
        run = Run.objects.get(pk=run_id)
        run_transition(
            run=run,
            to=RunStatus.QUEUED,
            actor="engine",
            reason="",
            lease_owner="",
            lease_expires_at=None,
            payload={"why": "the slice ended; the run goes back to the queue"},
        )
        dispatch.enqueue(run_id)
    return Outcome.YIELDED


def run_end(run: Run, owner: str, *, to: str, reason: str = "", **fields: Any) -> Outcome:
    with transaction.atomic():
        lease_fence(run.pk, owner)
        run_transition(run=run, to=to, actor="engine", reason=reason, **fields)
    return Outcome.FINISHED


def run_fail_on_error(run_id: uuid.UUID, owner: str, error: Exception) -> Outcome:
    """A bug or an outage stopped the loop: fail the run with the error if we still own
    it. If even that cannot be written, the lease expires and the run is recovered."""
    try:
        run = Run.objects.get(pk=run_id)
        return run_end(
            run,
            owner,
            to=RunStatus.FAILED,
            reason=f"internal error: {type(error).__name__}: {error}",
        )
    except Exception:
        logger.exception("run %s: could not record the failure", run_id)
        return Outcome.STOPPED


# The loop ----------------------------------------------------------------------------


def step_next(run_id: uuid.UUID, owner: str) -> Outcome:
    """Do the one next thing the run's record calls for."""
    run = Run.objects.select_related("task_version").get(pk=run_id)
    if run.status != RunStatus.RUNNING or run.lease_owner != owner:
        raise LeaseLost(f"run {run_id} is {run.status}, leased to {run.lease_owner or 'nobody'}")
    definition = run.task_version.definition
    steps = list(Step.objects.filter(run=run).select_related("tool").order_by("number"))
    last_model = next((s for s in reversed(steps) if s.kind == StepKind.MODEL), None)
    if last_model is not None:
        answered = {
            s.tool_call_id: s
            for s in steps
            if s.kind == StepKind.TOOL and s.number > last_model.number
        }
        for call in last_model.tool_calls:
            step = answered.get(call["id"])
            if step is None:
                return call_propose(run, definition, steps, last_model, call, owner)
            if step.status == StepStatus.PROPOSED:
                return call_after_gate(run, step, owner)
            if step.status == StepStatus.STARTED:
                return call_recover(run, step, owner)
            if step.status == StepStatus.UNKNOWN:
                return call_after_unknown(run, step, owner)
        if not last_model.tool_calls:
            return run_end(
                run,
                owner,
                to=RunStatus.SUCCEEDED,
                outcome=last_model.content,
                payload={"outcome": last_model.content},
            )
    return model_turn(run, definition, steps, owner)


def next_number(steps: list[Step]) -> int:
    return (steps[-1].number + 1) if steps else 1


def granted_tools(definition: dict) -> dict[str, Tool]:
    return {tool.name: tool for tool in Tool.objects.filter(name__in=definition["tools"])}


def budget_halt(run: Run, definition: dict, owner: str) -> Outcome | None:
    breach = steps_check(steps_used=run.steps_used, max_steps=definition["max_steps"])
    if breach is None:
        return None
    return run_end(
        run, owner, to=RunStatus.HALTED, reason=breach.reason, payload={"budget": breach.budget}
    )


# Model turns -------------------------------------------------------------------------


def model_turn(run: Run, definition: dict, steps: list[Step], owner: str) -> Outcome:
    halted = budget_halt(run, definition, owner)
    if halted:
        return halted
    tools = granted_tools(definition)
    messages = transcript(run, definition, steps)
    client = client_for(run.model_label)
    started = time.monotonic()
    try:
        turn = client.complete(messages=messages, tools=[tool_spec(t) for t in tools.values()])
    except ModelError as error:
        # Retries with backoff belong to the retry policy (a later change); for now a
        # failed model call ends the run with the server's own words.
        return run_end(run, owner, to=RunStatus.FAILED, reason=f"the model call failed: {error}")
    duration_ms = int((time.monotonic() - started) * 1000)
    calls = calls_normalise(turn, steps, next_number(steps))
    number = next_number(steps)
    with transaction.atomic():
        lease_fence(
            run.pk,
            owner,
            steps_used=F("steps_used") + 1,
            tokens_in=F("tokens_in") + turn.tokens_in,
            tokens_out=F("tokens_out") + turn.tokens_out,
        )
        step_create(
            run=run,
            number=number,
            event="model.responded",
            payload={
                "content": turn.content,
                "tool_calls": calls,
                "model": turn.model,
                "tokens_in": turn.tokens_in,
                "tokens_out": turn.tokens_out,
            },
            kind=StepKind.MODEL,
            status=StepStatus.SUCCEEDED,
            content=turn.content,
            tool_calls=calls,
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


def tool_spec(tool: Tool) -> dict:
    schema = tool.input_schema or {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": schema},
    }


def transcript(run: Run, definition: dict, steps: list[Step]) -> list[dict]:
    """The conversation as the model sees it, rebuilt from the run's record."""
    system = SYSTEM_PREAMBLE
    if definition["instructions"]:
        system += "\n\nInstructions:\n" + definition["instructions"]
    system += "\n\n" + budget_note(steps_used=run.steps_used, max_steps=definition["max_steps"])
    user = f"Objective: {run.objective}"
    if run.input:
        user += "\n\nInput:\n" + json.dumps(run.input, indent=2, sort_keys=True)
    messages: list[dict] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    tool_steps = {s.tool_call_id: s for s in steps if s.kind == StepKind.TOOL}
    for step in steps:
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
            answer = tool_steps.get(call["id"])
            if answer is not None:
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": tool_message(answer)}
                )
    return messages


def tool_message(step: Step) -> str:
    if step.status in (StepStatus.SUCCEEDED, StepStatus.SIMULATED):
        return json.dumps(step.result, default=str)
    return json.dumps({"error": step.error or f"the call ended {step.status}"})


# Tool calls: the four doors, the ledger ----------------------------------------------


def call_arguments(raw: str) -> tuple[Any, str]:
    try:
        arguments = json.loads(raw or "{}")
    except json.JSONDecodeError as error:
        return raw, f"the arguments are not valid JSON ({error.msg} at position {error.pos})"
    if not isinstance(arguments, dict):
        return arguments, "the arguments must be a JSON object"
    return arguments, ""


def call_propose(
    run: Run, definition: dict, steps: list[Step], model_step: Step, call: dict, owner: str
) -> Outcome:
    """Put one requested call through the doors: granted, valid, (rules), gate."""
    halted = budget_halt(run, definition, owner)
    if halted:
        return halted
    number = next_number(steps)
    tools = granted_tools(definition)
    tool = tools.get(call["name"])
    arguments, refusal = call_arguments(call["arguments"])
    if tool is None:
        granted = ", ".join(sorted(tools)) or "none"
        refusal = f"the tool {call['name']!r} is not granted to this task (granted: {granted})"
    elif not refusal:
        errors = executor_for(tool).validate(tool, arguments)
        if errors:
            refusal = f"the arguments do not match {tool.name}'s schema: " + "; ".join(errors)
    fields = {
        "kind": StepKind.TOOL,
        "tool": tool,
        "tool_name": call["name"],
        "tool_call_id": call["id"],
        "arguments": arguments,
    }
    if refusal:
        with transaction.atomic():
            lease_fence(run.pk, owner, steps_used=F("steps_used") + 1)
            step_create(
                run=run,
                number=number,
                event="tool.refused",
                payload={"tool": call["name"], "arguments": arguments, "error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE

    decision = gate_decide(
        autonomy_level=definition["autonomy_level"],
        side_effect=tool.side_effect,
        always_approve=tool.always_approve,
    )
    if decision.verdict is Verdict.SIMULATE:
        result = {"simulated": True, "note": "Shadow mode: this call was recorded, not made."}
        with transaction.atomic():
            lease_fence(run.pk, owner, steps_used=F("steps_used") + 1)
            step_create(
                run=run,
                number=number,
                event="tool.simulated",
                payload={"tool": tool.name, "arguments": arguments, "gate": decision.reason},
                status=StepStatus.SIMULATED,
                result=result,
                gate=decision.reason,
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE
    if decision.verdict is Verdict.HOLD:
        with transaction.atomic():
            lease_fence(run.pk, owner, steps_used=F("steps_used") + 1)
            step = step_create(
                run=run,
                number=number,
                event="tool.proposed",
                payload={"tool": tool.name, "arguments": arguments, "gate": decision.reason},
                status=StepStatus.PROPOSED,
                gate=decision.reason,
                **fields,
            )
            approval_request_action(
                run=run, step=step, gate=decision.reason, reasoning=model_step.content
            )
            run_wait(run, f"approve {tool.name}")
        return Outcome.WAITING

    key = idempotency_key(run, number)
    with transaction.atomic():
        lease_fence(run.pk, owner, steps_used=F("steps_used") + 1)
        step = step_create(
            run=run,
            number=number,
            event="tool.started",
            payload={"tool": tool.name, "arguments": arguments, "idempotency_key": key},
            status=StepStatus.STARTED,
            idempotency_key=key,
            **fields,
        )
    return call_fire(run, step, tool, owner)


def idempotency_key(run: Run, number: int) -> str:
    return f"{run.pk}:{number}"


def call_after_gate(run: Run, step: Step, owner: str) -> Outcome:
    """A held call whose approval was decided: fire exactly what was approved, or
    return the person's reason to the model."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status == ApprovalStatus.PENDING:
        with transaction.atomic():
            lease_fence(run.pk, owner)
            run_wait(run, f"approve {step.tool_name}")
        return Outcome.WAITING
    if approval.status == ApprovalStatus.APPROVED:
        if approval.call_digest != call_digest(step.tool_name, step.arguments):
            refusal = "the approval does not match this exact call; it was not made"
        else:
            key = idempotency_key(run, step.number)
            with transaction.atomic():
                lease_fence(run.pk, owner)
                step_transition(
                    step=step,
                    to=StepStatus.STARTED,
                    event="tool.started",
                    payload={
                        "tool": step.tool_name,
                        "arguments": step.arguments,
                        "idempotency_key": key,
                        "approval": approval.pk,
                    },
                    idempotency_key=key,
                )
            return call_fire(run, step, step.tool, owner)
    else:
        who = approval.decided_by.get_username() if approval.decided_by else "the system"
        refusal = f"{who} {approval.status} this call" + (
            f": {approval.decision_reason}" if approval.decision_reason else ""
        )
    with transaction.atomic():
        lease_fence(run.pk, owner)
        step_transition(
            step=step,
            to=StepStatus.REFUSED,
            event="tool.refused",
            payload={"tool": step.tool_name, "error": refusal, "approval": approval.pk},
            error=refusal,
            finished_at=timezone.now(),
        )
    return Outcome.CONTINUE


def call_recover(run: Run, step: Step, owner: str) -> Outcome:
    """A call committed ``started`` by a worker that stopped before its outcome was
    recorded. It may or may not have taken effect."""
    if step.tool is not None and step.tool.idempotent:
        with transaction.atomic():
            lease_fence(run.pk, owner)
            event_append(
                run_uuid=run.pk,
                kind="tool.retried",
                actor="engine",
                payload={
                    "step": step.number,
                    "tool": step.tool_name,
                    "idempotency_key": step.idempotency_key,
                    "reason": "interrupted before its outcome was recorded; the tool is idempotent",
                },
            )
        return call_fire(run, step, step.tool, owner)
    reason = (
        f"step #{step.number} ({step.tool_name}) was interrupted after it was started; "
        "the tool is not idempotent, so it was not called again: did it take effect?"
    )
    with transaction.atomic():
        lease_fence(run.pk, owner)
        step_transition(
            step=step,
            to=StepStatus.UNKNOWN,
            event="tool.unknown",
            payload={"tool": step.tool_name, "idempotency_key": step.idempotency_key},
            error=reason,
        )
        approval_request_unknown(run=run, step=step, reason=reason)
        run_wait(run, f"the outcome of {step.tool_name} is unknown")
    return Outcome.WAITING


def run_wait(run: Run, why: str) -> None:
    """Inside a step's transaction: the run waits for a person and gives up its lease."""
    run_transition(
        run=run,
        to=RunStatus.WAITING,
        actor="engine",
        reason=f"waiting for a person: {why}",
        lease_owner="",
        lease_expires_at=None,
    )


def call_after_unknown(run: Run, step: Step, owner: str) -> Outcome:
    """A person said what became of an interrupted call: record it, or make the call."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status != ApprovalStatus.APPROVED:
        # Still pending (a stale queue message woke the run): back to waiting.
        with transaction.atomic():
            lease_fence(run.pk, owner)
            run_wait(run, f"the outcome of {step.tool_name} is unknown")
        return Outcome.WAITING
    who = approval.decided_by.get_username() if approval.decided_by else "a person"
    if approval.resolution == Resolution.REFIRE:
        with transaction.atomic():
            lease_fence(run.pk, owner)
            step_transition(
                step=step,
                to=StepStatus.STARTED,
                event="tool.started",
                payload={
                    "tool": step.tool_name,
                    "arguments": step.arguments,
                    "idempotency_key": step.idempotency_key,
                    "approval": approval.pk,
                    "why": f"{who} said the interrupted call did not happen",
                },
            )
        return call_fire(run, step, step.tool, owner)
    result = approval.resolution_result
    if result is None:
        result = {"note": f"{who} confirmed the call took effect; its result is not known"}
    with transaction.atomic():
        lease_fence(run.pk, owner)
        step_transition(
            step=step,
            to=StepStatus.SUCCEEDED,
            event="tool.succeeded",
            payload={"tool": step.tool_name, "result": result, "approval": approval.pk},
            result=result,
            finished_at=timezone.now(),
        )
    return Outcome.CONTINUE


def call_fire(run: Run, step: Step, tool: Tool, owner: str) -> Outcome:
    """Make the call of a step already committed ``started``, then record its outcome.

    The outcome is recorded even if the run was cancelled meanwhile: the call happened,
    and the trail must say so. The conditional UPDATE on ``started`` keeps one record."""
    context = ToolContext(
        run_id=run.pk, step_number=step.number, idempotency_key=step.idempotency_key
    )
    started = time.monotonic()
    result: ToolResult = executor_for(tool).execute(tool, step.arguments, context)
    duration_ms = int((time.monotonic() - started) * 1000)
    if result.ok:
        try:
            result = ToolResult(ok=True, value=json_plain(result.value))
        except (TypeError, ValueError) as error:
            result = ToolResult(
                ok=False, error=f"the tool returned a value that is not JSON: {error}"
            )
    with transaction.atomic():
        Run.objects.filter(pk=run.pk, lease_owner=owner).update(lease_expires_at=lease_deadline())
        if result.ok:
            step_transition(
                step=step,
                to=StepStatus.SUCCEEDED,
                event="tool.succeeded",
                payload={"tool": tool.name, "result": result.value, "duration_ms": duration_ms},
                result=result.value,
                duration_ms=duration_ms,
                finished_at=timezone.now(),
            )
        else:
            step_transition(
                step=step,
                to=StepStatus.FAILED,
                event="tool.failed",
                payload={"tool": tool.name, "error": result.error, "duration_ms": duration_ms},
                error=result.error,
                duration_ms=duration_ms,
                finished_at=timezone.now(),
            )
    return Outcome.CONTINUE
