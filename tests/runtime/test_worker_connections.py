"""A queue worker process keeps its database connections between jobs
(``AGENTOPS_WORKER_CONN_MAX_AGE``, ``dispatch.worker_connections_keep``); with 0 it opens
one per job, as it used to. Real workers: django-q2's cluster (a job's own thread) and
Celery on Redis (a pool thread, where the async worker's runs seal their trails)."""

from __future__ import annotations

import pytest
from django_q.tasks import async_task, result

from tests.conftest import require
from tests.peers.workers import q2_cluster, wait_for
from tests.runtime.test_celery import celery_dispatch, celery_worker, redis_problem

pytestmark = pytest.mark.django_db(transaction=True)

JOBS = 3


def sessions_of(lines: list[str]) -> tuple[set[str], set[str]]:
    """The worker processes, and the database sessions, that the jobs ran on."""
    processes = {line.split(":", 1)[0] for line in lines}
    return processes, set(lines)


@pytest.mark.parametrize("max_age", ["300", "0"], ids=["kept", "closed"])
def test_a_q2_worker_keeps_its_connection_between_jobs_unless_told_not_to(tmp_path, max_age):
    with q2_cluster(
        tmp_path / "qcluster.log", AGENTOPS_Q2_WORKERS="1", AGENTOPS_WORKER_CONN_MAX_AGE=max_age
    ):
        lines = []
        for _ in range(JOBS):  # one after another: each job ends before the next is sent
            job = async_task("tests.peers.jobs.connection_identity")
            lines.append(result(job, wait=30_000))
            assert lines[-1], (tmp_path / "qcluster.log").read_text()

    processes, sessions = sessions_of(lines)
    assert len(processes) == 1, lines  # one worker process ran them all
    assert len(sessions) == (1 if max_age == "300" else JOBS), lines


@pytest.mark.redis
# Kept across a fork (prefork's children inherit what worker_init set in their parent),
# and closed (the test can tell them apart) on the pool that forks nothing.
@pytest.mark.parametrize(
    ("pool", "max_age"), [("prefork", "300"), ("solo", "0")], ids=["kept-prefork", "closed-solo"]
)
def test_a_celery_workers_pool_thread_keeps_its_connection_unless_told_not_to(
    tmp_path, settings, pool, max_age
):
    problem = redis_problem()
    require(not problem, problem)
    from tests.peers.jobs import connection_identity_task

    out = tmp_path / "sessions.txt"
    out.touch()
    log = tmp_path / "celery.log"
    with (
        celery_dispatch(settings) as queue,
        celery_worker(
            log, queue, pool=pool, include="tests.peers.jobs", AGENTOPS_WORKER_CONN_MAX_AGE=max_age
        ),
    ):
        for sent in range(1, JOBS + 1):
            connection_identity_task.apply_async((str(out),), queue=queue)
            wait_for(
                lambda sent=sent: len(out.read_text().splitlines()) == sent,
                timeout=60,
                what=f"task {sent} to run: {log}",
            )
    processes, sessions = sessions_of(out.read_text().splitlines())
    assert len(processes) == 1
    assert len(sessions) == (1 if max_age == "300" else JOBS), out.read_text()
