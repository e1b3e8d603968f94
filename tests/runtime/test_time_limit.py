"""A job that hangs must not hold its run for ever, under either queue.

A Python tool has no timeout of its own. At three slices (``AGENTOPS_JOB_TIME_LIMIT``)
the queue ends the worker process running the job: django-q2 by its job timeout, Celery
by its hard time limit. The lease that process renewed then lapses, and the run is
recovered as after a crash: a call that may have taken effect is not made again, and a
person says what happened."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from django.utils import timezone

from agentops.runtime.engine import Outcome, advance
from approvals.models import Approval, ApprovalKind
from tasks.models import AutonomyLevel, Run, RunStatus, StepStatus, Task, Tool, ToolGrant
from tasks.services import run_start, tools_sync
from tests.conftest import require
from tests.crash_tools import BEFORE_EFFECT, attempts, reached_marker
from tests.peers.workers import q2_cluster, wait_for
from tests.runtime.test_celery import celery_dispatch, celery_worker, redis_problem

pytestmark = pytest.mark.django_db(transaction=True)

# One-second slices: the job's time limit is three seconds. The lease is the shortest
# the settings allow, so that it lapses soon after the job is ended.
WORKER_ENV = {"AGENTOPS_SLICE_SECONDS": "1", "AGENTOPS_LEASE_SECONDS": "5"}


@pytest.fixture
def hanging_task() -> Task:
    """An autonomous task whose one call (crash_send, not idempotent) waits, never
    released, far past the time limit (tests/crash_tools.py): it hangs."""
    tools_sync()
    task = Task.objects.create(
        slug="hangs",
        name="Hangs",
        objective_template="Make the one call.",
        model="scripted:crash-agent",
        autonomy_level=AutonomyLevel.AUTONOMOUS,
    )
    ToolGrant.objects.create(task=task, tool=Tool.objects.get(name="crash_send"))
    return task


def hang_until_ended(worker: AbstractContextManager, task: Task, markers: Path, operator) -> Run:
    """Start a run under ``worker``; return once its call hangs and, the job ended, the
    lease has lapsed (a worker still alive would go on renewing it)."""
    markers.mkdir()
    # The sink the call would reach once released is never called.
    arguments = {"sink": "http://127.0.0.1:9", "markers": str(markers), "pause": BEFORE_EFFECT}
    with worker:
        run = run_start(
            task=task,
            run_input={"tool": "crash_send", "arguments": {**arguments, "text": "hang"}},
            user=operator,
        )
        wait_for(lambda: reached_marker(markers, BEFORE_EFFECT).exists(), what="the call")

        def lease_lapsed() -> bool:
            run.refresh_from_db()
            return run.lease_expires_at < timezone.now()

        wait_for(lease_lapsed, timeout=20, what="the job to be ended and its lease to lapse")
    return run


def assert_recovered_as_after_a_crash(run: Run, markers: Path) -> None:
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING
    (step,) = run.steps.filter(tool_name="crash_send")
    assert step.status == StepStatus.STARTED
    # The next worker (here, this process): the call may have taken effect, so it is not
    # made again, and a person says what happened.
    assert advance(run.pk) is Outcome.WAITING
    step.refresh_from_db()
    assert step.status == StepStatus.UNKNOWN
    assert Approval.objects.get(run=run).kind == ApprovalKind.UNKNOWN_OUTCOME
    assert len(attempts(markers)) == 1


def test_a_q2_job_past_its_time_limit_is_ended_and_its_run_recovered(
    tmp_path, hanging_task, operator
):
    worker = q2_cluster(tmp_path / "qcluster.log", **WORKER_ENV)
    run = hang_until_ended(worker, hanging_task, tmp_path / "markers", operator)
    assert_recovered_as_after_a_crash(run, tmp_path / "markers")


@pytest.mark.redis
def test_a_celery_job_past_its_time_limit_is_ended_and_its_run_recovered(
    tmp_path, hanging_task, operator, settings
):
    problem = redis_problem()
    require(not problem, problem)
    log = tmp_path / "celery-worker.log"
    with celery_dispatch(settings) as queue:
        # Prefork, the default pool: its hard time limit ends the pool's child process.
        worker = celery_worker(log, queue, pool="prefork", **WORKER_ENV)
        run = hang_until_ended(worker, hanging_task, tmp_path / "markers", operator)
    assert "Hard time limit (3s) exceeded" in log.read_text()
    assert_recovered_as_after_a_crash(run, tmp_path / "markers")
