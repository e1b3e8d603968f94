"""Two workers racing for one run: exactly one advances it. Each worker is a thread
with its own database connection, released together at a barrier."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, connections

from agentops.runtime.engine import Outcome, advance, lease_claim
from lineage.services import chain_verify
from tasks.models import RunStatus
from tasks.services import run_start
from tests.agent_tools import EFFECTS

pytestmark = pytest.mark.django_db(transaction=True)


def race(target, count: int) -> list:
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = target(index)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_of_two_workers_claiming_one_run_exactly_one_wins(make_task, operator):
    task = make_task([{"content": "done"}])
    runs = [run_start(task=task, run_input={}, user=operator) for _ in range(15)]
    for run in runs:
        wins = race(lambda index, run=run: lease_claim(run.pk, f"worker-{index}"), 2)
        assert sorted(wins) == [False, True], f"{connection.vendor}: {wins}"


def test_two_workers_advancing_one_run_make_each_call_once(make_task, operator):
    turns = [{"calls": [("test_echo", {"text": str(n)})]} for n in range(5)] + [{"content": "ok"}]
    task = make_task(turns, tools=["test_echo"], self_check=False)
    run = run_start(task=task, run_input={}, user=operator)
    outcomes = race(lambda index: advance(run.pk, owner=f"worker-{index}"), 2)
    assert sorted(o.value for o in outcomes) == sorted(
        [Outcome.NOT_CLAIMED.value, Outcome.FINISHED.value]
    )
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert {f"echo:{n}": 1 for n in range(5)} == EFFECTS
    assert chain_verify(run.pk).intact


def test_a_long_tool_call_keeps_its_lease_alive(make_task, operator, settings):
    from datetime import datetime

    settings.AGENTOPS_LEASE_SECONDS = 6  # renewed every 2 s while a call runs
    task = make_task(
        [{"calls": [("test_slow_lease_watch", {"text": "2.5"})]}, {"content": "ok"}],
        tools=["test_slow_lease_watch"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert advance(run.pk) is Outcome.FINISHED
    result = run.steps.get(kind="tool").result
    renewed = datetime.fromisoformat(result["after"]) - datetime.fromisoformat(result["before"])
    assert renewed.total_seconds() >= 1.5
