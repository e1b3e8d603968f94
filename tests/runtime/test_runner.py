"""The async worker: runs waiting on a model hold no thread, process or connection of
their own; one worker keeps many in flight; every guarantee of the inline engine holds.

Against a real OpenAI-compatible server on loopback whose answers take a set time, so
many model calls are out at once; the runs are worked by a real ``Runner`` in this
process (an engine thread and an I/O thread), as a queue worker process would."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import transaction
from django.utils import timezone

from agentops.runtime.engine import waits
from agentops.runtime.engine.jobs import run_advance_job
from agentops.runtime.engine.runner import LOOKUP_THREADS, Runner
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus, Task, Tool
from tasks.services import run_start
from tests.peers.paced_model import PacedModel
from tests.peers.workers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def served_runs(make_task, operator, settings, model: PacedModel, count: int, **fields):
    settings.OPENAI_BASE_URL = model.base_url
    settings.OPENAI_API_KEY = "test"
    task = make_task([], self_check=False, autonomy_level=3, **fields)
    task.model = "test-model"
    task.save()
    return [run_start(task=task, run_input={}, user=operator) for _ in range(count)]


def runs_at_rest(runs: list[Run], *, seconds: float) -> list[Run]:
    """The runs once none is queued or running, polled; bounded by ``seconds``."""
    deadline = time.monotonic() + seconds
    ids = [run.pk for run in runs]
    while time.monotonic() < deadline:
        busy = Run.objects.filter(pk__in=ids, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
        if not busy.exists():
            break
        time.sleep(0.05)
    return list(Run.objects.filter(pk__in=ids))


def agentops_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("agentops-")]


def test_one_worker_keeps_every_run_waiting_on_its_model_at_once(
    make_task, operator, settings, runner
):
    """Twenty runs, each turn answered after a second: all twenty model calls are out at
    the same time, while the worker runs two threads of its own, not one a run."""
    with PacedModel(1.0, gather=20) as model:
        runs = served_runs(make_task, operator, settings, model, 20)
        for run in runs:
            assert runner.submit(run.pk)
        threads_seen: set[str] = set()
        while model.served < 20 and model.peak < 20:
            threads_seen.update(agentops_threads())
            time.sleep(0.05)
        threads_seen.update(agentops_threads())
        done = runs_at_rest(runs, seconds=30)
    assert [run.status for run in done] == [RunStatus.SUCCEEDED] * 20
    assert model.peak == 20, f"only {model.peak} model calls were out at once"
    assert runner.waiting_peak >= 20
    # The engine thread and the I/O thread: the model calls are awaited, not threaded.
    # Opening a connection looks its address up on the loop's bounded lookup pool.
    lookups = {name for name in threads_seen if name.startswith("agentops-dns_")}
    assert threads_seen - lookups == {"agentops-engine", "agentops-io"}, threads_seen
    assert len(lookups) <= LOOKUP_THREADS


def test_tool_calls_keep_the_ledger_on_the_async_worker(make_task, operator, settings, runner):
    """Each call is committed ``started`` with its key before it fires and settled
    after; a python tool (blocking) runs on the bounded pool, once."""
    from tests.agent_tools import EFFECTS

    with PacedModel(0.2, tool="test_charge", calls=3) as model:
        runs = served_runs(make_task, operator, settings, model, 5, tools=["test_charge"])
        for run in runs:
            assert runner.submit(run.pk)
        done = runs_at_rest(runs, seconds=30)
    assert [run.status for run in done] == [RunStatus.SUCCEEDED] * 5
    for run in done:
        calls = Step.objects.filter(run=run, tool_name="test_charge").order_by("number")
        assert [step.status for step in calls] == [StepStatus.SUCCEEDED] * 3
        kinds = list(
            LineageEvent.objects.filter(run_uuid=run.pk, kind__startswith="tool.")
            .order_by("seq")
            .values_list("kind", flat=True)
        )
        assert kinds == ["tool.started", "tool.succeeded"] * 3
        for step in calls:
            assert EFFECTS[f"charge:{step.idempotency_key}"] == 1


def test_a_queue_job_hands_the_run_over_and_returns(make_task, operator, settings, runner):
    """The job of both queues returns at once: the run is worked by the async worker."""
    from agentops.runtime.engine import runner as runner_module

    settings.AGENTOPS_WORKER_CONCURRENCY = 50
    runner_module._runner = runner  # this process's worker is the test's
    try:
        with PacedModel(0.5) as model:
            (run,) = served_runs(make_task, operator, settings, model, 1)
            assert run_advance_job(str(run.pk)) == "handed to the async worker"
            (done,) = runs_at_rest([run], seconds=30)
    finally:
        runner_module._runner = None
    assert done.status == RunStatus.SUCCEEDED


def test_a_draining_worker_hands_its_runs_back_to_the_queue(make_task, operator, settings, runner):
    """Stopping, the worker lets the calls out finish, records them, and queues each run
    again at its next step, its lease given up; nothing is asked twice."""
    with PacedModel(1.0, tool="test_charge", calls=3) as model:
        runs = served_runs(make_task, operator, settings, model, 3, tools=["test_charge"])
        for run in runs:
            assert runner.submit(run.pk)
        while model.peak < 3:
            time.sleep(0.02)
        assert runner.drain(10)
        assert not runner.submit(runs[0].pk), "a stopping worker took a run"
    for run in Run.objects.filter(pk__in=[r.pk for r in runs]):
        assert run.status == RunStatus.QUEUED and run.lease_owner == ""
        # The answer out when the worker was told to stop is recorded, not lost: the
        # next worker acts on it and does not ask again.
        assert Step.objects.filter(run=run, kind=StepKind.MODEL).count() == 1
    assert model.served == 3


def test_no_transaction_spans_a_wait(runner):
    """The runs of one worker share its connection: a wait inside a transaction would let
    another run's writes into it, so it is refused."""
    result: list[BaseException | None] = []

    def inside_a_transaction() -> None:
        try:
            with transaction.atomic():
                waits.pause(0.01)
        except RuntimeError as error:
            result.append(error)
        else:
            result.append(None)

    work = waits.RunGreenlet(inside_a_transaction)
    work.runner = runner
    work.switch()
    assert work.dead
    assert isinstance(result[0], RuntimeError) and "inside a transaction" in str(result[0])


