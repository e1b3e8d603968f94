"""What a turn carries forward within a slice (the transcript, its token estimate, the
loop check's state) reads exactly as what a slice makes from the run's record at once,
after a restart or not: over a long run with every kind of step, steps settled later
among them, and over random runs of steps built in memory."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from agentops import states
from agentops.runtime.budgets import budget_note, json_chars, list_chars, tokens_estimate
from agentops.runtime.builtins import PLAN_TOOL, PLANNING_NOTE
from agentops.runtime.engine import Context, Outcome, advance, context_load, turns
from agentops.runtime.engine import calls as engine_calls
from agentops.runtime.engine import loop as engine_loop
from agentops.runtime.engine.rails import loops_check
from agentops.runtime.engine.turns import SYSTEM_PREAMBLE, tool_message, transcript_sized
from agentops.runtime.loops import LoopFinding, PlanChurn, ToolCallRecord
from agentops.runtime.models.scripted import CHECKS, check_turn
from approvals.models import ApprovalKind, ApprovalStatus
from approvals.services import approval_decide
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus
from tasks.services import run_start

pytestmark = pytest.mark.django_db


# What a slice made from the whole record each turn before turns were carried forward,
# kept here verbatim as the specification the carried forms are held to.


def transcript_from_scratch(ctx: Context) -> list[dict]:
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


def old_loop_find(calls, *, repeat_limit: int, stall_limit: int) -> LoopFinding | None:
    seen: set[str] = set()
    repeats: Counter[str] = Counter()
    stale_in_a_row = 0
    churn = PlanChurn()
    for call in calls:
        if call.tool == PLAN_TOOL:
            finding = churn.add(call, repeat_limit=repeat_limit, stall_limit=stall_limit)
            if finding is not None:
                return finding
            continue
        churn = PlanChurn()
        digest = call.digest
        repeats[digest] += 1
        if repeat_limit and repeats[digest] >= repeat_limit:
            arguments = json.dumps(call.arguments, sort_keys=True, default=str)
            return LoopFinding(
                "loop",
                f"loop: {call.tool} was called {repeats[digest]} times with the same "
                f"arguments {arguments[:200]} and returned the same result each time",
                call.number,
            )
        stale_in_a_row = stale_in_a_row + 1 if digest in seen else 0
        seen.add(digest)
        if stall_limit and stale_in_a_row >= stall_limit:
            return LoopFinding(
                "stall",
                f"stall: the last {stale_in_a_row} tool calls each repeated an earlier call "
                "and its result; nothing new was learned",
                call.number,
            )
    return None


def loops_from_scratch(ctx: Context) -> LoopFinding | None:
    ok = (StepStatus.SUCCEEDED, StepStatus.SIMULATED)
    calls = [
        ToolCallRecord(
            number=s.number,
            tool=s.tool_name,
            arguments=s.arguments,
            outcome=s.result if s.status in ok else {"error": s.error},
        )
        for s in ctx.steps
        if s.kind in (StepKind.TOOL, StepKind.PLAN)
        and s.number > ctx.run.loops_accepted_through
        and s.status in (*ok, StepStatus.FAILED, StepStatus.REFUSED)
    ]
    return old_loop_find(
        calls,
        repeat_limit=int(ctx.setting("loop_repeat_limit")),
        stall_limit=int(ctx.setting("stall_limit")),
    )


# The token estimate --------------------------------------------------------------------


def test_the_estimate_from_summed_message_lengths_is_the_estimate_from_the_whole():
    messages = [
        {"role": "system", "content": 'ünïcode \x00 and \ud83d\ude00 quotes " \\'},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function"}]},
        {"role": "tool", "tool_call_id": "a", "content": json.dumps({"k": [1, 2.5, None]})},
    ]
    tools = [{"type": "function", "function": {"name": "t", "parameters": {}}}]
    for count in range(len(messages) + 1):
        some = messages[:count]
        summed = sum(json_chars(m) for m in some)
        assert list_chars(summed, count) == len(json.dumps(some))
        assert tokens_estimate(some, tools, messages_chars=summed) == tokens_estimate(some, tools)


# A long run, every kind of step ----------------------------------------------------------


class Crash(BaseException):
    """The worker dies: not an error the engine handles, it leaves the run as it is."""


def long_run_turns() -> list[dict[str, Any]]:
    """Sixty-odd agent turns with every kind of step: plans (drafted, revised, refused),
    calls that run, fail or are refused, calls held and approved or rejected, a call
    whose outcome becomes unknown, a question, several calls in one turn."""
    plan = {"steps": [{"title": "echo everything"}, {"title": "answer"}]}
    turns_: list[dict[str, Any]] = [{"content": "first, a plan", "calls": [(PLAN_TOOL, plan)]}]
    for n in range(20):
        turns_.append({"content": f"echo {n}", "calls": [("test_echo", {"text": f"e{n}"})]})
    turns_ += [
        {"calls": [("test_echo", {"text": "two-a"}), ("test_echo", {"text": "two-b"})]},
        {"calls": [("test_echo", {"text": 42})]},  # refused: not a string
        {"calls": [("test_broken", {"text": "x"})]},  # failed
        {"calls": [(PLAN_TOOL, {"steps": []})]},  # refused: an empty plan
        {"content": "a note", "calls": [("test_note", {"text": "approve me"})]},  # held
        {"calls": [("test_note", {"text": "reject me"})]},  # held, rejected
        {"calls": [("test_send", {"text": "crash"})]},  # held, approved, its worker dies
        {"calls": [("ask_person", {"question": "which month?"})]},
        {"calls": [(PLAN_TOOL, {"steps": [{"title": "echo more", "status": "doing"}]})]},
    ]
    for n in range(20, 40):
        turns_.append({"calls": [("test_echo", {"text": f"e{n}"})]})
    turns_.append({"content": "answer 1"})  # checked, low confidence: a person rejects it
    for n in range(40, 45):
        turns_.append({"calls": [("test_echo", {"text": f"e{n}"})]})
    turns_.append({"content": "answer 2"})
    return turns_


def test_a_long_run_reads_the_same_transcript_carried_as_rebuilt_from_its_record(
    make_task, operator, monkeypatch
):
    task = make_task(
        long_run_turns(),
        tools=["test_echo", "test_note", "test_send", "test_broken"],
        autonomy_level=1,  # reads run; the rest waits for a person
        max_steps=400,
        self_check=True,
        confidence_threshold=0.8,
    )
    confidences = iter([0.4, 0.95])
    CHECKS[task.model.split(":", 1)[1]] = lambda messages: check_turn(next(confidences), "e")
    compared = Counter()

    real_transcript_sized = turns.transcript_sized

    def transcript_checked(ctx: Context) -> tuple[list[dict], int]:
        messages, chars = real_transcript_sized(ctx)
        assert messages == transcript_from_scratch(ctx)
        assert chars == sum(json_chars(m) for m in messages)
        # A slice that starts now, from the record alone, reads the same.
        fresh = context_load(ctx.run.pk, ctx.owner)
        assert real_transcript_sized(fresh) == (messages, chars)
        compared["transcript"] += 1
        return messages, chars

    real_loops_check = engine_loop.loops_check

    def loops_checked(ctx: Context) -> LoopFinding | None:
        finding = real_loops_check(ctx)
        assert finding == loops_from_scratch(ctx)
        compared["loops"] += 1
        return finding

    real_call_fire = engine_calls.call_fire

    def call_fire_crashing(ctx, step, tool):
        if step.tool_name == "test_send" and step.arguments == {"text": "crash"}:
            raise Crash
        return real_call_fire(ctx, step, tool)

    monkeypatch.setattr(turns, "transcript_sized", transcript_checked)
    monkeypatch.setattr(engine_loop, "loops_check", loops_checked)
    monkeypatch.setattr(engine_calls, "call_fire", call_fire_crashing)

    run = run_start(task=task, run_input={"month": "2026-11"}, user=operator)
    decided = Counter()
    for _ in range(40):
        try:
            outcome = advance(run.pk)
        except Crash:
            # The call was committed started; its worker is gone. Let its lease lapse.
            monkeypatch.setattr(engine_calls, "call_fire", real_call_fire)
            lapsed = timezone.now() - timedelta(seconds=1)
            Run.objects.filter(pk=run.pk).update(lease_expires_at=lapsed)
            decided["crash"] += 1
            continue
        if outcome is Outcome.FINISHED:
            break
        if outcome is not Outcome.WAITING:
            continue
        approval = run.approvals.get(status=ApprovalStatus.PENDING)
        kind = approval.kind
        if kind == ApprovalKind.ACTION:
            approve = approval.arguments != {"text": "reject me"}
            approval_decide(approval=approval, user=operator, approve=approve, reason="no")
        elif kind == ApprovalKind.QUESTION:
            approval_decide(approval=approval, user=operator, approve=True, reason="November")
        elif kind == ApprovalKind.UNKNOWN_OUTCOME:
            approval_decide(
                approval=approval,
                user=operator,
                approve=True,
                resolution="happened",
                result={"sent": "crash", "checked": "by hand"},
            )
        else:
            assert kind == ApprovalKind.OUTCOME_REVIEW
            approval_decide(approval=approval, user=operator, approve=False, reason="check more")
        decided[kind] += 1
    run.refresh_from_db()

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.outcome == "answer 2"
    assert decided == {
        ApprovalKind.ACTION: 3,
        ApprovalKind.QUESTION: 1,
        ApprovalKind.UNKNOWN_OUTCOME: 1,
        ApprovalKind.OUTCOME_REVIEW: 1,
        "crash": 1,
    }
    statuses = Counter((s.kind, s.status) for s in run.steps.all())
    assert statuses[(StepKind.TOOL, StepStatus.REFUSED)] == 2  # invalid, and rejected
    assert statuses[(StepKind.TOOL, StepStatus.FAILED)] == 1
    assert statuses[(StepKind.PLAN, StepStatus.REFUSED)] == 1
    assert statuses[(StepKind.HUMAN, StepStatus.SUCCEEDED)] == 1
    assert run.steps.get(tool_name="test_send").result == {"sent": "crash", "checked": "by hand"}
    assert run.steps.count() > 100
    # Every model turn and every loop check was compared, in every slice.
    assert compared["transcript"] == run.steps.filter(kind__in=["model", "check"]).count()
    assert compared["loops"] >= compared["transcript"] - 2


# Random runs in memory -----------------------------------------------------------------

TERMINAL = [s for s in StepStatus.values if states.STEP.terminal(s)]
UNFINISHED = [s for s in StepStatus.values if not states.STEP.terminal(s)]


class RandomRun:
    """Steps made and moved at random, as the engine and people move them: model turns
    with calls, their answers (some unfinished, settled later), people's feedback,
    checks; now and then an answer to a call already answered, or the record read
    again from scratch (a new list, the carried state dropped)."""

    def __init__(self, ctx: Context, seed: int) -> None:
        self.ctx = ctx
        self.random = random.Random(seed)
        self.calls: list[str] = []

    @property
    def number(self) -> int:
        return len(self.ctx.steps) + 1

    def step(self, **fields: Any) -> None:
        self.ctx.steps.append(Step(run=self.ctx.run, number=self.number, **fields))

    def act(self) -> None:
        r = self.random
        action = r.choices(
            ["model", "answer", "settle", "human", "check", "duplicate", "reload", "accept"],
            weights=[6, 10, 5, 1, 1, 1, 1, 1],
        )[0]
        if action == "model":
            calls = []
            for _ in range(r.choice([0, 1, 1, 1, 2, 3])):
                call_id = f"c{len(self.calls)}"
                self.calls.append(call_id)
                name = r.choice(["t", "u", PLAN_TOOL])
                arguments = json.dumps({"q": r.randint(0, 3)})
                calls.append({"id": call_id, "name": name, "arguments": arguments})
            content = r.choice(["", "thinking", "ünï \x7f"])
            self.step(
                kind=StepKind.MODEL, status=StepStatus.SUCCEEDED, content=content, tool_calls=calls
            )
        elif action in ("answer", "duplicate") and self.calls:
            answered = {s.tool_call_id for s in self.ctx.steps if s.tool_call_id}
            open_calls = [c for c in self.calls if c not in answered]
            pool = self.calls if action == "duplicate" or not open_calls else open_calls
            call_id = r.choice(pool)
            name = next(
                c["name"] for s in self.ctx.steps for c in s.tool_calls if c["id"] == call_id
            )
            status = r.choice(TERMINAL + UNFINISHED)
            self.step(
                kind=StepKind.PLAN if name == PLAN_TOOL else StepKind.TOOL,
                status=status,
                tool_name=name,
                tool_call_id=call_id,
                arguments={"q": r.randint(0, 3)}
                if name != PLAN_TOOL
                else {"steps": [{"title": str(r.randint(0, 1))}]},
                result={"r": r.randint(0, 2)},
                error=r.choice(["", "it failed"]),
            )
        elif action == "settle":
            unfinished = [s for s in self.ctx.steps if s.status in UNFINISHED]
            if unfinished:
                step = r.choice(unfinished)
                step.status = r.choice(sorted(states.STEP.table[step.status]))
                step.result = {"settled": step.number}
        elif action == "human":
            self.step(kind=StepKind.HUMAN, status=StepStatus.SUCCEEDED, content="no, again")
        elif action == "check":
            self.step(kind=StepKind.CHECK, status=StepStatus.SUCCEEDED, result={"ok": True})
        elif action == "reload":
            self.ctx.steps = list(self.ctx.steps)
            self.ctx.carried.clear()
        elif action == "accept":
            self.ctx.run.loops_accepted_through = r.randint(0, len(self.ctx.steps))


@pytest.mark.parametrize("seed", range(8))
def test_random_runs_read_the_same_carried_as_made_at_once(make_task, operator, seed):
    task = make_task([], instructions="Be brief.")
    run = run_start(task=task, run_input={"batch": "ü"}, user=operator)
    definition = {**run.task_version.definition, "loop_repeat_limit": 3, "stall_limit": 4}
    ctx = Context(run=run, owner="test", definition=definition, steps=[])
    runs = RandomRun(ctx, seed)
    findings = Counter()
    for _ in range(300):
        runs.act()
        messages, chars = transcript_sized(ctx)
        assert messages == transcript_from_scratch(ctx)
        assert chars == sum(json_chars(m) for m in messages)
        finding = loops_check(ctx)
        assert finding == loops_from_scratch(ctx)
        findings[finding.kind if finding else None] += 1
        # And what a new slice would make of the same steps, from nothing.
        fresh = Context(run=run, owner="test", definition=definition, steps=list(ctx.steps))
        assert transcript_sized(fresh) == (messages, chars)
        assert loops_check(fresh) == finding
    assert sum(findings.values()) == 300


def test_the_random_runs_meet_every_case(make_task, operator):
    """The random runs above are worth something only if they reach the cases: answers
    unfinished then settled, duplicates, reloads, loops found and not."""
    task = make_task([])
    run = run_start(task=task, run_input={}, user=operator)
    definition = {**run.task_version.definition, "loop_repeat_limit": 3, "stall_limit": 4}
    seen = Counter()
    for seed in range(8):
        ctx = Context(run=run, owner="test", definition=definition, steps=[])
        runs = RandomRun(ctx, seed)
        for _ in range(300):
            before = {s.number: s.status for s in ctx.steps}
            runs.act()
            after = {s.number: s.status for s in ctx.steps}
            seen["settled"] += any(before[n] != after[n] for n in before)
            ids = [s.tool_call_id for s in ctx.steps if s.tool_call_id]
            seen["duplicate"] += len(ids) != len(set(ids))
            finding = loops_check(ctx)
            seen[finding.kind if finding else "none"] += 1
    for case in ("settled", "duplicate", "loop", "stall", "none"):
        assert seen[case] > 0, seen


def test_the_bench_script_reads_its_count_from_the_last_answer():
    from agentops.bench import BENCH_OBJECTIVE, BENCH_TOOL, bench_agent

    objective = {"role": "user", "content": BENCH_OBJECTIVE.format(agent_steps=2)}
    first = bench_agent([{"role": "system", "content": ""}, objective])
    assert first.tool_calls[0].name == BENCH_TOOL
    assert json.loads(first.tool_calls[0].arguments) == {"n": 1}
    answer = {"role": "tool", "tool_call_id": "x", "content": json.dumps({"n": 2})}
    assert bench_agent([objective, answer]).tool_calls == []
