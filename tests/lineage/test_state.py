"""The run's state as of an event, folded from the trail alone (lineage.state): the same
as the engine left the Run row, at every point of a real run, and never thrown by a
trail someone changed by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction

from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from lineage.models import UNREADABLE, LineageEvent
from lineage.services import events_append
from lineage.state import CONVERSATION_KEPT, TEXT_KEPT, TrailEvent, state_at
from tasks.models import Run
from tasks.services import run_start
from tests.conftest import run_until_rest

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


def trail(run_uuid: uuid.UUID) -> list[TrailEvent]:
    return [
        TrailEvent(seq=e.seq, kind=e.kind, actor=e.actor, at=e.at, body=e.body)
        for e in LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq")
    ]


def demo_run(task, user) -> Run:
    """The demo task's run, from start to end, with its one approval approved."""
    run = run_start(task=task, run_input={"batch": "2026-11"}, user=user)
    run_until_rest(run)
    approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
    approval_decide(approval=approval, user=user, approve=True)
    run_until_rest(run)
    return run


def seq_of(events: list[TrailEvent], kind: str) -> int:
    return next(event.seq for event in events if event.kind == kind)


def event(seq: int, kind: str, body, *, seconds: float = 0, actor: str = "engine"):
    return TrailEvent(
        seq=seq, kind=kind, actor=actor, at=T0 + timedelta(seconds=seconds), body=body
    )


@pytest.mark.django_db
def test_the_state_at_the_end_is_what_the_run_row_holds(demo_task, operator, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    run = demo_run(demo_task, operator)
    state = state_at(trail(run.pk))
    assert state.status == run.status == "succeeded"
    assert state.plan == [{"title": s["title"], "status": s["status"]} for s in run.plan]
    assert state.plan_version == 3
    assert state.budget.steps == run.steps_used == 12
    assert state.budget.tokens_in == run.tokens_in and state.budget.tokens_out == run.tokens_out
    assert state.budget.spend == run.spend
    assert state.approvals == [] and state.calls_in_flight == []
    assert state.conversation[0].role == "objective"
    assert state.conversation[-1].role == "check"
    assert "3 mismatches" in state.conversation[-2].text  # the final answer


@pytest.mark.django_db
def test_the_state_in_the_middle_is_the_state_then(demo_task, operator, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    run = demo_run(demo_task, operator)
    events = trail(run.pk)

    asked = seq_of(events, "approval.requested")
    waiting = state_at(events[:asked])
    assert [item.tool for item in waiting.approvals] == ["email_send"]
    assert waiting.approvals[0].approval == Approval.objects.get(run=run).pk
    assert "finance@example.com" in waiting.approvals[0].arguments
    assert waiting.limits == {"steps": "20"}
    assert waiting.plan_version == 2 and waiting.plan[3]["status"] == "doing"
    assert waiting.budget.steps == 8
    assert waiting.status == "running"  # run.waiting is the next event

    approved = seq_of(events, "approval.approved")
    assert state_at(events[:approved]).approvals == []

    first_call = seq_of(events, "tool.started")
    in_flight = state_at(events[:first_call])
    assert in_flight.calls_in_flight == [(3, "ledger_invoices")]
    assert in_flight.plan_version == 1
    assert in_flight.budget.tokens == 460
    assert state_at(events[: first_call + 1]).calls_in_flight == []
    assert state_at(events[: first_call + 1]).conversation[-1].title == "ledger_invoices returned"


def test_time_running_counts_only_while_running():
    events = [
        event(1, "run.queued", {"objective": "x"}),
        event(2, "run.running", {"from": "queued"}, seconds=10),
        event(3, "model.responded", {"content": "hi", "step": 1}, seconds=13),
        event(4, "run.waiting", {"from": "running"}, seconds=15),
        event(5, "run.queued", {"from": "waiting"}, seconds=100),
        event(6, "run.running", {"from": "queued"}, seconds=101),
        event(7, "run.succeeded", {"from": "running"}, seconds=103.5),
    ]
    assert state_at(events[:3]).budget.seconds == 3.0  # up to the event selected
    assert state_at(events[:5]).budget.seconds == 5.0  # waiting does not count
    assert state_at(events).budget.seconds == 7.5
    assert state_at(events).status == "succeeded"


def test_a_closed_approval_leaves_and_a_reassigned_one_stays_with_a_note():
    events = [
        event(1, "approval.requested", {"approval": 4, "kind": "action", "tool": "send"}),
        event(2, "approval.requested", {"approval": 5, "kind": "question"}),
        event(3, "approval.reassigned", {"approval": 5}, actor="user:vic"),
        event(4, "approval.rejected", {"approval": 4, "reason": "no"}),
    ]
    state = state_at(events)
    assert [item.approval for item in state.approvals] == [5]
    assert state.approvals[0].notes == ["reassigned by user:vic (#3)"]


def test_the_conversation_keeps_its_latest_entries_and_cuts_long_text():
    events = [event(n, "human.feedback", {"content": f"say {n}"}) for n in range(1, 31)]
    events.append(event(31, "tool.succeeded", {"tool": "t", "result": "x" * (TEXT_KEPT + 5)}))
    state = state_at(events)
    assert len(state.conversation) == CONVERSATION_KEPT
    assert state.conversation_earlier == 31 - CONVERSATION_KEPT
    assert state.conversation[0].text == "say 12"
    assert len(state.conversation[-1].text) == TEXT_KEPT and state.conversation[-1].clipped == 5


@pytest.mark.parametrize(
    "body",
    [
        UNREADABLE,
        None,
        [1, 2],
        {"step": 10**40, "tokens_in": 10**400, "tokens_out": True, "cost": "1e999999999"},
        {"steps": "not a list", "version": -1},
        {"steps": [None, 5, {"title": {"a": 1}, "status": 7}]},
        {"tool_calls": [None, {"name": 3, "arguments": "[" * 100_000}]},
        {"approval": "1", "kind": ["x"]},
        {"approval": 1, "context": {"budgets": {"steps": {"limit": 5}}}},
        {"content": "nul\x00 and \ud800", "question": {"x": "\ud800"}},
    ],
)
def test_a_body_of_the_wrong_shape_is_left_out_never_raised(body):
    kinds = [
        "run.queued",
        "plan.drafted",
        "model.responded",
        "tool.succeeded",
        "tool.started",
        "approval.requested",
        "question.asked",
        "human.feedback",
        "check.reported",
        "run.running",
        "run.succeeded",
    ]
    state = state_at([event(n, kind, body) for n, kind in enumerate(kinds, start=1)])
    assert state.seq == len(kinds)
    assert state.budget.tokens < 10**15 and state.budget.spend == Decimal(0)
    for entry in state.conversation:
        entry.text.encode()  # a page can carry every text: no lone surrogate, no NUL
        assert "\x00" not in entry.text


@pytest.mark.django_db
def test_the_state_reads_the_payload_as_hashed():
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("model.responded", "engine", {"step": 1, "content": "a\x00b", "cost": "0.25"}),
                ("model.responded", "engine", {"step": 2, "cost": "0.50", "tokens_in": 7}),
            ],
        )
    state = state_at(trail(run_uuid))
    assert state.budget.spend == Decimal("0.75") and state.budget.tokens_in == 7
    assert state.conversation[0].text == "a\\u0000b"
