"""``manage.py chaos``, short: real queue workers SIGKILLed while their runs make real
side effects at the command's sink on 127.0.0.1, and the three zeros kept (no duplicate
effect, no blind re-fire, no lost run), every chain intact.

The suite runs it on the database of its pass (SQLite, then PostgreSQL in `make test`'s
second pass): on django-q2 with inline workers, and on Celery with the async worker
where Redis is up (in CI it must be). The database is never restarted here: that is
``--restart-db``, for a run of the command by hand.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
import uuid
from io import StringIO
from unittest import mock

import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from agentops.chaos import (
    IDEMPOTENT_PATH,
    PLAIN_PATH,
    ChaosTally,
    EffectSink,
    chaos_input,
    chaos_task_create,
    ledger_tally,
    runs_tally,
    sink_tally,
)
from agentops.runtime import dispatch
from agentops.runtime.engine import lease_claim
from approvals.models import Approval, ApprovalKind, ApprovalStatus
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Task
from tasks.services import run_start
from tests.conftest import require
from tests.peers import workers

# Celery's messages go to its default queue (the workers send to it too, when a run goes
# back to the queue), so the chaos test has a Redis database of its own.
CHAOS_BROKER_URL = os.environ.get("TEST_CHAOS_REDIS_URL", "redis://127.0.0.1:6379/13")
RUNS, CALLS = 6, 3
# Enough for the workers to start, the runs to be killed twice and recovered (a lease
# of 5 s, a reaper pass), and to finish.
TIMEOUT_SECONDS = 90

sqlite_only = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the refusal is of a SQLite database"
)


def chaos(tmp_path, *arguments: str) -> str:
    """Run the command on the test's database; its output, or CommandError with it."""
    out = StringIO()
    try:
        call_command(
            "chaos",
            "--database-url",
            workers.test_database_url(),
            "--log",
            str(tmp_path / "workers.log"),
            *arguments,
            stdout=out,
        )
    except CommandError as error:
        raise AssertionError(f"{error}\n{out.getvalue()}") from None
    return out.getvalue()


def figure(output: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}: (.*)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


def assert_the_zeros_held(output: str) -> None:
    assert figure(output, "duplicate effects") == "0", output
    assert figure(output, "blind re-fires") == "0", output
    assert figure(output, "lost runs") == "0", output
    assert figure(output, "chains intact") == f"{RUNS} of {RUNS}", output
    assert figure(output, "records that disagree with the sink") == "0", output
    assert figure(output, "result") == "the three zeros hold and every chain is intact"


def assert_every_run_at_rest_and_recovered(output: str) -> None:
    """Every run ended, or waits for a person on a call whose outcome is unknown; the
    kills hit runs in flight, which were taken over."""
    (task,) = Task.objects.filter(slug=figure(output, "chaos task").split()[0])
    runs = Run.objects.filter(task=task)
    assert runs.count() == RUNS
    for run in runs:
        if run.status == RunStatus.WAITING:
            approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
            assert approval.kind == ApprovalKind.UNKNOWN_OUTCOME, run.reason
        else:
            assert run.status in (RunStatus.SUCCEEDED, RunStatus.HALTED), run.reason
    kills = figure(output, "kills made")
    assert kills.startswith("2 ("), output
    assert int(kills.rpartition(": ")[2]) >= 1, output  # the runs the killed held
    recovered = LineageEvent.objects.filter(run_uuid__in=runs.values("pk"), kind="run.recovered")
    assert recovered.exists(), output


def short_run(*arguments: str) -> list[str]:
    return [
        *("--runs", str(RUNS), "--calls", str(CALLS), "--kills", "2", "--kill-every", "1-2"),
        # Calls slow enough that the kills find runs in flight.
        *("--latency", "0.5", "--requeue-after", "5", "--timeout", str(TIMEOUT_SECONDS)),
        *arguments,
    ]


@pytest.mark.django_db(transaction=True)
def test_a_short_chaos_run_on_django_q2_keeps_the_three_zeros(tmp_path):
    output = chaos(tmp_path, *short_run("--queue", "q2", "--concurrency", "0"))

    assert_the_zeros_held(output)
    assert_every_run_at_rest_and_recovered(output)
    assert "inline (AGENTOPS_WORKER_CONCURRENCY=0)" in output


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_short_chaos_run_on_celery_with_the_async_worker_keeps_the_three_zeros(tmp_path):
    client = redis.Redis.from_url(CHAOS_BROKER_URL, socket_connect_timeout=3)
    try:
        client.ping()
        problem = ""
    except redis.RedisError as error:
        problem = f"Redis at {CHAOS_BROKER_URL} is not reachable ({error})"
    require(not problem, problem)
    # What an earlier run's killed workers left (their messages name runs of another
    # database, and kombu would hand them out again an hour later): not this run's.
    client.delete("celery", "unacked", "unacked_index")

    output = chaos(
        tmp_path,
        *short_run("--queue", "celery", "--broker-url", CHAOS_BROKER_URL, "--concurrency", "20"),
    )

    assert_the_zeros_held(output)
    assert_every_run_at_rest_and_recovered(output)
    assert "up to 20 runs in flight each (AGENTOPS_WORKER_CONCURRENCY=20)" in output


