"""`manage.py run_task`: start a run from the shell, and follow it to where it rests."""

from __future__ import annotations

import re
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from approvals.models import Approval, ApprovalStatus
from lineage.models import LineageEvent
from tasks.models import AutonomyLevel, Run, RunStatus, Task
from tests.peers.workers import ROOT, q2_cluster, worker_env

pytestmark = pytest.mark.django_db


def run_task(*args: str) -> tuple[int, str, str]:
    """Call the command as the shell would; return its exit code, stdout and stderr."""
    stdout, stderr = StringIO(), StringIO()
    try:
        call_command("run_task", *args, stdout=stdout, stderr=stderr)
    except SystemExit as exit:
        code = exit.code
    else:
        code = 0
    return code, stdout.getvalue(), stderr.getvalue()


def step_lines(out: str) -> list[tuple[int, str]]:
    """The progress lines about steps, as (number, what the line says of it)."""
    found = (STEP_LINE.fullmatch(line) for line in out.splitlines())
    return [(int(match["number"]), match["what"]) for match in found if match]


STEP_LINE = re.compile(r"  step (?P<number>\d+)/\d+  (?P<what>.*)")


def test_the_demo_run_inline_stops_at_its_approval_with_code_3(demo_task):
    code, out, err = run_task(demo_task.slug, "--input", '{"batch": "2026-11"}', "--inline")

    run = Run.objects.get()
    assert code == 3, out + err
    assert run.status == RunStatus.WAITING
    assert run.trigger_kind == "manual" and run.started_by is None
    lines = out.splitlines()
    assert lines[:2] == [
        f"Run {run.pk} of reconcile-invoices queued: /runs/{run.pk}/",
        "  run queued",
    ]
    # One line per step, in the order of the run's record.
    steps = step_lines(out)
    assert [number for number, _ in steps] == list(range(1, run.steps.count() + 1))
    assert steps[0][1].startswith("model succeeded: calls ")
    said = [what for _, what in steps]
    assert said.index("tool ledger_invoices succeeded") < said.index(
        "tool ledger_payments succeeded"
    )
    assert said[-1] == (
        "tool email_send proposed: held, Supervised: every irreversible call waits for a person"
    )
    assert lines[-2:] == [
        "  run waiting",
        "waiting for a person: approve email_send — decide at /approvals/",
    ]
    assert err == ""
    assert Approval.objects.get(run=run).status == ApprovalStatus.PENDING


def test_inline_with_wait_works_the_run_the_same_way(demo_task):
    code, out, _ = run_task(demo_task.slug, "--input", '{"batch": "2026-11"}', "--inline", "--wait")
    assert code == 3
    assert len(step_lines(out)) == Run.objects.get().steps.count()


def test_a_run_whose_script_finishes_exits_0_and_prints_the_outcome(make_task):
    task = make_task(
        [
            {"content": "Echo first.", "calls": [("test_echo", {"text": "hi"})], "tokens_in": 10},
            {"content": "All done: the echo said hi.", "tokens_in": 20, "tokens_out": 7},
        ],
        tools=["test_echo"],
    )
    code, out, err = run_task(task.slug, "--inline", "--wait")

    run = Run.objects.get()
    assert code == 0, out + err
    assert run.status == RunStatus.SUCCEEDED
    assert step_lines(out)[:3] == [
        (1, "model succeeded: calls test_echo  (tokens so far 10 in / 0 out)"),
        (2, "tool test_echo succeeded"),
        (3, "model succeeded: answers  (tokens so far 30 in / 7 out)"),
    ]
    assert out.splitlines()[-3:] == [
        "  run succeeded",
        f"succeeded in {run.steps_used} steps (tokens {run.tokens_in} in / {run.tokens_out} out):",
        "All done: the echo said hi.",
    ]
    assert err == ""


def test_a_run_that_halts_exits_1_with_the_reason(make_task):
    task = make_task([{"calls": [("test_echo", {"text": "hi"})]}], tools=["test_echo"], max_steps=1)
    code, out, err = run_task(task.slug, "--inline")

    assert code == 1, out + err
    assert Run.objects.get().status == RunStatus.HALTED
    assert err.strip() == "halted: step budget spent: 1 of 1 steps used"


