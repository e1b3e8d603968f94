"""The reaper hands forgotten runs back to the queue, and leaves the others alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.models import OrmQ, Schedule

from agentops.runtime.dispatch import trail_checkpoint_job
from agentops.runtime.engine import Outcome, lease_claim
from agentops.runtime.scheduler import REAPER_SCHEDULE_NAME, runs_reap
from tasks.models import Run, RunStatus
from tasks.services import run_start
from tests.conftest import PLANNED, run_until_rest

pytestmark = pytest.mark.django_db


@pytest.fixture
def quick_task(make_task):
    return make_task([{"content": "done"}])


def test_a_running_run_whose_lease_expired_is_sent_again(quick_task, operator):
    run = run_start(task=quick_task, run_input={}, user=operator)
    assert lease_claim(run.pk, "worker-that-dies")
    assert runs_reap() == []  # its lease is live: someone is on it
    Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    before = OrmQ.objects.count()
    assert runs_reap() == [run.pk]
    assert OrmQ.objects.count() == before + 1
    assert run_until_rest(run) is Outcome.FINISHED


def test_a_queued_run_nobody_claimed_is_sent_again_once_a_lease_period(
    quick_task, operator, settings
):
    run = run_start(task=quick_task, run_input={}, user=operator)
    assert runs_reap() == []  # just queued
    long_ago = timezone.now() - timedelta(seconds=settings.AGENTOPS_LEASE_SECONDS + 1)
    Run.objects.filter(pk=run.pk).update(queued_at=long_ago)
    assert runs_reap() == [run.pk]
    assert runs_reap() == []  # its queued_at was renewed


def test_waiting_and_finished_runs_are_left_alone(make_task, operator):
    waiting = run_start(
        task=make_task([{"calls": [("test_send", {"text": "x"})]}], tools=["test_send"]),
        run_input={},
        user=operator,
    )
    run_until_rest(waiting)
    done = run_start(task=make_task([PLANNED, {"content": "ok"}]), run_input={}, user=operator)
    run_until_rest(done)
    Run.objects.update(queued_at=timezone.now() - timedelta(days=1))
    assert {waiting.status, done.status} == {RunStatus.WAITING, RunStatus.SUCCEEDED}
    assert runs_reap() == []


def test_migrate_schedules_the_reaper_every_minute():
    schedule = Schedule.objects.get(name=REAPER_SCHEDULE_NAME)
    assert schedule.func == "agentops.runtime.dispatch.runs_reap_job"
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == ("I", 1, -1)


def test_migrate_schedules_the_trail_checkpoint_every_five_minutes():
    schedule = Schedule.objects.get(func="agentops.runtime.dispatch.trail_checkpoint_job")
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == ("I", 5, -1)


def test_the_checkpoint_job_signs_the_chains_that_grew(make_task, operator, lineage_checkpoints):
    run = run_start(task=make_task([{"content": "ok"}]), run_input={}, user=operator)
    assert trail_checkpoint_job() == 1  # the run's chain, started and not yet ended
    assert trail_checkpoint_job() == 0  # nothing grew since
    statements = lineage_checkpoints.read_text().splitlines()
    assert len(statements) == 2 and str(run.pk) in statements[0]
