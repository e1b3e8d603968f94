"""manage.py bench_concurrency, short: real queue workers with the async worker keep
several runs' model calls in flight at once against the latency server, and work every
run to success; the figures it prints are the ones the database and the server hold; it
leaves no process behind, and on PostgreSQL no database of its own.

On django-q2 on the database of the suite's pass (SQLite, then PostgreSQL), and on
Celery where Redis is up (in CI it must be)."""

from __future__ import annotations

import os
import re
from io import StringIO

import psycopg
import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from agentops.management.commands.bench_concurrency import SCRATCH_DATABASE_PREFIX, group_members
from tasks.models import Run, RunStatus, StepKind, Task
from tests.conftest import require
from tests.peers import workers

# Committed for real: the worker processes must see the runs.
pytestmark = pytest.mark.django_db(transaction=True)

# Celery's messages go to its default queue, which the bench's workers read (and send to,
# when a run goes back to the queue): a Redis database no other test uses (the Celery
# tests use 14, the chaos test 13).
BENCH_BROKER_URL = os.environ.get("TEST_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
RUNS, TURNS, LATENCY = 8, 3, 0.3


def figure(pattern: str, text: str) -> float:
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"no {pattern!r} in:\n{text}"
    return float(found.group(1))


def bench(tmp_path, *arguments: str) -> str:
    """The command's output; its output with the error when it fails."""
    output = StringIO()
    try:
        call_command(
            "bench_concurrency",
            *("--runs", str(RUNS), "--turns", str(TURNS), "--latency", str(LATENCY)),
            *("--timeout", "120", "--log", str(tmp_path / "workers.log")),
            *arguments,
            stdout=output,
        )
    except CommandError as error:
        raise AssertionError(f"{error}\n{output.getvalue()}") from None
    return output.getvalue()


def assert_the_runs_overlapped_and_succeeded(text: str) -> None:
    assert f"errors: runs not succeeded: 0 ({RUNS} succeeded)  tool calls failed: 0  " in text
    assert "server errors: 0" in text
    wall = figure(r"^wall time: (\d+\.\d+) s$", text)
    ideal = figure(rf"^model-bound ideal \({TURNS} turns x 0\.3 s\): (\d+\.\d+) s", text)
    assert ideal == pytest.approx(TURNS * LATENCY)
    assert ideal <= wall < 60
    # The server counted the calls waiting out their latency at once: runs overlapped.
    in_flight = figure(rf"^most model calls in flight: (\d+) \(of {RUNS} runs\)$", text)
    assert 1 < in_flight <= RUNS
    assert figure(r"\((\d+) calls\)$", text) == RUNS * TURNS
    # A plan turn, the plan, a tool turn and its call, the answer: five steps a run.
    assert figure(r"^steps per second: \d+\.\d+ \((\d+) steps\)", text) == 5 * RUNS
    assert figure(r"^runs claimed from the queue: .*\((\d+) runs: ", text) == RUNS
    assert figure(r" RSS (\d+\.\d+) MiB", text) > 10
    group = int(figure(r"worker process group: (\d+) ", text))
    assert group_members(group) == []


def assert_the_database_holds_the_runs(text: str) -> None:
    slug = re.search(r"^bench task: (bench-concurrency-[0-9a-f]+) ", text, re.M).group(1)
    warmed = int(figure(r"^warm-up: (\d+) runs", text))
    runs = Run.objects.filter(task__slug=slug)
    assert runs.count() == RUNS + warmed
    assert set(runs.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    for run in runs:
        kinds = list(run.steps.order_by("number").values_list("kind", flat=True))
        assert kinds == [StepKind.MODEL, StepKind.PLAN, StepKind.MODEL, StepKind.TOOL, "model"]
        assert run.tokens_in > 0 and run.tokens_out > 0


def test_q2_workers_keep_several_runs_in_flight_and_work_every_run_to_success(tmp_path):
    text = bench(
        tmp_path,
        *("--queue", "q2", "--workers", "2", "--concurrency", str(RUNS)),
        *("--in-place", "--database-url", workers.test_database_url()),
    )

    assert f"queue: q2  worker processes: 2 (up to {RUNS} runs in flight each)" in text
    # Which process takes a message is the queue's choice: at least one was warmed.
    assert 1 <= figure(r"^warm-up: \d+ runs, worked by (\d) of 2 worker processes$", text) <= 2
    assert_the_runs_overlapped_and_succeeded(text)
    # The cluster's main process, its sentinel, monitor and pusher, and two workers.
    assert figure(r"^worker memory at its peak, (\d+) processes: ", text) >= 3
    assert_the_database_holds_the_runs(text)


@pytest.mark.redis
def test_celery_workers_keep_several_runs_in_flight_and_work_every_run_to_success(tmp_path):
    try:
        redis.Redis.from_url(BENCH_BROKER_URL, socket_connect_timeout=3).ping()
        problem = ""
    except redis.RedisError as error:
        problem = f"Redis at {BENCH_BROKER_URL} is not reachable ({error})"
    require(not problem, problem)

    text = bench(
        tmp_path,
        # One pool process: any overlap of model calls is its async worker's.
        *("--queue", "celery", "--workers", "1", "--concurrency", str(RUNS)),
        *("--broker-url", BENCH_BROKER_URL),
        *("--in-place", "--database-url", workers.test_database_url()),
    )

    assert f"broker: {BENCH_BROKER_URL} (Celery's default queue)" in text
    assert_the_runs_overlapped_and_succeeded(text)
    # Celery's main process and its pool's process.
    assert figure(r"^worker memory at its peak, (\d+) processes: ", text) >= 2
    assert_the_database_holds_the_runs(text)


def postgres_databases() -> set[str]:
    with psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True) as server:
        rows = server.execute("SELECT datname FROM pg_database").fetchall()
    return {name for (name,) in rows}


@pytest.mark.postgres
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="run once, in the suite's PostgreSQL pass"
)
def test_on_postgresql_the_bench_works_in_a_database_of_its_own_and_drops_it(tmp_path):
    text = bench(
        tmp_path,
        *("--queue", "q2", "--workers", "1", "--concurrency", str(RUNS)),
        *("--database-url", POSTGRES_URL),
    )

    scratch = f"{SCRATCH_DATABASE_PREFIX}{os.getpid()}"
    assert f"database: postgresql {scratch} on 127.0.0.1:5432 (a scratch database" in text
    assert_the_runs_overlapped_and_succeeded(text)
    assert scratch not in postgres_databases()
    # Nothing was written where the suite's database or the one named would see it.
    assert not Task.objects.filter(slug__startswith="bench-concurrency-").exists()


def test_celery_with_no_broker_stops_before_anything_is_made(tmp_path):
    with pytest.raises(CommandError, match=r"the broker at redis://127\.0\.0\.1:1/0 does not"):
        call_command(
            "bench_concurrency",
            *("--queue", "celery", "--broker-url", "redis://127.0.0.1:1/0"),
            *("--in-place", "--database-url", workers.test_database_url()),
            stdout=StringIO(),
        )
    assert not Task.objects.filter(slug__startswith="bench-concurrency-").exists()
