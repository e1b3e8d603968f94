"""The demo task end to end through Celery on Redis and a real worker process, and the
reaper on Celery beat's schedule."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import kombu.pools
import pytest
import redis
from django.utils import timezone

from agentops.celery import app, run_advance_task, runs_reap_task
from agentops.runtime.engine import Outcome, lease_claim, leases
from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from lineage.services import chain_verify
from tasks.models import Run, RunStatus
from tasks.services import run_start
from tests.conftest import require, run_until_rest
from tests.peers.workers import ROOT, wait_for, worker_env
from tests.runtime.test_db_faults import (
    ReleaseOnRecord,
    WriteLock,
    echo_run,
    sqlite_only,
)

# A Redis database of the tests' own (TEST_REDIS_URL names another), so their messages
# never meet a deployment's; and a queue of this test process's own, so two suites
# running at once never take each other's messages (which is why nothing here flushes
# the whole database: that would drop the other suite's messages).
BROKER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE = f"agentops-test-{os.getpid()}"


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(BROKER_URL, socket_connect_timeout=3, socket_timeout=3)


def redis_problem() -> str:
    try:
        redis_client().ping()
    except redis.RedisError as error:
        return f"Redis at {BROKER_URL} is not reachable ({error})"
    return ""


def queue_clear() -> None:
    """Drop what an earlier run of this test left on the queue (its list, the lists of its
    priorities, its bindings): a stale message would name a run this database lacks."""
    client = redis_client()
    keys = [*client.scan_iter(match=f"{QUEUE}*")]
    keys += [f"_kombu.binding.{QUEUE}", f"_kombu.binding_permanent.{QUEUE}"]
    client.delete(*keys)


def celery_producers_forget() -> None:
    """Close and forget the Celery app's cached producer pools and queue table.

    The app reads its settings (broker URL, default queue) when it first sends, and keeps
    what it built; forgetting it makes the next message follow the settings as they are
    then. Celery and kombu do much the same after a fork (``Celery._after_fork``,
    ``kombu.pools.reset``)."""
    app.__dict__.pop("amqp", None)
    app._pool = None
    # Closes every pool and empties kombu's registry of them, which is keyed by broker
    # URL: a pool closed but left there would be handed out again, closed.
    kombu.pools.reset()


@contextlib.contextmanager
def celery_dispatch(settings) -> Iterator[str]:
    """Send this process's runs to Celery, on the tests' broker and queue, until the block
    ends; the ``settings`` fixture restores the settings afterwards."""
    queue_clear()
    settings.AGENTOPS_QUEUE = "celery"
    settings.REDIS_URL = BROKER_URL
    settings.CELERY_BROKER_URL = BROKER_URL
    settings.CELERY_TASK_DEFAULT_QUEUE = QUEUE
    celery_producers_forget()
    try:
        yield QUEUE
    finally:
        celery_producers_forget()
        queue_clear()


@contextlib.contextmanager
def celery_worker(
    log: Path, queue: str, *, pool: str = "solo", include: str = "", **env: str
) -> Iterator[subprocess.Popen]:
    """Run ``celery -A agentops worker`` on the test database until the block ends;
    ``include`` names modules of more tasks for it to import."""
    command = [sys.executable, "-m", "celery", "-A", "agentops", "worker"]
    command += [f"--pool={pool}", "--concurrency=1", "--loglevel=INFO", "-Q", queue]
    command += ["--include", include] if include else []
    command += ["--hostname", f"{queue}@%h"]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=worker_env(AGENTOPS_QUEUE="celery", REDIS_URL=BROKER_URL, **env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so that all of it can be ended
        )
    try:
        yield process
    finally:
        # SIGTERM is Celery's warm shutdown: the task in hand finishes first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # anything of the group still left
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def steps_of(run: Run) -> list[tuple[str, str, str]]:
    return list(run.steps.order_by("number").values_list("kind", "tool_name", "status"))


def demo_run_inline(task, operator) -> Run:
    """The demo driven by the engine in this process, approval and all: what a worker
    should do too."""
    run = run_start(task=task, run_input={"batch": "2026-11"}, user=operator)
    run_until_rest(run)
    approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
    run_until_rest(run)
    return run


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("concurrency", ["0", "100"], ids=["inline", "async"])
def test_a_celery_worker_runs_the_demo_to_its_approval_and_on_to_the_end(
    tmp_path, demo_task, operator, settings, concurrency
):
    problem = redis_problem()
    require(not problem, problem)
    # Inline first, while runs still go to the default queue (whose messages nobody
    # serves here): the steps the engine makes for the demo, to compare with.
    reference = demo_run_inline(demo_task, operator)
    assert reference.status == RunStatus.SUCCEEDED, reference.reason

    log = tmp_path / "celery-worker.log"
    env = {"AGENTOPS_WORKER_CONCURRENCY": concurrency}
    with celery_dispatch(settings) as queue, celery_worker(log, queue, **env) as worker:

        def status_is(run: Run, *statuses: str) -> bool:
            assert worker.poll() is None, f"the Celery worker exited:\n{log.read_text()}"
            return Run.objects.values_list("status", flat=True).get(pk=run.pk) in statuses

        def wait_until(condition, what: str) -> None:
            try:
                wait_for(condition, timeout=60, what=what)
            except AssertionError as error:
                raise AssertionError(f"{error}; the worker's log:\n{log.read_text()}") from None

        run = run_start(task=demo_task, run_input={"batch": "2026-11"}, user=operator)
        wait_until(lambda: status_is(run, RunStatus.WAITING), "the run to wait for approval")
        approval = Approval.objects.get(run=run)
        assert approval.tool_name == "email_send"

        approval_decide(approval=approval, user=operator, approve=True)
        wait_until(
            lambda: not status_is(run, RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING),
            "the run to finish",
        )

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert steps_of(run) == steps_of(reference)
    assert ("tool", "email_send", "succeeded") in steps_of(run)
    assert Approval.objects.get(run=run).status == ApprovalStatus.APPROVED
    assert run.outcome == reference.outcome
    report = chain_verify(run.pk)
    assert report.intact, report
    assert "agentops.run_advance" in log.read_text()  # the worker, not this process, ran it
    assert ("async worker started" in log.read_text()) == (concurrency != "0")


def test_the_reaper_is_on_celery_beats_schedule_every_minute():
    entries = [e for e in app.conf.beat_schedule.values() if e["task"] == "agentops.runs_reap"]
    assert len(entries) == 1
    assert entries[0]["schedule"] == 60
    assert "agentops.runs_reap" in app.tasks  # registered, so a worker can run it


def test_the_trail_checkpoint_is_on_celery_beats_schedule_every_five_minutes():
    entries = [
        e for e in app.conf.beat_schedule.values() if e["task"] == "agentops.trail_checkpoint"
    ]
    assert [entry["schedule"] for entry in entries] == [300]
    assert "agentops.trail_checkpoint" in app.tasks


@pytest.mark.django_db
def test_the_reaper_task_returns_how_many_runs_it_sent_again(make_task, operator):
    assert runs_reap_task() == 0  # called directly, it runs here, as beat's worker runs it

    run = run_start(task=make_task([{"content": "done"}]), run_input={}, user=operator)
    assert lease_claim(run.pk, "worker-that-dies")
    Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert runs_reap_task() == 1


@sqlite_only
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)  # another connection holds the file's lock
def test_a_celery_claim_that_never_reaches_the_database_puts_the_run_back_on_the_queue(
    make_task,
    operator,
    busy_timeout,
    monkeypatch,
    settings,
):
    """The Celery task runs the same job as django-q2's: a claim that cannot reach the
    database (a locked SQLite file here) puts the run back on Celery's queue, with its
    count, instead of failing the task (Celery would acknowledge its message all the
    same, and the run would wait for the reaper)."""
    problem = redis_problem()
    require(not problem, problem)
    monkeypatch.setattr(leases, "RECONNECT_DELAYS", (0.05, 0.05), raising=False)
    run = echo_run(make_task, operator)
    with celery_dispatch(settings) as queue:
        lock = WriteLock()
        handler = ReleaseOnRecord(lock, "queued again")  # the database is back after that
        dispatch_log = logging.getLogger("agentops.dispatch")
        dispatch_log.addHandler(handler)
        try:
            assert run_advance_task.run(str(run.pk)) == "queued_again"
        finally:
            dispatch_log.removeHandler(handler)
            lock.release()

        assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED  # not claimed, not lost
        (raw,) = redis_client().lrange(queue, 0, -1)
        message = json.loads(raw)
        assert message["headers"]["task"] == "agentops.run_advance"
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert (args, kwargs) == ([str(run.pk)], {"claim_failures": 1})

        assert run_advance_task.run(*args, **kwargs) == Outcome.FINISHED.value
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_one_celery_worker_keeps_many_runs_waiting_on_their_model_at_once(
    tmp_path, make_task, operator, settings, pool
):
    """Celery feeds the async worker as django-q2 does: one worker process, its task
    handing each run over and returning, keeps every run's model call out at once."""
    from tests.peers.paced_model import PacedModel

    problem = redis_problem()
    require(not problem, problem)
    log = tmp_path / "celery-worker.log"
    with PacedModel(1.0, gather=20) as model:
        settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = model.base_url, "test"
        task = make_task([], self_check=False)
        task.model = "test-model"
        task.save()
        env = {
            "AGENTOPS_WORKER_CONCURRENCY": "50",
            "OPENAI_BASE_URL": model.base_url,
            "OPENAI_API_KEY": "test",
        }
        with celery_dispatch(settings) as queue, celery_worker(log, queue, pool=pool, **env):
            runs = [run_start(task=task, run_input={}, user=operator) for _ in range(20)]
            ids = [run.pk for run in runs]

            def at_rest() -> bool:
                busy = [RunStatus.QUEUED, RunStatus.RUNNING]
                return not Run.objects.filter(pk__in=ids, status__in=busy).exists()

            try:
                wait_for(at_rest, timeout=60, what="every run at rest")
            except AssertionError as error:
                raise AssertionError(f"{error}; the worker's log:\n{log.read_text()}") from None
    statuses = set(Run.objects.filter(pk__in=ids).values_list("status", flat=True))
    assert statuses == {RunStatus.SUCCEEDED}
    assert model.peak == 20, f"only {model.peak} model calls were out at once"
