"""Replaying a run (agentops.runtime.replay, ``manage.py replay_run``): the engine driven
again over a run's record reaches the same decisions, or names the first that differs,
and fires nothing, keeps nothing, changes nothing of the original."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core import mail
from django.core.management import CommandError, call_command

from agentops.runtime.engine import Outcome
from agentops.runtime.models import SCRIPTS, ModelError, ModelTurn
from agentops.runtime.models.scripted import scripted_turn
from agentops.runtime.replay import ReplayRefused, run_replay
from approvals.models import Approval
from approvals.services import approval_decide
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.models import Run, RunStatus, Step, StepKind, Task, TaskVersion, Tool
from tasks.services import run_cancel, run_start
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest
from tests.peers.http_service import HttpService

pytestmark = pytest.mark.django_db


def replay_said(run: Run, *arguments: str) -> tuple[int, str]:
    """``manage.py replay_run RUN``: its exit status and what it printed."""
    out = StringIO()
    try:
        call_command("replay_run", str(run.pk), *arguments, stdout=out)
    except SystemExit as stop:
        return stop.code, out.getvalue()
    return 0, out.getvalue()


def everything() -> dict:
    """Every row a replay could leave, and the original's trail as it stands."""
    return {
        "runs": list(Run.objects.order_by("pk").values()),
        "steps": list(Step.objects.order_by("pk").values()),
        "approvals": list(Approval.objects.order_by("pk").values()),
        "events": list(LineageEvent.objects.order_by("pk").values_list("run_uuid", "seq", "hash")),
        "tasks": list(Task.objects.order_by("pk").values()),
    }


