"""The engine's commits: all or nothing, fenced by the lease, chained onto the trail as it
is; on PostgreSQL the two most frequent ones are one statement each
(agentops.runtime.commits), and where their checks fail the transaction path decides."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from agentops.bench import database_counted
from agentops.runtime.engine import (
    Context,
    LeaseLost,
    Outcome,
    advance,
    context_load,
    lease_claim,
    step_entry,
    steps_commit,
)
from lineage import services as lineage
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append
from tasks.models import Run, Step, StepKind, StepStatus
from tasks.services import run_start

pytestmark = pytest.mark.django_db


def claimed(make_task, operator) -> Context:
    task = make_task([{"content": "done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert lease_claim(run.pk, "worker-a")
    return context_load(run.pk, "worker-a")


def model_entry(content: str) -> dict:
    return step_entry(
        event="model.responded",
        payload={"content": content},
        kind=StepKind.MODEL,
        status=StepStatus.SUCCEEDED,
        content=content,
    )


def kinds(run: Run) -> list[str]:
    events = LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq")
    return list(events.values_list("kind", flat=True))


def test_a_commit_by_a_worker_that_lost_the_run_writes_nothing(make_task, operator):
    ctx = claimed(make_task, operator)
    Run.objects.filter(pk=ctx.run.pk).update(lease_owner="worker-b")

    with pytest.raises(LeaseLost):
        steps_commit(ctx, {"steps_used": 1}, [model_entry("too late")])

    run = Run.objects.get(pk=ctx.run.pk)
    assert run.steps.count() == 0
    assert run.steps_used == 0
    assert kinds(run) == ["run.queued", "run.running"]
    assert ctx.steps == []  # the record in memory took nothing either


def test_a_commit_after_another_writer_appended_chains_onto_its_event(make_task, operator):
    ctx = claimed(make_task, operator)
    before = lineage.head_hint(connection, ctx.run.pk)
    # Another process appends to the run's trail: this thread's memory of the chain's
    # head (put back as it was) no longer names the last event.
    with transaction.atomic():
        event_append(run_uuid=ctx.run.pk, kind="test.other_writer", actor="other")
    lineage._heads.__dict__[connection.alias][ctx.run.pk] = before

    steps = steps_commit(ctx, {"steps_used": 1}, [model_entry("after the other writer")])

    run = Run.objects.get(pk=ctx.run.pk)
    assert [step.pk for step in steps] == list(run.steps.values_list("pk", flat=True))
    assert run.steps_used == 1 and ctx.run.steps_used == 1
    assert kinds(run) == ["run.queued", "run.running", "test.other_writer", "model.responded"]
    assert chain_verify(run.pk).intact


def test_a_commit_writes_the_steps_their_events_and_the_counters_together(make_task, operator):
    ctx = claimed(make_task, operator)

    steps = steps_commit(ctx, {"steps_used": 2}, [model_entry("one"), model_entry("two")])

    run = Run.objects.get(pk=ctx.run.pk)
    assert list(run.steps.order_by("number").values_list("number", "content")) == [
        (1, "one"),
        (2, "two"),
    ]
    assert [step.number for step in steps] == [1, 2] and ctx.steps == steps
    assert run.steps_used == 2 and ctx.run.steps_used == 2
    assert run.lease_owner == "worker-a" and run.lease_expires_at > ctx.run.started_at
    payloads = LineageEvent.objects.filter(run_uuid=run.pk, kind="model.responded")
    assert [e.payload["step"] for e in payloads.order_by("seq")] == [1, 2]
    assert chain_verify(run.pk).intact


@pytest.mark.django_db(transaction=True)
def test_each_agent_step_commits_twice(make_task, operator):
    # An agent step is a model turn asking for a call, and the call. Its commits: the
    # turn with the call started, then the call's outcome.
    calls = 4
    turns = [{"calls": [("test_echo", {"text": f"n{n}"})]} for n in range(calls)]
    task = make_task([*turns, {"content": "done"}], tools=["test_echo"], autonomy_level=3)
    run = run_start(task=task, run_input={}, user=operator)
    with database_counted(connection) as count:
        assert advance(run.pk) is Outcome.FINISHED
    run.refresh_from_db()
    assert run.steps.filter(kind="tool", status=StepStatus.SUCCEEDED).count() == calls
    # The rest: the claim, the plan's turn, the plan, the final answer with the run's end.
    assert count.commits == 2 * calls + 4


@pytest.mark.django_db(transaction=True)
def test_a_commit_that_meets_a_concurrent_append_is_made_by_the_transaction_path(
    make_task, operator, monkeypatch
):
    # Another transaction appends after the one-statement commit read the chain (which
    # its check of the head cannot see): the unique (run, seq) index refuses the commit
    # whole, and the transaction path makes it, reading the head afresh.
    from agentops.runtime import commits

    ctx = claimed(make_task, operator)
    before = lineage.head_hint(connection, ctx.run.pk)
    with transaction.atomic():
        event_append(run_uuid=ctx.run.pk, kind="test.concurrent", actor="other")
    lineage._heads.__dict__[connection.alias][ctx.run.pk] = before
    monkeypatch.setattr(commits, "head_guard", lambda db, run_uuid, head: lineage.SQL("TRUE", []))

    steps_commit(ctx, {"steps_used": 1}, [model_entry("after the race")])

    run = Run.objects.get(pk=ctx.run.pk)
    assert list(run.steps.values_list("content", flat=True)) == ["after the race"]
    assert run.steps_used == 1
    assert kinds(run) == ["run.queued", "run.running", "test.concurrent", "model.responded"]
    assert chain_verify(run.pk).intact


def test_an_outcome_for_a_step_no_longer_started_writes_nothing_in_one_statement(
    make_task, operator
):
    # On PostgreSQL the statement's fence requires the step to be 'started'; on SQLite
    # the one-statement commits do not apply. Either way: nothing written.
    from agentops.runtime import commits

    ctx = claimed(make_task, operator)
    entry = step_entry(event="tool.started", payload={}, kind=StepKind.TOOL, status="started")
    (step,) = steps_commit(ctx, {"steps_used": 1}, [entry])
    # Settled behind this worker's back, without moving the chain's head.
    Step.objects.filter(pk=step.pk).update(status=StepStatus.UNKNOWN)
    run_before = Run.objects.values("seconds_used", "lease_expires_at").get(pk=ctx.run.pk)
    events_before = kinds(ctx.run)

    written = commits.outcome_commit(
        run=ctx.run,
        owner=ctx.owner,
        lease_expires_at=timezone.now() + timedelta(hours=1),
        added={"seconds_used": 5.0},
        step=step,
        to=StepStatus.SUCCEEDED,
        fields={"result": {"late": True}},
        event=("tool.succeeded", "engine", {"step": step.number}),
    )

    assert written is False
    assert Run.objects.values("seconds_used", "lease_expires_at").get(pk=ctx.run.pk) == run_before
    assert Step.objects.get(pk=step.pk).status == StepStatus.UNKNOWN
    assert kinds(ctx.run) == events_before


def test_steps_get_their_ids_where_a_bulk_insert_cannot_return_them(
    make_task, operator, monkeypatch
):
    # SQLite before 3.35 (Debian 11, Ubuntu 20.04) returns no ids from a multi-row
    # INSERT; the record in memory needs them (approvals point at their step).
    monkeypatch.setattr(type(connection.features), "can_return_rows_from_bulk_insert", False)
    ctx = claimed(make_task, operator)
    with ctx.transaction():
        from agentops.runtime.engine import lease_fence, steps_add

        lease_fence(ctx, add={"steps_used": 2})
        steps = steps_add(ctx, model_entry("one"), model_entry("two"))

    assert all(step.pk for step in steps)
    assert [s.pk for s in steps] == list(
        Run.objects.get(pk=ctx.run.pk).steps.order_by("number").values_list("pk", flat=True)
    )
