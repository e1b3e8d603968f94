"""The autonomy dial: a second person to raise it, the track record, steps down."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from approvals.models import Approval
from approvals.services import approval_decide
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.autonomy import (
    DialError,
    autonomy_decide,
    autonomy_request,
    incident_flag,
    recommendation,
    task_trail_uuid,
    track_record,
)
from tasks.models import AutonomyChange, Task
from tasks.services import run_start
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def editor(username: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.com", "pw-123456789")
    for codename in ("change_task", "decide_approval", "add_incident"):
        user.user_permissions.add(
            Permission.objects.get(
                codename=codename, content_type__app_label__in=["tasks", "approvals"]
            )
        )
    return User.objects.get(pk=user.pk)


def test_raising_above_supervised_waits_for_a_second_person(make_task):
    task = make_task([])
    alice, bob = editor("alice"), editor("bob")
    change = autonomy_request(task=task, to_level=2, user=alice, reason="clean record")
    task.refresh_from_db()
    assert change.status == AutonomyChange.Status.PENDING and task.autonomy_level == 1
    with pytest.raises(DialError, match="a second person must confirm"):
        autonomy_decide(change=change, user=alice, confirm=True)
    autonomy_decide(change=change, user=bob, confirm=True)
    task.refresh_from_db()
    assert task.autonomy_level == 2
    assert task.versions.order_by("-number").first().definition["autonomy_level"] == 2
    kinds = list(
        LineageEvent.objects.filter(run_uuid=task_trail_uuid(task))
        .order_by("seq")
        .values_list("kind", flat=True)
    )
    assert kinds == ["autonomy.requested", "autonomy.changed"]
    assert chain_verify(task_trail_uuid(task)).intact


def test_lowering_the_dial_takes_effect_at_once(make_task):
    task = make_task([], autonomy_level=3)
    change = autonomy_request(task=task, to_level=1, user=editor("alice"), reason="incident review")
    task.refresh_from_db()
    assert change.status == AutonomyChange.Status.APPLIED and task.autonomy_level == 1


def test_turning_the_dial_down_holds_the_next_call_of_a_run_already_going(make_task, operator):
    from agentops.runtime.engine import Outcome, advance
    from tasks.models import RunStatus, StepStatus
    from tests.agent_tools import EFFECTS

    turns = [{"calls": [("test_send", {"text": text})]} for text in ("one", "two")]
    task = make_task([*turns, {"content": "done"}], tools=["test_send"], autonomy_level=3)
    run = run_start(task=task, run_input={}, user=operator)
    # Slice by slice (each ends after one step) until the first send was made.
    while not run.steps.filter(kind="tool", status=StepStatus.SUCCEEDED).exists():
        assert advance(run.pk, max_seconds=1e-6) is Outcome.YIELDED
    assert EFFECTS == {"send:one": 1}

    autonomy_request(task=task, to_level=1, user=editor("alice"), reason="an incident")

    assert run_until_rest(run) is Outcome.WAITING
    assert run.status == RunStatus.WAITING
    approval = Approval.objects.get(run=run)
    assert approval.arguments == {"text": "two"}
    assert approval.gate == (
        "Supervised: every irreversible call waits for a person "
        "(the dial was turned down after this run started)"
    )
    assert EFFECTS == {"send:one": 1}  # the second send waits for a person


def test_a_run_already_going_is_held_not_simulated_when_the_dial_goes_to_shadow(
    make_task, operator
):
    from agentops.runtime.engine import Outcome
    from tests.agent_tools import EFFECTS

    task = make_task(
        [{"calls": [("test_send", {"text": "one"})]}, {"content": "done"}],
        tools=["test_send"],
        autonomy_level=3,
    )
    run = run_start(task=task, run_input={}, user=operator)
    Task.objects.filter(pk=task.pk).update(autonomy_level=0)

    assert run_until_rest(run) is Outcome.WAITING
    assert Approval.objects.get(run=run).gate.startswith("Supervised: every irreversible call")
    assert not run.steps.filter(status="simulated").exists()
    assert EFFECTS == {}


def test_turning_the_dial_up_does_not_free_a_run_already_going(make_task, operator):
    from agentops.runtime.engine import Outcome

    task = make_task(
        [{"calls": [("test_send", {"text": "one"})]}, {"content": "done"}],
        tools=["test_send"],
        autonomy_level=1,
    )
    run = run_start(task=task, run_input={}, user=operator)
    Task.objects.filter(pk=task.pk).update(autonomy_level=3)

    assert run_until_rest(run) is Outcome.WAITING
    assert Approval.objects.get(run=run).gate == (
        "Supervised: every irreversible call waits for a person"
    )


def test_moving_the_dial_withdraws_the_requests_it_made_stale(make_task):
    task = make_task([])
    alice, bob = editor("alice"), editor("bob")
    raise_to_3 = autonomy_request(task=task, to_level=3, user=alice, reason="trusted")
    autonomy_request(task=task, to_level=0, user=bob, reason="incident")
    raise_to_3.refresh_from_db()
    assert raise_to_3.status == AutonomyChange.Status.WITHDRAWN
    # Back where it was asked from, the old request stays closed.
    autonomy_request(task=task, to_level=1, user=bob, reason="reviewed")
    with pytest.raises(DialError, match="already withdrawn"):
        autonomy_decide(change=raise_to_3, user=bob, confirm=True)
    assert Task.objects.get(pk=task.pk).autonomy_level == 1
    changed = LineageEvent.objects.filter(
        run_uuid=task_trail_uuid(task), kind="autonomy.changed"
    ).first()
    assert changed.payload["withdrawn"] == [raise_to_3.pk]


def test_a_newer_request_replaces_a_pending_one(make_task):
    task = make_task([])
    alice, bob = editor("alice"), editor("bob")
    first = autonomy_request(task=task, to_level=2, user=alice, reason="clean record")
    second = autonomy_request(task=task, to_level=3, user=alice, reason="cleaner still")
    first.refresh_from_db()
    assert first.status == AutonomyChange.Status.WITHDRAWN
    autonomy_decide(change=second, user=bob, confirm=True)
    assert Task.objects.get(pk=task.pk).autonomy_level == 3


def test_a_request_left_pending_after_the_dial_moved_can_be_declined_not_confirmed(make_task):
    task = make_task([])
    bob = editor("bob")
    # As a request made before requests were withdrawn when the dial moves.
    stale = AutonomyChange.objects.create(
        task=task, from_level=0, to_level=3, reason="old", requested_by=editor("alice")
    )
    with pytest.raises(DialError, match="the dial moved since this was asked"):
        autonomy_decide(change=stale, user=bob, confirm=True)
    autonomy_decide(change=stale, user=bob, confirm=False)
    stale.refresh_from_db()
    assert stale.status == AutonomyChange.Status.DECLINED


@pytest.mark.parametrize("level", ["abc", "7", ""])
def test_a_level_the_dial_does_not_have_is_refused_with_its_levels(make_task, client, level):
    task = make_task([])
    client.force_login(editor("alice"))
    response = client.post(
        reverse("tasks:autonomy", args=[task.slug]), {"level": level, "reason": "x"}, follow=True
    )
    page = response.content.decode()
    assert "The dial did not move: choose one of its levels: 0 · Shadow" in page
    assert "invalid literal" not in page and "AutonomyLevel" not in page
    assert not AutonomyChange.objects.exists()


def test_turning_the_dial_through_the_task_page(make_task, client):
    task = make_task([])
    alice, bob = editor("alice"), editor("bob")
    client.force_login(alice)
    response = client.post(
        reverse("tasks:autonomy", args=[task.slug]),
        {"level": "3", "reason": "trusted"},
        follow=True,
    )
    assert "a second person must confirm it" in response.content.decode()
    change = AutonomyChange.objects.get()
    other = Client()
    other.force_login(bob)
    other.post(reverse("tasks:autonomy_decide", args=[change.pk]), {"decision": "confirm"})
    assert Task.objects.get(pk=task.pk).autonomy_level == 3
    response = client.post(
        reverse("tasks:autonomy", args=[task.slug]), {"level": "3", "reason": "again"}, follow=True
    )
    assert "already at 3 · Autonomous" in response.content.decode()


@pytest.mark.parametrize(
    ("level", "threshold", "says"),
    [
        (1, 0.7, "1 · Supervised</strong>: Read-only calls run, except calls of tools marked"),
        (
            2,
            0.7,
            "2 · Guarded</strong>: Read-only calls and reversible calls the agent is at least "
            "0.70 confident in run, except calls of tools marked 'always approve' and calls a "
            "rule holds; irreversible calls wait for a person.",
        ),
        (2, 0.0, "2 · Guarded</strong>: Read-only calls and reversible calls run, except"),
        (3, 0.7, "3 · Autonomous</strong>: Every call runs, except calls of tools marked"),
    ],
)
def test_the_dial_says_what_runs_without_a_person_at_its_level(
    make_task, client, level, threshold, says
):
    task = make_task([], autonomy_level=level, confidence_threshold=threshold)
    client.force_login(editor("alice"))
    page = client.get(reverse("tasks:detail", args=[task.slug])).content.decode()
    assert says.replace("'", "&#x27;") in page


def test_someone_without_the_permission_cannot_turn_the_dial(make_task, client, outsider):
    task = make_task([])
    client.force_login(outsider)
    response = client.post(
        reverse("tasks:autonomy", args=[task.slug]), {"level": "1", "reason": "x"}
    )
    assert response.status_code == 403


def test_the_record_and_its_recommendation(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "x"})]}, {"content": "ok"}],
        tools=["test_send"],
        self_check=False,
    )
    for _ in range(3):
        run = run_start(task=task, run_input={}, user=operator)
        run_until_rest(run)
        approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
        run_until_rest(run)
    record = track_record(task)
    assert (record.approved_as_proposed, record.streak, record.runs_succeeded) == (3, 3, 3)
    assert recommendation(task, record) == (
        "stay at 1 · Supervised: 37 more approvals approved as proposed in a row make it "
        "eligible for 2 · Guarded"
    )


def test_rejections_step_the_dial_down_by_themselves(make_task, operator):
    task = make_task(
        [{"calls": [("test_send", {"text": "x"})]}, {"content": "ok"}],
        tools=["test_send"],
        autonomy_level=3,
        step_down_rejections=2,
        self_check=False,
    )
    from tasks.models import Tool

    Tool.objects.filter(name="test_send").update(always_approve=True)
    for number in range(2):
        run = run_start(task=task, run_input={}, user=operator)
        run_until_rest(run)
        approval_decide(
            approval=Approval.objects.get(run=run),
            user=operator,
            approve=False,
            reason=f"no {number}",
        )
    task.refresh_from_db()
    assert task.autonomy_level == 2
    change = AutonomyChange.objects.get(task=task)
    assert change.requested_by is None
    assert change.reason == "2 of the last 2 decided actions were rejected"


def test_an_incident_steps_the_dial_down_and_is_in_the_runs_trail(make_task, operator):
    task = make_task([{"content": "done"}], autonomy_level=2)
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    incident_flag(run=run, user=editor("alice"), note="emailed the wrong customer")
    task.refresh_from_db()
    assert task.autonomy_level == 1
    assert LineageEvent.objects.filter(run_uuid=run.pk, kind="incident.flagged").exists()
    assert recommendation(task, track_record(task)).startswith(
        "stay at 1 · Supervised: an incident"
    )


def test_an_incident_is_flagged_on_a_finished_run_only(make_task, operator):
    task = make_task([{"calls": [("test_send", {"text": "x"})]}], tools=["test_send"])
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    with pytest.raises(DialError, match="the run is still waiting: cancel it first"):
        incident_flag(run=run, user=editor("alice"), note="odd")
