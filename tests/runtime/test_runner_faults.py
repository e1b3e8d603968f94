"""The async worker against its own faults: a call that raises SystemExit or
KeyboardInterrupt, an I/O loop that ends, a drain that runs out of time.

Each test runs a real ``Runner`` (its engine and I/O threads, its event loop and pool)
against a real OpenAI-compatible server on loopback, as a queue worker process would; the
last one runs it in a process of its own, to see that process exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from agentops.runtime.engine import runner as runner_module
from agentops.runtime.engine.runner import CallInterrupted, Runner, _awaited
from agentops.runtime.tools import ToolContext, tool
from tasks.models import Run, RunStatus, Step, StepStatus
from tests.agent_tools import TEXT
from tests.peers.paced_model import PacedModel
from tests.peers.workers import ROOT, worker_env
from tests.runtime.test_runner import runs_at_rest, served_runs

pytestmark = pytest.mark.django_db(transaction=True)

INTERRUPTIONS = {"exit": SystemExit, "interrupt": KeyboardInterrupt}


# Named so that pytest does not collect it as a test.
@tool(schema=TEXT, side_effect="read", name="test_interrupting")
def interrupting(ctx: ToolContext, *, text: str) -> dict:
    """Raises SystemExit ("exit") or KeyboardInterrupt ("interrupt"): no Exception."""
    raise INTERRUPTIONS[text]("the tool's own")


def run_in_flight(model: PacedModel, *, calls: int = 1, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while model.in_flight < calls:
        assert time.monotonic() < deadline, "the model call did not go out"
        time.sleep(0.02)


@pytest.mark.parametrize("raised", ["exit", "interrupt"])
def test_a_python_tool_that_raises_systemexit_fails_that_call_and_the_worker_goes_on(
    make_task, operator, settings, runner, raised
):
    """The tool runs on the worker's pool; what it raises crosses to the I/O loop and on
    to the run. It is that one call's error: the run goes on to its end, and the worker
    goes on working runs."""
    script = [("test_interrupting", {"text": raised})]
    with PacedModel(0.05, script=script) as model:
        (run,) = served_runs(make_task, operator, settings, model, 1, tools=["test_interrupting"])
        assert runner.submit(run.pk)
        (done,) = runs_at_rest([run], seconds=20)
        assert done.status == RunStatus.SUCCEEDED, done.reason
        step = Step.objects.get(run=run, tool_name="test_interrupting")
        assert step.status == StepStatus.FAILED
        name = INTERRUPTIONS[raised].__name__
        assert f"CallInterrupted: the call raised {name}: the tool's own" in step.error
        assert runner.taking_runs(), "the worker's I/O loop or engine thread ended"
        (after,) = served_runs(make_task, operator, settings, model, 1)
        assert runner.submit(after.pk)
        (after,) = runs_at_rest([after], seconds=20)
    assert after.status == RunStatus.SUCCEEDED


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, asyncio.CancelledError])
def test_an_awaited_call_that_raises_no_exception_is_that_calls_error_and_the_loop_goes_on(
    runner, raised
):
    """A run's awaitable is awaited on the loop as ``_resume`` hands it there: what it
    raises comes back to the run as an error, and the loop still runs."""

    async def interrupting() -> None:
        raise raised("the call's own")

    handed = asyncio.run_coroutine_threadsafe(_awaited(interrupting), runner.loop)
    with pytest.raises(CallInterrupted, match=f"the call raised {raised.__name__}"):
        handed.result(timeout=5)

    async def answer() -> str:
        return "still here"

    after = asyncio.run_coroutine_threadsafe(_awaited(answer), runner.loop)
    assert after.result(timeout=5) == "still here"
    assert runner.taking_runs()


def test_a_worker_whose_io_loop_ended_takes_no_run_and_runner_makes_a_new_one(
    make_task, operator, settings
):
    """Whatever ends the loop: the worker stops taking runs (none is handed to a dead
    loop), gives up the run waiting on it, and ``runner()`` starts another worker."""
    settings.AGENTOPS_WORKER_CONCURRENCY = 5
    worker = Runner(5).start()
    runner_module._runner = worker
    replacement = None
    try:
        with PacedModel(10.0) as model:
            first, second = served_runs(make_task, operator, settings, model, 2)
            assert worker.submit(first.pk)
            run_in_flight(model)

            def loop_end() -> None:
                raise SystemExit("the loop's end")

            worker.loop.call_soon_threadsafe(loop_end)
            assert worker.stopped.wait(5), "the engine thread went on, renewing leases"
            assert worker.stopping.is_set() and worker.abandoned.is_set()
            assert not worker.submit(second.pk, timeout=0.1), "a run was handed to a dead loop"
            replacement = runner_module.runner()
            assert replacement is not worker and replacement.taking_runs()
    finally:
        runner_module._runner = None
        if replacement is not None:
            replacement.drain(10)


def test_a_drain_past_its_time_gives_up_the_runs_and_renews_their_leases_no_more(
    make_task, operator, settings
):
    """The run's call outlasts the drain: the worker gives the run up. Its engine thread
    ends (a daemon: it holds no process), and the run's lease is not renewed again, so
    the reaper can hand it on when it lapses."""
    settings.AGENTOPS_LEASE_SECONDS = 5.0  # a beat every 1.7 s
    settings.AGENTOPS_WORKER_CONCURRENCY = 5
    worker = Runner(5).start()
    with PacedModel(20.0) as model:
        (run,) = served_runs(make_task, operator, settings, model, 1)
        assert worker.submit(run.pk)
        run_in_flight(model)
        assert worker.drain(0.5) is False
        assert worker.stopped.wait(3), "the engine thread went on after the drain"
        assert worker._engine.daemon
        held_until = Run.objects.get(pk=run.pk).lease_expires_at
        time.sleep(2.5)  # past a beat
        run.refresh_from_db()
    assert run.status == RunStatus.RUNNING
    assert run.lease_expires_at == held_until, "the abandoned run's lease was renewed"


def test_a_process_whose_drain_times_out_exits(make_task, operator, settings, tmp_path):
    """A worker process with a run whose model call outlasts the drain it makes as it
    exits: it exits after the drain's time, not after the call."""
    script = textwrap.dedent(
        """
        import sys, time, uuid
        import django

        django.setup()
        from agentops.runtime.engine.runner import runner

        worker = runner()
        assert worker.submit(uuid.UUID(sys.argv[1]))
        deadline = time.monotonic() + 20
        while worker.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        print("waiting on", worker.waiting, "call", flush=True)
        """
    )
    with PacedModel(60.0) as model:
        (run,) = served_runs(make_task, operator, settings, model, 1)
        env = worker_env(
            AGENTOPS_WORKER_CONCURRENCY="5",
            AGENTOPS_WORKER_DRAIN_SECONDS="1",
            OPENAI_BASE_URL=model.base_url,
            OPENAI_API_KEY="test",
        )
        log = tmp_path / "worker.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", script, str(run.pk)],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            started = time.monotonic()
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the process did not exit after its drain:\n{log.read_text()}")
        assert model.served == 0, "the process waited for the model's answer"
    said = log.read_text()
    assert code == 0, said
    assert "waiting on 1 call" in said
    assert "are given up" in said
    assert time.monotonic() - started < 20
