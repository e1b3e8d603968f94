"""Replaying a run: the engine driven again over the run's record, with nothing fired,
to see whether it reaches the same decisions (``manage.py replay_run``).

The replay works on a copy of the run (a new run of the same task version, with the
same input and objective) inside a transaction that is always rolled back, so the
original's rows and trail never change and nothing of the copy stays. The real engine
(``engine.step_next``, slice by slice, as ``advance`` drives it) works the copy, and
its I/O is answered from the original's record through ``engine.waits.stand_in``:

- each model turn by the next answer the original received (its model and check steps,
  and the answers it refused, from its trail, in the order they came);
- each tool call by the original's recorded outcome of the same call at the same step;
  a call the original never made there is not made either: the replay stops;
- each person's decision by the original's decision on the same question.

Nothing leaves the transaction: no model is asked, no tool runs, and what the engine
hands on after a commit (a queue message, an approval's mail or webhook, the trail's
seal: all ``transaction.on_commit``) is dropped with the rollback. The replay claims
the copy with no lease heartbeat (no thread, no connection of its own) and no async
worker.

Then the decisions are compared, the original's with the copy's, read the same way
(``run_decisions``): at each step, the calls the model proposed, what became of each
call (refused and why, simulated, held at a gate and why, made), the questions put to
a person; then the end (status and reason). The first that differs is the report.

What a replay cannot reproduce, and so may report as a difference: the seconds of work
(a run halted by its time budget), a crash (a call that became ``unknown``, a run
halted after its workers stopped), a dial turned down while the run went on (the copy
runs at the level the run started with), and anything changed since outside the
pinned version (a tool's side-effect class or schema, a model's price): the last are
what a replay is for.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from agentops import states
from agentops.runtime.builtins import CHECK_TOOL
from agentops.runtime.engine import waits
from agentops.runtime.engine.context import LeaseLost, Outcome, _slice_cache, context_for
from agentops.runtime.engine.leases import lease_claim_run
from agentops.runtime.engine.loop import step_next
from agentops.runtime.engine.stops import run_fail_on_error
from agentops.runtime.gates import call_digest
from agentops.runtime.models.base import ModelError, ModelTurn, ToolCallRequest
from agentops.runtime.tools import ToolContext, ToolResult
from approvals.models import Approval, ApprovalKind, ApprovalStatus
from approvals.services import approval_expire, decision_apply
from lineage.models import LineageEvent
from lineage.services import event_append
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus, Task, Tool
from tasks.services import actor_for


class ReplayRefused(Exception):
    """The run cannot be replayed; the message says why. Nothing was done."""


# Bounds on a replay that goes astray: slices, and steps in a slice.
SLICES_MAX = 500
STEPS_MAX = 5_000
# How much of a call's arguments or a reason a report quotes.
QUOTE_CHARS = 160


@dataclass(frozen=True)
class Decision:
    """One decision of a run, as the replay compares it: ``what`` (compared), where it
    stands (``at``, and the step's number where it has one), and ``said`` (for people)."""

    at: str
    step: int | None
    what: dict[str, Any]
    said: str


@dataclass(frozen=True)
class Difference:
    """The first decision that differs: the original's and the replay's (None where one
    side has no decision there)."""

    at: str
    step: int | None
    original: str | None
    replay: str | None


@dataclass
class ReplayReport:
    run: str
    task: str
    task_version: int
    same: bool
    compared: int  # decisions compared, the end included
    difference: Difference | None
    original_end: dict[str, str]
    replay_end: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The record ----------------------------------------------------------------------------


class RecordEnds(Exception):
    """The replay asked for something the original's record does not hold: it stops."""


@dataclass(frozen=True)
class Answer:
    """One answer the original's model gave; ``check``: to a self-check turn."""

    turn: ModelTurn
    check: bool


@dataclass
class Record:
    """What the original's record answers, and how far the replay has used it."""

    run: Run
    steps: dict[int, Step]
    answers: list[Answer]
    approvals: list[Approval]
    model_failure: ModelError | None
    answered: int = 0
    decided: int = 0
    stopped: str = ""  # why the replay stopped short of where the engine would rest
    notes: list[str] = field(default_factory=list)


def record_read(run: Run) -> Record:
    steps = {step.number: step for step in Step.objects.filter(run=run).order_by("number")}
    approvals = [
        approval
        for approval in Approval.objects.filter(run=run)
        .select_related("step", "decided_by")
        .order_by("created_at", "pk")
        # A question about a call a crash interrupted has no counterpart: nothing crashes
        # in a replay, and the call's recorded outcome answers it.
        if approval.kind != ApprovalKind.UNKNOWN_OUTCOME
    ]
    return Record(
        run=run,
        steps=steps,
        answers=answers_read(run, steps),
        approvals=approvals,
        model_failure=model_failure_read(run),
    )


ANSWER_EVENTS = ("model.responded", "check.reported", "model.answer_refused")


def answers_read(run: Run, steps: dict[int, Step]) -> list[Answer]:
    """Every answer the original's model gave, in the order it came: its model and check
    steps, and the answers refused for not calling the tool their turn required (those
    are in the trail only). The trail gives the order; each step's own record gives the
    answer. A trail that does not name every such step gives way to the steps' order."""
    answered = [s for s in steps.values() if s.kind in (StepKind.MODEL, StepKind.CHECK)]
    events = LineageEvent.objects.filter(run_uuid=run.pk, kind__in=ANSWER_EVENTS).order_by("seq")
    answers, named = [], set()
    for kind, payload in events.values_list("kind", "payload"):
        payload = payload if isinstance(payload, dict) else {}
        if kind == "model.answer_refused":
            answers.append(Answer(refused_answer(payload), payload.get("required") == CHECK_TOOL))
            continue
        step = steps.get(payload.get("step"))
        if step is None or step.kind not in (StepKind.MODEL, StepKind.CHECK):
            continue
        named.add(step.number)
        answers.append(Answer(step_answer(step, run.model_label), step.kind == StepKind.CHECK))
    if named != {s.number for s in answered}:
        return [
            Answer(step_answer(step, run.model_label), step.kind == StepKind.CHECK)
            for step in answered
        ]
    return answers


def step_answer(step: Step, model: str) -> ModelTurn:
    """The model's answer that made ``step``, as it came (``turn_storable`` keeps it)."""
    notes = (step.result or {}).get("normalised", []) if isinstance(step.result, dict) else []
    if step.kind == StepKind.CHECK:
        report = step.result if isinstance(step.result, dict) else {}
        calls = []
        if not (step.error or "").startswith("the model did not report its self-check"):
            arguments = {
                "objective_met": report.get("objective_met", False),
                "confidence": report.get("confidence", 0.0),
                "evidence": report.get("evidence", ""),
            }
            calls = [ToolCallRequest(id="check", name=CHECK_TOOL, arguments=json.dumps(arguments))]
        return ModelTurn(
            content="",
            tool_calls=calls,
            tokens_in=step.tokens_in,
            tokens_out=step.tokens_out,
            model=model,
        )
    return ModelTurn(
        content=step.content,
        tool_calls=[
            ToolCallRequest(
                id=call.get("id", ""),
                name=call.get("name", ""),
                arguments=call.get("arguments", ""),
                oversized=call.get("oversized"),
            )
            for call in step.tool_calls
        ],
        tokens_in=step.tokens_in,
        tokens_out=step.tokens_out,
        model=model,
        normalised=list(notes) if isinstance(notes, list) else [],
    )


def refused_answer(payload: dict[str, Any]) -> ModelTurn:
    """An answer refused for not calling its turn's tool: the trail keeps the names of
    the calls it made (not their arguments, which nothing read)."""
    names = payload.get("tool_calls") or []
    return ModelTurn(
        content=str(payload.get("content") or ""),
        tool_calls=[
            ToolCallRequest(id=f"refused_{position}", name=str(name), arguments="{}")
            for position, name in enumerate(names)
        ],
        tokens_in=payload.get("tokens_in") or 0,
        tokens_out=payload.get("tokens_out") or 0,
        model=str(payload.get("model") or ""),
        normalised=list(payload.get("normalised") or []),
    )


MODEL_FAILED = re.compile(r"the model call failed(?: \(tried (\d+) times\))?: (.*)", re.DOTALL)


def model_failure_read(run: Run) -> ModelError | None:
    """The error the original's last model call ended on, if the run failed on one: the
    replay meets it again where the record's answers run out."""
    if run.status != RunStatus.FAILED:
        return None
    found = MODEL_FAILED.fullmatch(run.reason)
    if found is None:
        return None
    return ModelError(found.group(2), transient=found.group(1) is not None)


class RecordedModel:
    """The model, answering from the record: the original's answers, in order."""

    label = "replay"

    def __init__(self, record: Record) -> None:
        self.record = record

    def complete(self, *, tool_choice: str | None = None, **request: Any) -> ModelTurn:
        record = self.record
        if record.answered >= len(record.answers):
            if record.model_failure is not None:
                raise record.model_failure
            raise RecordEnds(
                "the replay asked the model for a turn after the last answer the original received"
            )
        answer = record.answers[record.answered]
        checking = tool_choice == CHECK_TOOL
        if checking != answer.check:
            said = {True: "a self-check", False: "a turn of its work"}
            raise RecordEnds(
                f"the replay asked the model for {said[checking]} where the original's next "
                f"answer was to {said[answer.check]}"
            )
        record.answered += 1
        return answer.turn


class RecordedTools:
    """The tools, answering from the record: the original's outcome of the same call at
    the same step. A call the original did not make there is not made: the replay notes
    it and stops after the step, which the comparison then names."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def __call__(self, tool: Tool, arguments: Any, context: ToolContext) -> ToolResult:
        original = self.record.steps.get(context.step_number)
        if (
            original is None
            or original.kind != StepKind.TOOL
            or original.tool_name != tool.name
            or canonical(original.arguments) != canonical(arguments)
        ):
            self.record.stopped = (
                f"the replay made a call at step {context.step_number} that the original "
                "did not make there; it was not made"
            )
            return ToolResult(ok=False, error="replay: this call is not in the record")
        if original.status == StepStatus.SUCCEEDED:
            return ToolResult(ok=True, value=original.result)
        if original.status == StepStatus.FAILED:
            return ToolResult(ok=False, error=original.error)
        # Started or unknown: the original never learned the outcome.
        self.record.stopped = (
            f"the original's call at step {original.number} has no recorded outcome "
            f"(it is {original.status})"
        )
        return ToolResult(ok=False, error=f"replay: the original's call is {original.status}")


# Driving the engine --------------------------------------------------------------------


def run_replay(*, run: Run) -> ReplayReport:
    """Replay ``run`` (ended, with steps) and compare its decisions with the replay's.
    Changes nothing: the replay's transaction is always rolled back."""
    if run.is_live:
        raise ReplayRefused(
            f"run {run.pk} is {run.status}: only a run that has ended can be replayed"
        )
    if not Step.objects.filter(run=run).exists():
        raise ReplayRefused(f"run {run.pk} has no steps: there is nothing to replay")
    record = record_read(run)
    original = run_decisions(run)
    with transaction.atomic():
        try:
            replayed, copy = replay_in_transaction(run, record)
        finally:
            # Always rolled back, whatever happened: the replay leaves nothing.
            transaction.set_rollback(True)
    ended = replay_end(run, copy, record)
    replayed.append(end_decision(ended))
    compared, difference = decisions_compare(original, replayed)
    return ReplayReport(
        run=str(run.pk),
        task=run.task.slug,
        task_version=run.task_version.number,
        same=difference is None,
        compared=compared,
        difference=difference,
        original_end=end_of(run),
        replay_end=ended,
        notes=record.notes,
    )


def replay_in_transaction(run: Run, record: Record) -> tuple[list[Decision], Run]:
    """Inside the replay's transaction: the copy, worked to rest; its decisions."""
    # The gate reads the task's dial as it is now where it was turned down after a run
    # began; the copy begins now, so it is given the dial the original began with.
    pinned = run.task_version.definition.get("autonomy_level")
    if pinned is not None:
        Task.objects.filter(pk=run.task_id).update(autonomy_level=pinned)
    copy = Run.objects.create(
        id=uuid.uuid4(),
        task_id=run.task_id,
        task_version_id=run.task_version_id,
        trigger_kind=run.trigger_kind,
        started_by_id=run.started_by_id,
        input=run.input,
        objective=run.objective,
        model_label=run.model_label,
        queued_at=timezone.now(),
    )
    answering = waits.StandIn(model=RecordedModel(record), tool=RecordedTools(record))
    token = waits.stand_in.set(answering)
    try:
        replay_drive(copy.pk, record)
    finally:
        waits.stand_in.reset(token)
    copy = Run.objects.select_related("task_version").get(pk=copy.pk)
    return run_decisions(copy, end=False), copy


def replay_drive(copy_id: uuid.UUID, record: Record) -> None:
    """Work the copy as the queue would, slice after slice, replaying each decision a
    person took on the original, until it rests, ends or leaves the record."""
    owner = f"replay:{uuid.uuid4().hex[:8]}"
    for _ in range(SLICES_MAX):
        run = lease_claim_run(copy_id, owner)
        if run is None or run.status != RunStatus.RUNNING:
            return
        outcome = slice_drive(run, owner, record)
        if record.stopped or outcome is not Outcome.WAITING:
            return
        if not decision_replay(copy_id, record):
            return
    record.stopped = f"the replay did not come to rest in {SLICES_MAX} slices"


def slice_drive(run: Run, owner: str, record: Record) -> Outcome:
    """One slice of the copy, as ``engine.advance`` works one (its errors handled the
    same way), without the lease's heartbeat thread: nothing outside this transaction
    may touch the copy, which nobody else can see anyway."""
    cache = _slice_cache.set({})
    try:
        ctx = context_for(run, owner)
        for _ in range(STEPS_MAX):
            # A savepoint a step: an error leaves the replay's transaction usable.
            with transaction.atomic():
                outcome = step_next(ctx)
            if record.stopped or outcome is not Outcome.CONTINUE:
                return outcome
        record.stopped = f"the replay did not come to rest in {STEPS_MAX} steps"
        return Outcome.STOPPED
    except RecordEnds as end:
        record.stopped = str(end)
        return Outcome.STOPPED
    except (LeaseLost, states.InvalidTransition):
        return Outcome.STOPPED
    except Exception as error:
        return run_fail_on_error(run.pk, owner, error)
    finally:
        _slice_cache.reset(cache)


class Somebody:
    """The decider of a decision whose person has since been deleted."""

    def get_username(self) -> str:
        return "a person"


def decision_replay(copy_id: uuid.UUID, record: Record) -> bool:
    """The copy waits for a person: take the original's decision on the same question
    (the same kind, at the same step), as the original's decider took it. Returns
    whether the copy goes on; where it does not, the comparison says why."""
    replayed = (
        Approval.objects.filter(run_id=copy_id, status=ApprovalStatus.PENDING)
        .select_related("step")
        .order_by("-created_at", "-pk")
        .first()
    )
    if replayed is None or record.decided >= len(record.approvals):
        return False  # a question the original was never asked: the comparison names it
    original = record.approvals[record.decided]
    if (original.kind, step_number(original)) != (replayed.kind, step_number(replayed)):
        return False
    record.decided += 1
    if original.status in (ApprovalStatus.PENDING, ApprovalStatus.CANCELLED):
        # The original rested here until its run ended otherwise (a person cancelled it).
        return False
    with transaction.atomic():
        run = Run.objects.select_for_update().select_related("task").get(pk=copy_id)
        if original.status == ApprovalStatus.EXPIRED:
            # ``approval_expire`` as it acted on the original: its window, and no
            # escalation (an escalated original was decided after it, or expired again).
            replayed.expires_at = replayed.created_at + (original.expires_at - original.created_at)
            replayed.escalated = True
            approval_expire(replayed, run, original.decided_at or timezone.now())
            return True
        user = original.decided_by or Somebody()
        replayed.status = original.status
        replayed.decided_by = original.decided_by
        replayed.decided_at = original.decided_at
        replayed.decision_reason = original.decision_reason
        replayed.resolution = original.resolution
        replayed.resolution_result = original.resolution_result
        if original.edited_arguments is not None and replayed.step is not None:
            # Approved with edited arguments: the step fires exactly the edited call.
            replayed.edited_arguments = original.edited_arguments
            replayed.call_digest = call_digest(replayed.tool_name, original.edited_arguments)
            Step.objects.filter(pk=replayed.step_id, status=StepStatus.PROPOSED).update(
                arguments=original.edited_arguments
            )
        replayed.save()
        actor = actor_for(original.decided_by) if original.decided_by else "replay"
        event_append(
            run_uuid=copy_id,
            kind=f"approval.{original.status}",
            actor=actor,
            payload={"approval": replayed.pk, "replayed_from": original.pk},
        )
        decision_apply(run=run, approval=replayed, actor=actor, user=user)
    return True


def step_number(approval: Approval) -> int | None:
    return approval.step.number if approval.step_id else None


# The decisions -------------------------------------------------------------------------


def run_decisions(run: Run, *, end: bool = True) -> list[Decision]:
    """The run's decisions in order: each step's (with the questions put to a person on
    it), the questions put to a person between steps, and (``end``) how the run ended."""
    steps = list(Step.objects.filter(run=run).order_by("number"))
    approvals = [
        approval
        for approval in Approval.objects.filter(run=run)
        .select_related("step")
        .order_by("created_at", "pk")
        if approval.kind != ApprovalKind.UNKNOWN_OUTCOME
    ]
    on_step: dict[int, list[Approval]] = {}
    between: dict[int, list[Approval]] = {}
    for approval in approvals:
        if approval.step_id:
            on_step.setdefault(approval.step.number, []).append(approval)
        else:
            between.setdefault(approval_position(approval), []).append(approval)
    decisions = [gate_decision(a, after=0) for a in between.get(0, [])]
    for step in steps:
        decisions.append(step_decision(step, on_step.get(step.number, [])))
        decisions.extend(gate_decision(a, after=step.number) for a in between.get(step.number, []))
    if end:
        decisions.append(end_decision(end_of(run)))
    return decisions


def approval_position(approval: Approval) -> int:
    """The number of the last step before a question not about one step (a budget, a
    loop): the run's recent steps, as the question's context keeps them."""
    recent = (approval.context or {}).get("recent_steps") or []
    numbers = [s.get("number") for s in recent if isinstance(s, dict)]
    return max((n for n in numbers if isinstance(n, int)), default=0)


def step_decision(step: Step, approvals: list[Approval]) -> Decision:
    asked = [[a.kind, a.gate] for a in approvals]
    said_asked = "".join(f"; asked a person ({a.kind}): {quoted(a.gate)}" for a in approvals)
    at = f"step {step.number}"
    if step.kind == StepKind.MODEL:
        calls = [[c.get("name", ""), digest(c.get("arguments", ""))] for c in step.tool_calls]
        said = (
            "the model asked for " + ", ".join(quoted(c.get("name", "")) for c in step.tool_calls)
            if step.tool_calls
            else "the model gave its final answer"
        )
        return Decision(at, step.number, {"kind": "model", "calls": calls}, said)
    if step.kind == StepKind.TOOL:
        what = {
            "kind": "tool",
            "tool": step.tool_name,
            "arguments": digest(step.arguments),
            "gate": step.gate,
            "status": step.status,
            "error": step.error if step.status == StepStatus.REFUSED else "",
            "asked": asked,
        }
        said = f"{quoted(step.tool_name)} {quoted(canonical(step.arguments))}"
        if step.gate:
            said += f", held at the gate ({quoted(step.gate)})"
        said += f", {step.status}"
        if step.status == StepStatus.REFUSED:
            said += f": {quoted(step.error)}"
        return Decision(at, step.number, what, said + said_asked)
    if step.kind == StepKind.PLAN:
        what = {"kind": "plan", "status": step.status, "error": step.error}
        said = "the plan recorded" if not step.error else f"the plan refused: {quoted(step.error)}"
        return Decision(at, step.number, what, said)
    if step.kind == StepKind.CHECK:
        report = step.result if isinstance(step.result, dict) else {}
        what = {
            "kind": "check",
            "objective_met": report.get("objective_met"),
            "confidence": report.get("confidence"),
            "asked": asked,
        }
        said = (
            f"the self-check: objective met {report.get('objective_met')}, confidence "
            f"{report.get('confidence')}"
        )
        return Decision(at, step.number, what, said + said_asked)
    what = {"kind": step.kind, "status": step.status, "asked": asked}
    return Decision(at, step.number, what, f"a {step.kind} step, {step.status}" + said_asked)


def gate_decision(approval: Approval, *, after: int) -> Decision:
    at = f"after step {after}" if after else "before the first step"
    what = {"kind": "question", "approval": approval.kind, "gate": approval.gate}
    return Decision(at, None, what, f"asked a person ({approval.kind}): {quoted(approval.gate)}")


def end_of(run: Run) -> dict[str, str]:
    return {"status": run.status, "reason": run.reason}


def end_decision(end: dict[str, str]) -> Decision:
    said = end["status"] + (f": {quoted(end['reason'])}" if end["reason"] else "")
    return Decision("the end", None, dict(end), said)


def replay_end(original: Run, copy: Run, record: Record) -> dict[str, str]:
    """How the replay ended, as it is compared: where it stopped short, the stop; where
    the original was cancelled by a person (no decision of the engine), the replay rests
    where the record ends, and the cancellation is taken as given."""
    end = end_of(copy)
    if original.status == RunStatus.CANCELLED and (
        copy.is_live or record.stopped.startswith("the replay asked the model for a turn after")
    ):
        record.notes.append(
            "the original was cancelled by a person: the replay took that as given where its "
            "record ends"
        )
        end = end_of(original)
    elif record.stopped:
        end = {"status": "stopped", "reason": record.stopped}
    return end


def decisions_compare(
    original: list[Decision], replayed: list[Decision]
) -> tuple[int, Difference | None]:
    """How many decisions were compared, and the first that differs (None if none)."""
    for position in range(max(len(original), len(replayed))):
        mine = original[position] if position < len(original) else None
        theirs = replayed[position] if position < len(replayed) else None
        if mine is not None and theirs is not None and mine.what == theirs.what:
            continue
        where = mine or theirs
        return position + 1, Difference(
            at=where.at,
            step=where.step,
            original=mine.said if mine else None,
            replay=theirs.said if theirs else None,
        )
    return len(original), None


# Values --------------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """One text for a JSON value, keys sorted: arguments compared and quoted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    """A call's arguments as compared: the sha256 of their canonical text (a model's
    raw text as it is)."""
    text = value if isinstance(value, str) else canonical(value)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def quoted(text: Any) -> str:
    """``text`` for a terminal: control characters escaped (a model's or a tool's words
    may hold any), cut to ``QUOTE_CHARS``."""
    text = str(text)
    if len(text) > QUOTE_CHARS:
        text = text[: QUOTE_CHARS - 1] + "…"
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
