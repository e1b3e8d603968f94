"""What a requested call becomes: a plan recorded, a question to a person, refused,
simulated (Shadow), held for approval, or committed ``started`` and fired; and what a
person's decision or a crash makes of a call later."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from agentops import telemetry
from agentops.runtime.builtins import (
    ASK_SCHEMA,
    ASK_TOOL,
    PLAN_TOOL,
    plan_errors,
)
from agentops.runtime.engine.context import GATE_CHARS, Context, Outcome, clipped
from agentops.runtime.engine.doors import (
    Doors,
    call_doors,
    call_read,
    confidence_threshold,
    errors_said,
)
from agentops.runtime.engine.fire import call_fire
from agentops.runtime.engine.leases import lease_fence
from agentops.runtime.engine.ledger import (
    budget_context,
    idempotency_key,
    step_add,
    step_entry,
    step_move,
    steps_commit,
)
from agentops.runtime.engine.rails import budget_gate
from agentops.runtime.engine.stops import run_wait
from agentops.runtime.gates import (
    Verdict,
    call_digest,
)
from agentops.runtime.tools import arguments_errors
from approvals.models import ApprovalKind, ApprovalStatus, Resolution
from approvals.services import approval_request
from lineage.services import event_append
from tasks.models import (
    Step,
    StepKind,
    StepStatus,
)
from tasks.services import (
    step_transition,
)


def plan_record(ctx: Context, call: dict) -> Outcome:
    """The agent drafted or revised its plan: keep it on the run, as a step."""
    parsed = call_read(call)
    arguments, refusal = parsed.arguments, parsed.refusal
    if not refusal:
        errors = plan_errors(arguments)
        if errors:
            refusal = "the plan does not match plan_update's schema: " + errors_said(errors)
    version = (
        sum(1 for s in ctx.steps if s.kind == StepKind.PLAN and s.status == StepStatus.SUCCEEDED)
        + 1
    )
    fields = {
        "kind": StepKind.PLAN,
        "tool_name": PLAN_TOOL,
        "tool_call_id": call["id"],
        "arguments": arguments,
    }
    with ctx.transaction():
        if refusal:
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="plan.refused",
                payload={"error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
            return Outcome.CONTINUE
        plan = arguments["steps"]
        lease_fence(ctx, add={"steps_used": 1}, plan=plan)
        step_add(
            ctx,
            event="plan.drafted" if version == 1 else "plan.revised",
            payload={"version": version, "steps": plan, "reason": arguments.get("reason", "")},
            status=StepStatus.SUCCEEDED,
            content=arguments.get("reason", ""),
            result={"recorded": True, "version": version},
            finished_at=timezone.now(),
            **fields,
        )
    return Outcome.CONTINUE


def question_ask(ctx: Context, model_step: Step, call: dict) -> Outcome:
    """The agent asks a person: the run waits, and the answer is the call's result."""
    parsed = call_read(call)
    arguments, refusal = parsed.arguments, parsed.refusal
    if not refusal:
        errors = arguments_errors(ASK_SCHEMA, arguments)
        refusal = (
            "the question does not match ask_person's schema: " + errors_said(errors)
            if errors
            else ""
        )
    fields = {
        "kind": StepKind.TOOL,
        "tool_name": ASK_TOOL,
        "tool_call_id": call["id"],
        "arguments": arguments,
    }
    with ctx.transaction():
        added = lease_fence(ctx, add={"steps_used": 1})
        if refusal:
            step_add(
                ctx,
                event="tool.refused",
                payload={"tool": ASK_TOOL, "error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
            return Outcome.CONTINUE
        step = step_add(
            ctx,
            event="question.asked",
            payload={"question": arguments["question"]},
            status=StepStatus.PROPOSED,
            gate="the agent asks a person",
            **fields,
        )
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.QUESTION,
            step=step,
            gate=clipped(f"the agent asks: {arguments['question']}", GATE_CHARS),
            reasoning=model_step.content,
            context=budget_context(ctx, added),
        )
        run_wait(ctx.run, "answer the agent's question")
    return Outcome.WAITING


def call_propose(ctx: Context, model_step: Step, call: dict) -> Outcome:
    """Put one requested call through the doors, and act on what they say."""
    stopped = budget_gate(ctx)
    if stopped:
        return stopped
    if call["name"] == PLAN_TOOL:
        return plan_record(ctx, call)
    if call["name"] == ASK_TOOL:
        return question_ask(ctx, model_step, call)
    run, number = ctx.run, ctx.number
    doors = call_doors(ctx, call)
    telemetry.doors_said(call, doors)
    tool, arguments, refusal, decision = doors.tool, doors.arguments, doors.refusal, doors.decision
    fields = doors.step_fields(call)
    if refusal:
        with ctx.transaction():
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="tool.refused",
                payload={"tool": call["name"], "arguments": arguments, "error": refusal},
                status=StepStatus.REFUSED,
                error=refusal,
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE

    if decision.verdict is Verdict.SIMULATE:
        result = {"simulated": True, "note": "Shadow mode: this call was recorded, not made."}
        with ctx.transaction():
            lease_fence(ctx, add={"steps_used": 1})
            step_add(
                ctx,
                event="tool.simulated",
                payload={"tool": tool.name, "arguments": arguments, "gate": decision.reason},
                status=StepStatus.SIMULATED,
                result=result,
                gate=clipped(decision.reason, GATE_CHARS),
                finished_at=timezone.now(),
                **fields,
            )
        return Outcome.CONTINUE
    if decision.verdict is Verdict.HOLD:
        with ctx.transaction():
            added = lease_fence(ctx, add={"steps_used": 1})
            step = step_add(
                ctx,
                event="tool.proposed",
                payload={
                    "tool": tool.name,
                    "arguments": arguments,
                    "confidence": doors.confidence,
                    "gate": decision.reason,
                },
                status=StepStatus.PROPOSED,
                gate=clipped(decision.reason, GATE_CHARS),
                **fields,
            )
            context = budget_context(ctx, added)
            if decision.by_confidence:
                context["threshold"] = confidence_threshold(ctx)
            approval_request(
                run=run,
                kind=ApprovalKind.ACTION,
                step=step,
                gate=clipped(decision.reason, GATE_CHARS),
                reasoning=model_step.content,
                confidence=doors.confidence,
                context=context,
            )
            run_wait(run, f"approve {tool.name}")
        return Outcome.WAITING

    step = steps_commit(ctx, {"steps_used": 1}, [call_start(ctx, call, doors, number)])[0]
    return call_fire(ctx, step, tool)


def call_start(ctx: Context, call: dict, doors: Doors, number: int) -> dict[str, Any]:
    """The ledger entry for ``steps_add``: the step ``number``, to be committed
    ``started`` with its idempotency key before the call fires."""
    key = idempotency_key(ctx.run, number)
    return step_entry(
        event="tool.started",
        payload={
            "tool": doors.tool.name,
            "arguments": doors.arguments,
            "confidence": doors.confidence,
            "idempotency_key": key,
        },
        status=StepStatus.STARTED,
        idempotency_key=key,
        **doors.step_fields(call),
    )


def call_after_gate(ctx: Context, step: Step) -> Outcome:
    """A held call whose approval was decided: fire exactly what was approved, or
    return the person's reason to the model."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status == ApprovalStatus.PENDING:
        # Still pending (a stale queue message woke the run): back to waiting.
        with ctx.transaction():
            lease_fence(ctx)
            run_wait(ctx.run, f"approve {step.tool_name}")
        return Outcome.WAITING
    telemetry.approval_acted_on(approval)
    if approval.status == ApprovalStatus.APPROVED and approval.kind == ApprovalKind.QUESTION:
        who = approval.decided_by.get_username() if approval.decided_by else "a person"
        answer = {"answer": approval.decision_reason, "answered_by": who}
        step_move(
            ctx,
            step,
            to=StepStatus.SUCCEEDED,
            event="question.answered",
            payload={"answer": approval.decision_reason, "approval": approval.pk},
            result=answer,
            finished_at=timezone.now(),
        )
        return Outcome.CONTINUE
    if approval.status == ApprovalStatus.APPROVED:
        if approval.call_digest != call_digest(step.tool_name, step.arguments):
            refusal = "the approval does not match this exact call; it was not made"
        else:
            return call_fire_approved(
                ctx, step, approval, key=idempotency_key(ctx.run, step.number)
            )
    elif approval.status == ApprovalStatus.EXPIRED:
        refusal = f"the approval expired ({approval.decision_reason}); the call was not made"
    else:
        who = approval.decided_by.get_username() if approval.decided_by else "the system"
        refusal = f"{who} {approval.status} this call" + (
            f": {approval.decision_reason}" if approval.decision_reason else ""
        )
    step_move(
        ctx,
        step=step,
        to=StepStatus.REFUSED,
        event="tool.refused",
        payload={"tool": step.tool_name, "error": refusal, "approval": approval.pk},
        error=refusal,
        finished_at=timezone.now(),
    )
    return Outcome.CONTINUE


def call_recover(ctx: Context, step: Step) -> Outcome:
    """A call committed ``started`` by a worker that stopped before its outcome was
    recorded. It may or may not have taken effect."""
    if step.tool is not None and step.tool.idempotent:
        with ctx.transaction():
            lease_fence(ctx)
            event_append(
                run_uuid=ctx.run.pk,
                kind="tool.retried",
                actor="engine",
                payload={
                    "step": step.number,
                    "tool": step.tool_name,
                    "idempotency_key": step.idempotency_key,
                    "reason": "interrupted before its outcome was recorded; the tool is idempotent",
                },
            )
        return call_fire(ctx, step, step.tool)
    reason = (
        f"step #{step.number} ({step.tool_name}) was interrupted after it was started; "
        "the tool is not idempotent, so it was not called again: did it take effect?"
    )
    with ctx.transaction():
        added = lease_fence(ctx)
        step_transition(
            step=step,
            to=StepStatus.UNKNOWN,
            event="tool.unknown",
            payload={"tool": step.tool_name, "idempotency_key": step.idempotency_key},
            error=reason,
        )
        approval_request(
            run=ctx.run,
            kind=ApprovalKind.UNKNOWN_OUTCOME,
            step=step,
            gate=reason,
            context=budget_context(ctx, added),
        )
        run_wait(ctx.run, f"the outcome of {step.tool_name} is unknown")
    return Outcome.WAITING


def call_fire_approved(
    ctx: Context, step: Step, approval: Any, *, key: str, why: str = ""
) -> Outcome:
    """A person's decision lets this exact call go: commit it started, then make it."""
    payload = {
        "tool": step.tool_name,
        "arguments": step.arguments,
        "confidence": step.confidence,
        "idempotency_key": key,
        "approval": approval.pk,
        **({"why": why} if why else {}),
    }
    step_move(
        ctx, step, to=StepStatus.STARTED, event="tool.started", payload=payload, idempotency_key=key
    )
    return call_fire(ctx, step, step.tool)


def call_after_unknown(ctx: Context, step: Step) -> Outcome:
    """A person said what became of an interrupted call: record it, or make the call."""
    approval = step.approvals.order_by("-created_at").first()
    if approval is None or approval.status != ApprovalStatus.APPROVED:
        # Still pending (a stale queue message woke the run): back to waiting.
        with ctx.transaction():
            lease_fence(ctx)
            run_wait(ctx.run, f"the outcome of {step.tool_name} is unknown")
        return Outcome.WAITING
    who = approval.decided_by.get_username() if approval.decided_by else "a person"
    if approval.resolution == Resolution.REFIRE:
        return call_fire_approved(
            ctx,
            step,
            approval,
            key=step.idempotency_key,
            why=f"{who} said the interrupted call did not happen",
        )
    result = approval.resolution_result
    if result is None:
        result = {"note": f"{who} confirmed the call took effect; its result is not known"}
    step_move(
        ctx,
        step=step,
        to=StepStatus.SUCCEEDED,
        event="tool.succeeded",
        payload={"tool": step.tool_name, "result": result, "approval": approval.pk},
        result=result,
        finished_at=timezone.now(),
    )
    return Outcome.CONTINUE