def test_a_python_call_past_its_timeout_is_reported_failed_and_the_run_goes_on(
    make_task, operator, settings, runner
):
    """A blocking call runs on the bounded pool within its tool's timeout: past it, the
    run is told the call failed and may still take effect, and is not held."""
    Tool.objects.filter(name="test_slow_lease_watch").update(timeout_seconds=0.3)
    script = [("test_slow_lease_watch", {"text": "2"})]
    with PacedModel(0.05, script=script) as model:
        (run,) = served_runs(
            make_task, operator, settings, model, 1, tools=["test_slow_lease_watch"]
        )
        assert runner.submit(run.pk)
        (done,) = runs_at_rest([run], seconds=20)
    assert done.status == RunStatus.SUCCEEDED
    step = Step.objects.get(run=run, tool_name="test_slow_lease_watch")
    assert step.status == StepStatus.FAILED
    assert step.error == (
        "the python tool did not finish within its timeout of 0.3 s; it may still take effect"
    )


def test_a_wait_past_the_job_time_limit_lets_the_runs_lease_lapse(
    make_task, operator, settings, caplog
):
    """A call that hangs does not hold its run for ever on the async worker: past the
    queue's job time limit its lease is no longer renewed, as a job ended at its limit
    leaves it, and the reaper can hand the run on; the worker's other runs go on."""
    settings.AGENTOPS_LEASE_SECONDS = 3.0  # a beat a second
    settings.AGENTOPS_JOB_TIME_LIMIT = 1
    settings.AGENTOPS_WORKER_CONCURRENCY = 10
    script = [("test_slow_lease_watch", {"text": "5"})]
    worker = Runner(10).start()
    try:
        with PacedModel(0.05, script=script) as model:
            (run,) = served_runs(
                make_task, operator, settings, model, 1, tools=["test_slow_lease_watch"]
            )
            assert worker.submit(run.pk)
            wait_for(
                lambda: (
                    Run.objects.filter(pk=run.pk, lease_expires_at__lt=timezone.now())
                    .filter(status=RunStatus.RUNNING)
                    .exists()
                ),
                timeout=10,
                what="the lease of the hung run to lapse",
            )
            assert "has waited on one call for more than 1 s" in caplog.text
    finally:
        worker.drain(10)


class SlowHook(BaseHTTPRequestHandler):
    """An approval webhook that takes three seconds to answer."""

    answered: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(3)
        SlowHook.answered.append(time.monotonic())
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_slow_approval_webhook_holds_up_no_other_run(make_task, operator, settings, runner):
    """What follows a commit (an approval's webhook, the trail's seal) runs on the pool:
    one run's held call, posted to a far side that takes three seconds, does not hold
    the worker's other runs meanwhile."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.AGENTOPS_APPROVAL_WEBHOOK_URL = f"http://127.0.0.1:{server.server_address[1]}/hook"
    settings.AGENTOPS_APPROVAL_WEBHOOK_SECRET = "hook-secret"
    SlowHook.answered.clear()
    try:
        with PacedModel(0.05, tool="test_send", calls=1) as model:
            (held,) = served_runs(make_task, operator, settings, model, 1, tools=["test_send"])
            Task.objects.filter(pk=held.task_id).update(autonomy_level=1)
            (other,) = served_runs(make_task, operator, settings, model, 1)
            assert runner.submit(held.pk)
            wait_for(
                lambda: Run.objects.filter(pk=held.pk, status=RunStatus.WAITING).exists(),
                timeout=10,
                what="the held call's approval",
            )
            assert runner.submit(other.pk)
            (done,) = runs_at_rest([other], seconds=10)
            finished = time.monotonic()
        assert done.status == RunStatus.SUCCEEDED
        wait_for(lambda: bool(SlowHook.answered), timeout=10, what="the webhook's answer")
        assert finished < SlowHook.answered[0], "the other run waited for the webhook"
    finally:
        server.shutdown()
        server.server_close()
