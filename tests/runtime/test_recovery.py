"""A run whose worker keeps stopping is halted, not recovered without end.

What a crash loses (a model answer not yet recorded, the seconds since the last commit)
is counted against no budget, so a call or an answer that kills every worker trying it
would loop, unbounded and unbilled. The engine counts the times in a row a run is
recovered with no step recorded in between, and halts it at AGENTOPS_RECOVERY_LIMIT.
The crash test with real processes is in test_crash.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from agentops.runtime.engine import Outcome, advance, lease_claim_run
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.models import Run, RunStatus, StepKind, StepStatus
from tasks.services import run_start, run_transition, step_create, step_transition

pytestmark = pytest.mark.django_db


def lease_lapse(run: Run) -> None:
    """The worker holding the run died: its lease runs out unrenewed."""
    lapsed = Run.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert lapsed == 1


def recovered(run: Run) -> list[dict]:
    return list(
        LineageEvent.objects.filter(run_uuid=run.pk, kind="run.recovered")
        .order_by("seq")
        .values_list("payload", flat=True)
    )


def a_step_recorded(run: Run, number: int) -> None:
    """The recovering worker got somewhere: a step of the run was committed."""
    step_create(
        run=run,
        number=number,
        event="model.responded",
        payload={"content": "thinking"},
        kind=StepKind.MODEL,
        status=StepStatus.SUCCEEDED,
        content="thinking",
    )


@pytest.fixture
def started(make_task, operator) -> Run:
    task = make_task([{"content": "done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert lease_claim_run(run.pk, "worker-1") is not None  # then worker-1 dies
    return run


def test_a_run_whose_worker_stops_again_and_again_is_halted_at_the_limit(started, settings):
    settings.AGENTOPS_RECOVERY_LIMIT = 3
    run = started
    for number, owner in enumerate(["worker-2", "worker-3"], 1):
        lease_lapse(run)
        claimed = lease_claim_run(run.pk, owner)
        assert claimed is not None and claimed.status == RunStatus.RUNNING
        assert claimed.recoveries == number

    lease_lapse(run)
    assert advance(run.pk, owner="worker-4") is Outcome.FINISHED
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED
    assert run.reason == (
        "its worker stopped 3 times in a row before its first step, with nothing recorded "
        "in between: halted rather than tried again (AGENTOPS_RECOVERY_LIMIT is 3)"
    )
    assert [event["in_a_row"] for event in recovered(run)] == [1, 2, 3]
    assert not run.steps.exists()  # worker-4 asked the model nothing
    assert chain_verify(run.pk).intact
    # Nothing claims a halted run again.
    assert advance(run.pk, owner="worker-5") is Outcome.NOT_CLAIMED


def test_a_step_recorded_between_recoveries_starts_the_count_again(started, settings):
    settings.AGENTOPS_RECOVERY_LIMIT = 2
    run = started
    lease_lapse(run)
    assert lease_claim_run(run.pk, "worker-2").recoveries == 1
    a_step_recorded(run, 1)

    lease_lapse(run)
    again = lease_claim_run(run.pk, "worker-3")
    assert again.status == RunStatus.RUNNING and again.recoveries == 1

    lease_lapse(run)
    halted = lease_claim_run(run.pk, "worker-4")
    assert halted.status == RunStatus.HALTED and halted.recoveries == 2
    assert halted.reason.startswith("its worker stopped 2 times in a row at step 1,")
    assert [(e["in_a_row"], e["last_step"]) for e in recovered(run)] == [(1, 0), (1, 1), (2, 1)]


def test_an_outcome_recorded_between_recoveries_starts_the_count_again(started, settings):
    # Worker 1 died in a call; worker 2 retried it and recorded its outcome, then died
    # in the next model call: it got further, so that is the first time in a row again.
    settings.AGENTOPS_RECOVERY_LIMIT = 2
    run = started
    call = step_create(
        run=run,
        number=1,
        event="tool.started",
        payload={"tool": "test_echo"},
        kind=StepKind.TOOL,
        status=StepStatus.STARTED,
        tool_name="test_echo",
    )
    lease_lapse(run)
    assert lease_claim_run(run.pk, "worker-2").recoveries == 1
    with transaction.atomic():
        step_transition(
            step=call, to=StepStatus.SUCCEEDED, event="tool.succeeded", payload={}, result={}
        )

    lease_lapse(run)
    again = lease_claim_run(run.pk, "worker-3")
    assert again.status == RunStatus.RUNNING and again.recoveries == 1
    lease_lapse(run)
    assert lease_claim_run(run.pk, "worker-4").status == RunStatus.HALTED


def test_a_claim_from_the_queue_starts_the_count_again(started, settings):
    # Between two recoveries the run went back to the queue (a slice ended in good
    # order, or a person decided): a worker got through, so the count starts again.
    settings.AGENTOPS_RECOVERY_LIMIT = 2
    run = started
    lease_lapse(run)
    claimed = lease_claim_run(run.pk, "worker-2")
    assert claimed.recoveries == 1
    with transaction.atomic():
        run_transition(
            run=claimed, to=RunStatus.QUEUED, actor="engine", lease_owner="", lease_expires_at=None
        )
    assert lease_claim_run(run.pk, "worker-3").recoveries == 0

    lease_lapse(run)
    again = lease_claim_run(run.pk, "worker-4")
    assert again.status == RunStatus.RUNNING and again.recoveries == 1
