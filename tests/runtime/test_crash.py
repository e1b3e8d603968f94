"""No side effect twice, proved with real processes.

A worker process (``manage.py qcluster``, or a plain process running the queue's job) is
killed with SIGKILL, its whole process group, at an exact point of a call: after the
tool step was committed ``started`` and before the call reached the far side; after the
far side made the effect and before its outcome was recorded; while a model request is
in flight. Then the dead worker's lease runs out and another worker recovers the run
from its record. The far side is tests/peers/sink.py, which counts effects per
``Idempotency-Key``; the tools and the scripted model are in tests/crash_tools.py.

Last, a worker that is not dead but slow: its lease lapses in the middle of a call.

The tools pause on files the test controls, so no hook in the engine is needed: the
test waits for ``<point>.reached``, kills, then creates ``<point>.release`` so that the
recovering worker passes the same point without stopping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from agentops.runtime.engine import Outcome
from agentops.runtime.scheduler import runs_reap
from approvals.models import Approval, ApprovalKind, ApprovalStatus
from approvals.services import approval_decide
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.models import (
    AutonomyLevel,
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Task,
    Tool,
    ToolGrant,
)
from tasks.services import run_start, tools_sync
from tests.conftest import run_until_rest
from tests.crash_tools import (
    AFTER_EFFECT,
    BEFORE_EFFECT,
    NO_PAUSE,
    attempts,
    reached_marker,
    release_marker,
)
from tests.peers.openai_server import completion
from tests.peers.sink import EffectSink
from tests.peers.workers import ROOT, q2_cluster, wait_for, worker_env

pytestmark = pytest.mark.django_db(transaction=True)

# A worker that does exactly what a django-q2 job does with the run's message.
ENGINE_WORKER = (
    "import sys, django; django.setup(); "
    "from agentops.runtime.engine.jobs import run_advance_job; "
    "print(run_advance_job(sys.argv[1]))"
)
REACH_SECONDS = 30.0  # a worker process starts, claims the run and gets to the point
FINISH_SECONDS = 30.0
HOLD_SECONDS = 30.0
MODEL = "test-model"
API_KEY = "test-key"


# Peers and processes -----------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[EffectSink]:
    with EffectSink() as sink:
        yield sink


@contextlib.contextmanager
def engine_worker(run: Run, log: Path, **env: str) -> Iterator[subprocess.Popen]:
    """A separate worker process advancing the run, in a process group of its own."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", ENGINE_WORKER, str(run.pk)],
            cwd=ROOT,
            env=worker_env(**env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:  # a test that failed before its kill
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def kill(worker: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group: no handler, no cleanup, no last write."""
    assert worker.poll() is None, "the worker ended before the test could kill it"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    assert worker.returncode == -signal.SIGKILL


def wait_while_alive(
    worker: subprocess.Popen, log: Path, condition: Callable[[], bool], *, what: str
) -> None:
    """Wait for ``condition``; a worker that dies first fails the test with its log."""

    def holds() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"the worker ended before {what}:\n{log.read_text()}")
        return condition()

    wait_for(holds, timeout=REACH_SECONDS, what=what)


def reach(worker: subprocess.Popen, log: Path, markers: Path, point: str) -> None:
    wait_while_alive(
        worker, log, reached_marker(markers, point).exists, what=f"the call to reach {point}"
    )


def release(markers: Path, point: str) -> None:
    release_marker(markers, point).touch()


# Records -----------------------------------------------------------------------------


@pytest.fixture
def crash_task(transactional_db) -> Callable[..., Task]:
    """An autonomous task granted one crash tool: its irreversible calls run unheld."""
    tools_sync()

    def make(tool_name: str, *, model: str = "scripted:crash-agent") -> Task:
        name = f"crash-{uuid.uuid4().hex[:8]}"
        task = Task.objects.create(
            slug=name,
            name=f"Crash test {name}",
            objective_template="Make the one call; it must never take effect twice.",
            model=model,
            autonomy_level=AutonomyLevel.AUTONOMOUS,
        )
        ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=tool_name))
        return task

    return make


def call_arguments(sink: EffectSink, markers: Path, pause: str) -> dict[str, str]:
    return {"sink": sink.url, "markers": str(markers), "pause": pause, "text": "pay 42 EUR"}


def crash_run(task: Task, user: User, tool_name: str, arguments: dict[str, str]) -> Run:
    """Start a run whose scripted agent makes this one call (see crash_tools.crash_agent)."""
    return run_start(task=task, run_input={"tool": tool_name, "arguments": arguments}, user=user)


def tool_step(run: Run) -> Step:
    return Step.objects.get(run=run, kind=StepKind.TOOL)


def status_of(run: Run) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=run.pk)


def lease_expire(run: Run) -> None:
    """Time passes: the lease of the worker holding the run runs out unrenewed (a dead
    worker cannot renew it), so another worker may claim the run."""
    expired = (
        Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING)
        .exclude(lease_owner="")
        .update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    )
    assert expired == 1, "a worker should still hold the run's lease"


def events(run: Run) -> list[str]:
    return list(
        LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq").values_list("kind", flat=True)
    )


# 1. Killed after the step was committed `started`, before the call reached the sink ----


def test_an_idempotent_call_killed_before_it_reached_the_far_side_is_made_once_on_recovery(
    crash_task, operator, sink, tmp_path
):
    task = crash_task("crash_charge")
    run = crash_run(task, operator, "crash_charge", call_arguments(sink, tmp_path, BEFORE_EFFECT))
    log = tmp_path / "worker.log"
    with engine_worker(run, log) as worker:
        reach(worker, log, tmp_path, BEFORE_EFFECT)
        step = tool_step(run)
        assert step.status == StepStatus.STARTED  # the ledger entry is committed first
        key = step.idempotency_key
        assert key == f"{run.pk}:{step.number}"
        kill(worker)
    assert sink.requests() == 0

    release(tmp_path, BEFORE_EFFECT)
    lease_expire(run)
    assert run_until_rest(run) is Outcome.FINISHED  # this process is the second worker

    assert run.status == RunStatus.SUCCEEDED, run.reason
    step.refresh_from_db()
    assert step.status == StepStatus.SUCCEEDED
    assert step.idempotency_key == key
    assert sink.effects(key) == 1
    assert sink.effects() == 1
    assert step.result == sink.first_answer(key)
    # The dead worker tried, the recovering one retried, both with the step's key.
    assert attempts(tmp_path) == [(worker.pid, key), (os.getpid(), key)]
    assert "run.recovered" in events(run)
    assert "tool.retried" in events(run)
    assert chain_verify(run.pk).intact


def test_a_non_idempotent_call_killed_before_it_was_made_is_not_made_again_until_a_person_says(
    crash_task, operator, sink, tmp_path
):
    task = crash_task("crash_send")
    run = crash_run(task, operator, "crash_send", call_arguments(sink, tmp_path, BEFORE_EFFECT))
    log = tmp_path / "worker.log"
    with engine_worker(run, log) as worker:
        reach(worker, log, tmp_path, BEFORE_EFFECT)
        assert tool_step(run).status == StepStatus.STARTED
        kill(worker)

    release(tmp_path, BEFORE_EFFECT)
    lease_expire(run)
    assert run_until_rest(run) is Outcome.WAITING

    # The recovering worker cannot know whether the call took effect: it does not fire.
    assert run.status == RunStatus.WAITING
    assert "the outcome of crash_send is unknown" in run.reason
    step = tool_step(run)
    assert step.status == StepStatus.UNKNOWN
    approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
    assert approval.kind == ApprovalKind.UNKNOWN_OUTCOME
    assert approval.step_id == step.pk
    assert sink.requests() == 0
    assert sink.effects() == 0
    assert len(attempts(tmp_path)) == 1  # only the dead worker's

    # A person checked the far side: it did not happen, so it is made, once.
    approval_decide(approval=approval, user=operator, approve=True, resolution="refire")
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert sink.effects(step.idempotency_key) == 1
    assert sink.effects() == 1
    assert chain_verify(run.pk).intact


# 2. Killed after the call took effect at the sink, before its result was committed ----


def test_a_killed_q2_worker_never_charges_twice_for_one_key_after_the_charge_took_effect(
    crash_task, operator, sink, tmp_path
):
    task = crash_task("crash_charge")
    first_log = tmp_path / "first-qcluster.log"
    with q2_cluster(first_log) as first:
        run = crash_run(
            task, operator, "crash_charge", call_arguments(sink, tmp_path, AFTER_EFFECT)
        )
        reach(first, first_log, tmp_path, AFTER_EFFECT)
        step = tool_step(run)
        key = step.idempotency_key
        assert sink.effects(key) == 1  # it took effect...
        assert step.status == StepStatus.STARTED  # ...and the record does not know it
        kill(first)

    release(tmp_path, AFTER_EFFECT)
    lease_expire(run)
    assert runs_reap() == [run.pk]  # the reaper hands the run to whichever worker is up
    second_log = tmp_path / "second-qcluster.log"
    with q2_cluster(second_log) as second:
        wait_while_alive(
            second,
            second_log,
            lambda: status_of(run) not in (RunStatus.QUEUED, RunStatus.RUNNING),
            what="the second worker to finish the run",
        )

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason
    step.refresh_from_db()
    assert step.status == StepStatus.SUCCEEDED
    # The retry reached the sink with the same key and was answered the first result.
    assert sink.requests(key) == 2
    assert sink.effects(key) == 1
    assert sink.effects() == 1
    assert step.result == sink.first_answer(key)
    (dead_pid, first_key), (live_pid, second_key) = attempts(tmp_path)
    assert first_key == second_key == key
    assert dead_pid != live_pid
    assert "tool.retried" in events(run)
    assert chain_verify(run.pk).intact


def test_a_non_idempotent_call_killed_after_it_took_effect_waits_for_a_person_never_sends_twice(
    crash_task, operator, sink, tmp_path
):
    task = crash_task("crash_send")
    run = crash_run(task, operator, "crash_send", call_arguments(sink, tmp_path, AFTER_EFFECT))
    log = tmp_path / "worker.log"
    with engine_worker(run, log) as worker:
        reach(worker, log, tmp_path, AFTER_EFFECT)
        step = tool_step(run)
        assert sink.effects(step.idempotency_key) == 1
        assert step.status == StepStatus.STARTED
        kill(worker)

    release(tmp_path, AFTER_EFFECT)
    lease_expire(run)
    assert run_until_rest(run) is Outcome.WAITING

    assert run.status == RunStatus.WAITING
    step.refresh_from_db()
    assert step.status == StepStatus.UNKNOWN
    approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
    assert approval.kind == ApprovalKind.UNKNOWN_OUTCOME
    assert sink.requests() == 1
    assert sink.effects() == 1

    # A person saw the message arrive: it happened, so it is recorded and not sent again.
    approval_decide(approval=approval, user=operator, approve=True, resolution="happened")
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason
    step.refresh_from_db()
    assert step.status == StepStatus.SUCCEEDED
    assert sink.requests() == 1
    assert sink.effects() == 1
    assert len(attempts(tmp_path)) == 1
    assert chain_verify(run.pk).intact


# 3. Killed while a model request is in flight ----------------------------------------


class HeldModelServer:
    """An OpenAI-compatible server on 127.0.0.1 whose answer is a function of the
    conversation (as a real model's is), and which holds the first request ``hold``
    picks open without an answer until ``release``: a model call in flight for as long
    as the test wants. Every request body is kept, the held one too."""

    def __init__(self, reply: Callable[[dict], dict], *, hold: Callable[[dict], bool]) -> None:
        self.requests: list[dict] = []
        self.held_index: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with lock:
                    server.requests.append(body)
                    holding = server.held_index is None and hold(body)
                    if holding:
                        server.held_index = len(server.requests) - 1
                if holding:
                    server.held.set()
                    server.release.wait(timeout=HOLD_SECONDS)
                    return  # no answer: the caller was killed while it waited
                if self.path == "/v1/chat/completions":
                    status, answer = 200, reply(body)
                else:
                    status, answer = 404, {"error": {"message": f"no route {self.path}"}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HeldModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def forced_tool(body: dict) -> str | None:
    choice = body.get("tool_choice")
    return choice.get("function", {}).get("name") if isinstance(choice, dict) else None


def charge_answered(body: dict) -> bool:
    """Whether the conversation holds the result of a crash_charge call."""
    charges = {
        call["id"]
        for message in body["messages"]
        if message["role"] == "assistant"
        for call in message.get("tool_calls") or ()
        if call["function"]["name"] == "crash_charge"
    }
    return any(
        message["role"] == "tool" and message["tool_call_id"] in charges
        for message in body["messages"]
    )


def charging_model(arguments: dict[str, str]) -> Callable[[dict], dict]:
    """A model that plans, charges once, then reports; it does what a forced tool choice
    (the plan, the self-check) asks."""

    def reply(body: dict) -> dict:
        forced = forced_tool(body)
        if forced == "plan_update":
            plan = {"steps": [{"title": "charge 42 EUR once"}, {"title": "report"}]}
            return completion(None, [("call_plan", "plan_update", plan)])
        if forced == "report_check":
            check = {"objective_met": True, "confidence": 0.99, "evidence": "charged once"}
            return completion(None, [("call_check", "report_check", check)])
        if not charge_answered(body):
            return completion("charging", [("call_charge", "crash_charge", arguments)])
        return completion("done: charged once")

    return reply


def test_a_worker_killed_during_a_model_call_is_recovered_by_asking_again_and_no_effect_repeats(
    crash_task, operator, sink, tmp_path, settings
):
    arguments = call_arguments(sink, tmp_path, NO_PAUSE)
    # Hold the model's next turn after the charge's result: the charge has taken effect
    # and is recorded; the turn after it is in flight when the worker dies.
    with HeldModelServer(charging_model(arguments), hold=charge_answered) as model:
        settings.OPENAI_BASE_URL = model.base_url
        settings.OPENAI_API_KEY = API_KEY
        task = crash_task("crash_charge", model=MODEL)
        run = run_start(task=task, run_input={}, user=operator)
        log = tmp_path / "worker.log"
        env = {"OPENAI_BASE_URL": model.base_url, "OPENAI_API_KEY": API_KEY}
        with engine_worker(run, log, **env) as worker:
            wait_while_alive(worker, log, model.held.is_set, what="the model call in flight")
            assert tool_step(run).status == StepStatus.SUCCEEDED
            assert sink.effects() == 1
            model_turns = run.steps.filter(kind=StepKind.MODEL).count()
            kill(worker)
        model.release.set()
        held = model.requests[model.held_index]

        lease_expire(run)
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.outcome == "done: charged once"
    # The recovering worker asked the same question again: the turn was never recorded.
    asked_again = model.requests[model.held_index + 1]
    assert asked_again["messages"] == held["messages"]
    assert run.steps.filter(kind=StepKind.MODEL).count() == model_turns + 1
    assert run.steps.filter(kind=StepKind.TOOL).count() == 1
    assert sink.requests() == 1
    assert sink.effects() == 1
    assert len(attempts(tmp_path)) == 1
    assert "run.recovered" in events(run)
    assert chain_verify(run.pk).intact


# A worker that outlives its lease in the middle of a call -----------------------------


def results_in_trail(run: Run) -> list[Any]:
    return [
        event.payload.get("result")
        for event in LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq")
    ]


def test_a_slow_worker_whose_lease_lapsed_mid_call_still_records_that_the_call_happened(
    crash_task, operator, sink, tmp_path
):
    task = crash_task("crash_send")
    run = crash_run(task, operator, "crash_send", call_arguments(sink, tmp_path, AFTER_EFFECT))
    log = tmp_path / "worker.log"
    with engine_worker(run, log) as slow:
        reach(slow, log, tmp_path, AFTER_EFFECT)
        key = tool_step(run).idempotency_key
        # The call outlasts the lease (AGENTOPS_LEASE_SECONDS): the worker is alive, but
        # to the others it looks dead, and one of them recovers the run. Today that marks
        # the call unknown and asks a person; a worker that renews its lease while the
        # call runs would keep the run instead (NOT_CLAIMED): either way, go on.
        lease_expire(run)
        run_until_rest(run)
        # Then the slow call returns, with the far side's answer.
        release(tmp_path, AFTER_EFFECT)
        slow.wait(timeout=FINISH_SECONDS)
    (answer,) = sink.answers(key)
    assert sink.effects() == 1

    # The call happened: whoever decides the unknown outcome must be able to see it.
    assert answer in results_in_trail(run), log.read_text()


# 4. Killed at the same call again and again ------------------------------------------


def test_a_run_whose_call_kills_every_worker_that_tries_it_is_halted_not_retried_forever(
    crash_task, operator, sink, tmp_path, settings
):
    # Two workers die at the same idempotent call; the third claim halts the run.
    settings.AGENTOPS_RECOVERY_LIMIT = 2
    task = crash_task("crash_charge")
    run = crash_run(task, operator, "crash_charge", call_arguments(sink, tmp_path, BEFORE_EFFECT))
    workers = []
    for attempt in (1, 2):
        log = tmp_path / f"worker-{attempt}.log"
        with engine_worker(run, log, AGENTOPS_RECOVERY_LIMIT="2") as worker:
            reach(worker, log, tmp_path, BEFORE_EFFECT)
            kill(worker)
        workers.append(worker)
        reached_marker(tmp_path, BEFORE_EFFECT).unlink()
        lease_expire(run)
        assert status_of(run) == RunStatus.RUNNING, log.read_text()

    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.HALTED
    step = tool_step(run)
    assert run.reason == (
        f"its worker stopped 2 times in a row at step {step.number}, with nothing "
        "recorded in between: halted rather than tried again (AGENTOPS_RECOVERY_LIMIT is 2)"
    )
    # The second worker retried the idempotent call with its key; nobody tried a third
    # time, and the far side never saw it.
    assert attempts(tmp_path) == [(w.pid, step.idempotency_key) for w in workers]
    # Its outcome is not known, and no worker will find out now.
    assert (
        step.status == StepStatus.UNKNOWN and "was in flight when the run was halted" in step.error
    )
    assert sink.requests() == 0
    assert events(run).count("run.recovered") == 2
    assert events(run)[-2:] == ["tool.unknown", "run.halted"]
    assert chain_verify(run.pk).intact