def test_without_wait_the_run_is_only_queued(demo_task):
    code, out, _ = run_task(demo_task.slug, "--input", '{"batch": "2026-11"}')

    run = Run.objects.get()
    assert code == 0
    assert out == f"Run {run.pk} of reconcile-invoices queued: /runs/{run.pk}/\n"
    assert run.status == RunStatus.QUEUED and run.steps.count() == 0


def test_waiting_on_a_queue_with_no_worker_gives_up_at_the_timeout_with_code_2(demo_task):
    code, out, err = run_task(
        demo_task.slug, "--input", '{"batch": "2026-11"}', "--wait", "--timeout", "0.5"
    )

    run = Run.objects.get()
    assert code == 2
    assert out.splitlines()[1:] == ["  run queued"]
    assert err.strip() == (
        "gave up waiting after 0.5 s: the run is queued and goes on without this command; "
        f"follow it at /runs/{run.pk}/"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "{batch: 2026-11}"], "--input is not valid JSON: Expecting property name"),
        (["--input", '["2026-11"]'], "--input must be a JSON object"),
        (
            ["--input", '{"batch": "November"}'],
            "the run of reconcile-invoices did not start: the input does not match the "
            "task's schema",
        ),
        ([], "the input does not match the task's schema"),  # the batch is required
        (["--input", "{}", "--timeout", "0"], "--timeout must be a positive number"),
    ],
)
def test_bad_input_names_what_is_wrong_and_starts_nothing(demo_task, args, message):
    with pytest.raises(CommandError, match=message.replace("[", r"\[")):
        run_task(demo_task.slug, *args, "--wait")
    assert not Run.objects.exists()
    assert not LineageEvent.objects.exists()


def test_an_unknown_slug_lists_the_tasks_there_are(demo_task):
    with pytest.raises(CommandError) as raised:
        run_task("reconcile-invoice", "--input", '{"batch": "2026-11"}')
    assert str(raised.value) == (
        "no task has the slug 'reconcile-invoice' "
        "(tasks: reconcile-invoices, route-leads, triage-support)"
    )
    assert not Run.objects.exists()


def test_a_task_whose_model_is_not_configured_does_not_start(db, settings):
    settings.AGENTOPS_MODEL = ""
    Task.objects.create(slug="needs-a-model", name="Needs a model", objective_template="Work.")
    with pytest.raises(CommandError, match="did not start: No model is configured"):
        run_task("needs-a-model")
    assert not Run.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_command_follows_a_run_a_q2_worker_does_to_the_end(tmp_path, demo_task):
    # In Shadow mode the demo's email is recorded, not sent: nobody has to approve it.
    demo_task.autonomy_level = AutonomyLevel.SHADOW
    demo_task.save()
    log = tmp_path / "qcluster.log"
    with q2_cluster(log) as worker:
        command = [sys.executable, "manage.py", "run_task", demo_task.slug, "--wait"]
        command += ["--input", '{"batch": "2026-11"}', "--timeout", "60"]
        result = subprocess.run(
            command, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=90
        )
        assert worker.poll() is None, log.read_text()

    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
    assert "Enqueued" not in result.stderr  # the command says it, once, on stdout
    run = Run.objects.get()
    assert run.status == RunStatus.SUCCEEDED
    assert result.stdout.startswith(f"Run {run.pk} of reconcile-invoices queued: /runs/{run.pk}/\n")
    # Every step is shown, though a worker made them; a step seen in two states (a tool
    # call started, then succeeded) gets a line for each, in order.
    steps = step_lines(result.stdout)
    assert [number for number, _ in steps] == sorted(number for number, _ in steps)
    final = dict(steps)  # each step's last line
    assert list(final) == list(range(1, run.steps.count() + 1))
    assert "tool ledger_invoices succeeded" in final.values()
    assert "tool email_send simulated: recorded, not made (Shadow)" in final.values()
    assert result.stdout.endswith(
        "  run succeeded\n"
        f"succeeded in {run.steps_used} steps (tokens {run.tokens_in} in / {run.tokens_out} out):\n"
        f"{run.outcome}\n"
    )
