"""The async worker, SIGKILLed with a hundred calls in flight: no outcome that was
committed is lost, nothing fires twice, and every run is recovered.

One django-q2 worker process keeps a hundred runs in flight (``AGENTOPS_WORKER_
CONCURRENCY``): their model calls wait on a server that answers after a second, their
tool calls make effects at the sink (tests/peers/sink.py), which counts them per
idempotency key. The whole cluster is killed with SIGKILL, no handler and no last write,
while the calls are out. Then its leases lapse, the reaper hands the runs on, and a
second cluster works them to the end."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from django.db.models import Q

from agentops.runtime.scheduler import runs_reap
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
from tests.crash_tools import NO_PAUSE
from tests.peers.paced_model import PacedModel
from tests.peers.sink import EffectSink
from tests.peers.workers import q2_cluster, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = 100


def test_a_worker_killed_with_a_hundred_calls_in_flight_loses_nothing_and_repeats_nothing(
    operator, settings, tmp_path: Path
):
    tools_sync()
    with EffectSink() as sink, PacedModel(1.0, script=[], gather=RUNS, gather_seconds=60) as model:
        call = {"sink": sink.url, "markers": str(tmp_path), "pause": NO_PAUSE, "text": "pay"}
        model.script = [("crash_charge", call), ("crash_send", call)]
        settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = model.base_url, "test"
        task = Task.objects.create(
            slug="runner-crash",
            name="Runner crash",
            objective_template="Charge, then send; never twice.",
            model="test-model",
            autonomy_level=AutonomyLevel.AUTONOMOUS,
            self_check=False,
        )
        for name in ("crash_charge", "crash_send"):
            ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=name))
        env = {
            "AGENTOPS_WORKER_CONCURRENCY": str(RUNS + 50),
            "AGENTOPS_Q2_WORKERS": "1",
            "OPENAI_BASE_URL": model.base_url,
            "OPENAI_API_KEY": "test",
        }
        runs = [run_start(task=task, run_input={}, user=operator) for _ in range(RUNS)]

        with q2_cluster(tmp_path / "first.log", **env) as first:
            # A hundred model calls out at once, in one worker, and effects being made.
            wait_for(lambda: model.peak >= RUNS, timeout=60, what="a hundred calls in flight")
            wait_for(lambda: sink.effects() >= 20, timeout=60, what="effects at the sink")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        settled = {
            step.pk: (step.status, step.result)
            for step in Step.objects.filter(
                run__in=runs, kind=StepKind.TOOL, status=StepStatus.SUCCEEDED
            )
        }
        assert settled, "no call had its outcome committed before the kill"

        # The dead worker's leases lapse; the reaper hands the runs to a new worker.
        Run.objects.filter(pk__in=[r.pk for r in runs], status=RunStatus.RUNNING).update(
            lease_expires_at="2000-01-01T00:00:00Z"
        )
        with q2_cluster(tmp_path / "second.log", **env):
            runs_reap()
            wait_for(
                lambda: (
                    not Run.objects.filter(
                        pk__in=[r.pk for r in runs],
                        status__in=[RunStatus.QUEUED, RunStatus.RUNNING],
                    ).exists()
                ),
                timeout=90,
                what="every run at rest",
            )
            for_person = Run.objects.filter(pk__in=[r.pk for r in runs], status=RunStatus.WAITING)
            runs_reap()  # nothing is left for the reaper: every run is at rest

    # Every run recovered: done, or waiting for a person on a call that may have happened.
    done = Run.objects.filter(pk__in=[r.pk for r in runs])
    assert set(done.values_list("status", flat=True)) <= {RunStatus.SUCCEEDED, RunStatus.WAITING}
    unknown = Step.objects.filter(run__in=runs, status=StepStatus.UNKNOWN)
    assert for_person.count() == unknown.values("run").distinct().count()
    assert not unknown.filter(tool_name="crash_charge").exists(), (
        "an idempotent call was left unknown instead of retried with its key"
    )
    # No outcome committed before the kill was lost or changed.
    for pk, (status, result) in settled.items():
        step = Step.objects.get(pk=pk)
        assert (step.status, step.result) == (status, result)
    # Nothing fired twice: one effect per charge key (retries replayed), and the unsafe
    # side reached at most once per step, never re-fired blindly.
    keys = Step.objects.filter(run__in=runs, kind=StepKind.TOOL).exclude(idempotency_key="")
    for step in keys.filter(tool_name="crash_charge"):
        assert sink.effects(step.idempotency_key) == 1, step.idempotency_key
    for step in keys.filter(tool_name="crash_send"):
        assert sink.requests(step.idempotency_key) <= 1, step.idempotency_key
        if step.status == StepStatus.SUCCEEDED:
            assert sink.requests(step.idempotency_key) == 1
    # Every run's trail is an intact chain.
    for run in runs:
        assert chain_verify(run.pk).intact, run.pk
    assert not Step.objects.filter(Q(run__in=runs), status=StepStatus.STARTED).exists()