@sqlite_only
@pytest.mark.django_db(transaction=True)
def test_restarting_the_database_is_refused_on_sqlite_before_anything_starts(tmp_path):
    with pytest.raises(CommandError, match=r"--restart-db restarts PostgreSQL: run on a "):
        call_command(
            "chaos",
            "--database-url",
            workers.test_database_url(),
            "--restart-db",
            stdout=StringIO(),
        )
    assert not Task.objects.filter(slug__startswith="chaos-").exists()


def test_a_kill_interval_that_is_not_a_range_of_seconds_is_refused():
    with pytest.raises(CommandError, match=r"'soon' is not a number of seconds or a range"):
        call_command("chaos", "--kill-every", "soon", stdout=StringIO())
    with pytest.raises(CommandError, match=r"'5-1': give seconds from 0.1 to 3600"):
        call_command("chaos", "--kill-every", "5-1", stdout=StringIO())


# What the tally would find: the zeros are counted, not zero by construction -------------


def sink_post(sink: EffectSink, path: str, key: str, n: int) -> dict:
    request = urllib.request.Request(
        sink.url + path,
        data=json.dumps({"n": n}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_sink_honours_the_key_and_counts_duplicates_and_blind_refires():
    run = uuid.uuid4()
    with EffectSink(latency=0) as sink:
        first = sink_post(sink, IDEMPOTENT_PATH, f"{run}:3", 1)
        assert sink_post(sink, IDEMPOTENT_PATH, f"{run}:3", 1) == first  # a re-send
        sink_post(sink, IDEMPOTENT_PATH, f"{run}:9", 1)  # the same call under a new key
        sink_post(sink, PLAIN_PATH, f"{run}:5", 2)
        sink_post(sink, PLAIN_PATH, f"{run}:5", 2)  # the step's call sent again
        tally = ChaosTally()
        by_key = sink_tally(tally, sink.requests())

    assert tally.requests == 5
    assert tally.effects == {"idempotent": 2, "plain": 2}
    assert tally.resends == 1
    assert tally.duplicate_effects == 2  # call 1 under two keys; call 2 twice
    assert tally.blind_refires == 1
    assert tally.refire_examples == [f"{run}:5 sent 2 times to the non-idempotent side"]
    assert [r.applied for r in by_key[f"{run}:3"]] == [True, False]


def test_a_step_recorded_as_done_that_the_far_side_never_made_is_a_disagreement():
    run = uuid.uuid4()
    with EffectSink(latency=0) as sink:
        answer = sink_post(sink, PLAIN_PATH, f"{run}:4", 1)
        sink_post(sink, PLAIN_PATH, f"{run}:8", 3)  # no step carries this key
        tally = ChaosTally()
        by_key = sink_tally(tally, sink.requests())
    steps = [
        {"idempotency_key": f"{run}:4", "tool_name": "send", "status": "succeeded",
         "result": {"status": 200, "body": answer}},
        {"idempotency_key": f"{run}:6", "tool_name": "send", "status": "succeeded",
         "result": {"status": 200, "body": {"effect": 7}}},
        {"idempotency_key": f"{run}:2", "tool_name": "send", "status": "unknown", "result": None},
    ]  # fmt: skip

    ledger_tally(tally, steps, by_key)

    assert tally.disagreements == [
        f"step {run}:6 (send) is recorded as succeeded, but the far side never made that call",
        f"the far side made a call with key {run}:8 (plain), which no tool step of the "
        "chaos runs carries",
    ]
    assert (tally.unknown_steps, tally.unknown_made) == (1, 0)
    assert tally.tool_steps == {"succeeded": 2, "unknown": 1}


@pytest.mark.django_db
def test_a_run_held_by_a_dead_worker_and_not_moving_is_counted_lost():
    with EffectSink(latency=0) as sink:
        task = chaos_task_create(sink=sink, calls=1, timeout=10)
    with mock.patch.object(dispatch, "send", lambda run_id: None):
        held, moving, done = (run_start(task=task, run_input=chaos_input(task, 1)) for _ in "abc")
    assert lease_claim(held.pk, "chaos-host:999999999:dead")  # no such process
    assert lease_claim(moving.pk, "chaos-host:999999999:slow")
    Run.objects.filter(pk=done.pk).update(status=RunStatus.SUCCEEDED)
    runs = Run.objects.filter(task=task)

    nothing_moved = ChaosTally()
    ended = timezone.now()
    runs_tally(nothing_moved, runs, stall=0, ended_at=ended, owners_alive=set())
    assert sorted(lost.run_id for lost in nothing_moved.lost) == sorted([held.pk, moving.pk])
    (described,) = [lost.describe() for lost in nothing_moved.lost if lost.run_id == held.pk]
    assert described.startswith(f"run {held.pk}: running, lease of chaos-host:999999999:dead")
    assert "that process is gone" in described

    just_moved = ChaosTally()
    runs_tally(just_moved, runs, stall=3600, ended_at=ended, owners_alive=set())
    assert just_moved.lost == []
    assert len(just_moved.unfinished) == 2  # the time bound came first: not lost