def finished(make_task, operator, turns: list[dict], **fields) -> Run:
    task = make_task(turns, **fields)
    run = run_start(task=task, run_input={"batch": "2026-11"}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    return run


def test_a_finished_run_replays_the_same_and_fires_nothing(
    make_task, operator, django_capture_on_commit_callbacks
):
    run = finished(
        make_task,
        operator,
        [
            {"content": "look", "calls": [("test_echo", {"text": "a"})]},
            {"content": "note it", "calls": [("test_note", {"text": "b", "_confidence": 0.9})]},
            {"content": "all done"},
        ],
        tools=["test_echo", "test_note"],
        autonomy_level=2,
    )
    assert run.status == RunStatus.SUCCEEDED
    assert EFFECTS == {"echo:a": 1, "note:b": 1}
    before = everything()

    with django_capture_on_commit_callbacks() as handed_on:
        status, said = replay_said(run)

    assert status == 0, said
    assert "Same decisions: all 7 match" in said and "succeeded" in said
    assert EFFECTS == {"echo:a": 1, "note:b": 1}  # no tool ran again
    assert handed_on == []  # no queue message, notice or seal was left to follow
    assert everything() == before
    assert chain_verify(run.pk).intact


def test_the_demo_run_replays_the_same_and_sends_no_second_email(demo_task, operator, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    run = run_start(task=demo_task, run_input={"batch": "2026-11"}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and len(mail.outbox) == 1
    before = everything()

    status, said = replay_said(run)

    assert status == 0, said
    assert "Same decisions: all 13 match" in said
    assert len(mail.outbox) == 1  # the email to finance was not sent again
    assert everything() == before


def test_the_json_report_says_the_same_for_machines(make_task, operator):
    run = finished(
        make_task, operator, [{"calls": [("test_echo", {"text": "a"})]}, {"content": "ok"}],
        tools=["test_echo"],
    )  # fmt: skip
    status, said = replay_said(run, "--json")
    report = json.loads(said)
    assert status == 0
    assert report["same"] is True and report["difference"] is None
    assert report["run"] == str(run.pk) and report["task_version"] == run.task_version.number
    assert report["original_end"] == report["replay_end"] == {"status": "succeeded", "reason": ""}


def test_a_call_to_a_local_http_service_is_not_made_again(make_task, operator):
    with HttpService() as service:
        tool = Tool.objects.create(
            name="http_replayed",
            kind=Tool.Kind.HTTP,
            side_effect="reversible",
            input_schema={"type": "object"},
            timeout_seconds=5.0,
            config={
                "method": "POST",
                "url": service.url + "/items/7",
                "allowed_hosts": ["127.0.0.1"],
                "allow_private": True,
            },
        )
        run = finished(
            make_task, operator, [{"calls": [(tool.name, {})]}, {"content": "posted"}],
            tools=[tool.name], autonomy_level=3,
        )  # fmt: skip
        assert service.hits() == 1
        recorded = run.steps.get(kind=StepKind.TOOL).result

        report = run_replay(run=run)

        assert report.same, report
        assert service.hits() == 1  # the replay answered from the record
    assert run.steps.get(kind=StepKind.TOOL).result == recorded


def test_an_altered_tool_result_differs_at_the_step_it_changes(make_task, operator):
    # Three notes of the same text: each result holds its own idempotency key, so the
    # calls are not a loop. Altered to one same result, they are: the engine halts.
    run = finished(
        make_task,
        operator,
        [
            {"calls": [("test_note", {"text": "x", "_confidence": 0.9})]},
            {"calls": [("test_note", {"text": "x", "_confidence": 0.9})]},
            {"calls": [("test_note", {"text": "x", "_confidence": 0.9})]},
            {"content": "noted thrice"},
        ],
        tools=["test_note"],
        autonomy_level=2,
    )
    assert run.status == RunStatus.SUCCEEDED
    Step.objects.filter(run=run, kind=StepKind.TOOL).update(result={"noted": "x", "key": "same"})

    status, said = replay_said(run)

    assert status == 1
    assert "Differs at step 7" in said
    assert "original: the model gave its final answer" in said
    assert "replay:   halted: " in said and "loop: test_note was called 3 times" in said
    assert EFFECTS == {"note:x": 3}
    report = run_replay(run=run)
    assert report.difference.step == 7 and report.replay_end["status"] == RunStatus.HALTED


def test_recorded_arguments_that_differ_from_the_models_call_stop_the_replay_there(
    make_task, operator
):
    run = finished(
        make_task,
        operator,
        [
            {"calls": [("test_echo", {"text": "a"})]},
            {"calls": [("test_send", {"text": "b"})]},
            {"content": "done"},
        ],
        tools=["test_echo", "test_send"],
        autonomy_level=3,
    )
    assert EFFECTS == {"echo:a": 1, "send:b": 1}
    Step.objects.filter(run=run, number=4).update(arguments={"text": "c"})

    report = run_replay(run=run)

    assert not report.same
    assert report.difference.step == 4
    assert report.difference.original == 'test_send {"text":"c"}, succeeded'
    assert report.difference.replay == 'test_send {"text":"b"}, failed'

    assert report.replay_end["status"] == "stopped"
    assert "that the original did not make there" in report.replay_end["reason"]
    assert EFFECTS == {"echo:a": 1, "send:b": 1}  # test_send was not called for "b" again


def test_a_version_whose_rules_now_hold_a_call_differs_at_that_call(make_task, operator):
    run = finished(
        make_task,
        operator,
        [
            {"calls": [("test_pay", {"amount": 50, "to": "acme", "_confidence": 0.9})]},
            {"content": "paid"},
        ],
        tools=["test_pay"],
        autonomy_level=2,
    )
    assert EFFECTS == {"pay:acme:50": 1}
    version = run.task_version
    version.definition["rules"] = {
        "test_pay": [{"expression": "args.amount > 10", "effect": "approve", "description": ""}]
    }
    TaskVersion.objects.filter(pk=version.pk).update(definition=version.definition)
    approvals = Approval.objects.count()

    status, said = replay_said(run)

    assert status == 1
    assert "Differs at step 2" in said
    assert (
        'original: test_pay {"amount":50,"to":"acme"}, succeeded' in said and ", succeeded" in said
    )
    assert "held at the gate" in said and "asked a person (action)" in said
    assert "the replay ended waiting" in said
    assert Approval.objects.count() == approvals  # the replay's question was not kept
    assert EFFECTS == {"pay:acme:50": 1}


@pytest.mark.parametrize(
    ("decision", "last"),
    [
        ({"approve": True}, "sent"),
        ({"approve": True, "arguments": {"text": "hi, edited"}}, "sent"),
        ({"approve": False, "reason": "not to everyone"}, "understood"),
    ],
)
def test_a_run_a_person_decided_replays_their_decision(make_task, operator, decision, last):
    task = make_task(
        [{"calls": [("test_send", {"text": "hi all"})]}, {"content": last}], tools=["test_send"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval_decide(approval=Approval.objects.get(run=run), user=operator, **decision)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED and run.outcome == last
    made = dict(EFFECTS)
    before = everything()

    report = run_replay(run=run)

    assert report.same, report
    assert dict(EFFECTS) == made  # the approved send was not sent again
    assert everything() == before
    assert mail.outbox == []


def test_a_run_cancelled_while_it_waited_replays_to_where_it_was_cancelled(make_task, operator):
    task = make_task([{"calls": [("test_send", {"text": "hi"})]}], tools=["test_send"])
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    run_cancel(run=run, user=operator, why="wrong batch")
    run.refresh_from_db()

    report = run_replay(run=run)

    assert report.same, report
    assert report.replay_end == {"status": "cancelled", "reason": run.reason}
    assert "cancelled by a person" in report.notes[0]


def test_a_gate_the_replay_no_longer_meets_is_a_difference(make_task, operator):
    # The original's question was about test_send; with test_send now read-only, the
    # replay runs the call without asking anyone.
    task = make_task(
        [{"calls": [("test_send", {"text": "hi"})]}, {"content": "ok"}], tools=["test_send"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
    run_until_rest(run)
    Tool.objects.filter(name="test_send").update(side_effect="read")

    report = run_replay(run=run)

    assert report.difference.step == 2
    assert "held at the gate" in report.difference.original
    assert "held at the gate" not in report.difference.replay
    assert EFFECTS == {"send:hi": 1}


@pytest.mark.parametrize("transient", [False, True])
def test_a_run_that_failed_on_its_model_meets_the_same_failure(
    make_task, operator, settings, transient
):
    settings.AGENTOPS_MODEL_BACKOFF_SECONDS = 0.0
    task = make_task([], tools=["test_echo"])
    answers = iter([scripted_turn({"calls": [("test_echo", {"text": "a"})]}, 0)])

    def play(messages: list[dict]) -> ModelTurn:
        turn = next(answers, None)
        if turn is None:
            raise ModelError("the server said no", transient=transient)
        return turn

    SCRIPTS[task.slug] = play
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.FAILED and "the server said no" in run.reason
    assert ("tried 3 times" in run.reason) is transient

    report = run_replay(run=run)

    assert report.same, report
    assert report.replay_end == {"status": "failed", "reason": run.reason}


def test_a_live_run_or_one_without_steps_is_refused(make_task, operator):
    task = make_task([{"calls": [("test_send", {"text": "hi"})]}], tools=["test_send"])
    queued = run_start(task=task, run_input={}, user=operator)
    with pytest.raises(CommandError, match="is queued: only a run that has ended"):
        call_command("replay_run", str(queued.pk), stdout=StringIO())
    run_until_rest(queued)
    with pytest.raises(ReplayRefused, match="is waiting"):
        run_replay(run=queued)

    stepless = run_start(task=task, run_input={}, user=operator)
    run_cancel(run=stepless, user=operator)
    with pytest.raises(CommandError, match="has no steps: there is nothing to replay"):
        call_command("replay_run", str(stepless.pk), stdout=StringIO())


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("00000000-0000-4000-8000-000000000000", "there is no run 00000000-0000-4000-8000"),
        ("not-a-uuid", "'not-a-uuid' is not a run's UUID"),
        ("\x1b[31m\x00", "'\\\\u001b[31m\\\\u0000' is not a run's UUID"),
    ],
)
def test_an_unknown_run_is_a_clear_error(given, said):
    with pytest.raises(CommandError) as raised:
        call_command("replay_run", given, stdout=StringIO())
    assert said in str(raised.value)
