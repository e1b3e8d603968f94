"""The Celery app for AGENTOPS_QUEUE=celery. Start a worker with
``celery -A agentops worker`` (``--triggers`` runs the triggers' listeners with it,
``agentops/celery_triggers.py``). Tasks take ids only and are acknowledged late, so a
worker lost mid-slice hands the run back; the run's lease keeps two workers apart."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init, worker_process_shutdown

from agentops.celery_triggers import TRIGGERS_OPTION, TriggerListeners

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentops.settings")

app = Celery("agentops")
app.config_from_object("django.conf:settings", namespace="CELERY")
# `celery -A agentops worker --triggers`: the listeners' process with the worker.
app.user_options["worker"].add(TRIGGERS_OPTION)
app.steps["worker"].add(TriggerListeners)


@app.task(name="agentops.run_advance", acks_late=True, ignore_result=True)
def run_advance_task(run_id: str, claim_failures: int = 0) -> str:
    # The same job as django-q2's: a claim that cannot reach the database puts the run
    # back on the queue (bounded) rather than failing the task, whose message Celery
    # acknowledges all the same.
    from agentops.runtime.engine.jobs import run_advance_job

    return run_advance_job(run_id, claim_failures)


@worker_init.connect
def connections_keep(**kwargs: object) -> None:
    """The worker, before its pool starts: database connections kept between tasks
    (``dispatch.worker_connections_keep``); the pool's children inherit it."""
    from agentops.runtime.dispatch import worker_connections_keep

    worker_connections_keep()


@worker_process_shutdown.connect
def runs_hand_back(**kwargs: object) -> None:
    """A worker process that stops (a prefork child recycled or shut down) first hands
    the runs its async worker has in flight back to the queue, at their next step."""
    from agentops import telemetry
    from agentops.runtime.engine.runner import runner_drain

    runner_drain()
    # Billiard's children skip threading's exit hooks too: their last spans go now.
    telemetry.flush(telemetry.EXIT_FLUSH_MILLIS)


@app.task(name="agentops.runs_reap", ignore_result=True)
def runs_reap_task() -> int:
    from agentops.runtime.dispatch import runs_reap_job

    return runs_reap_job()


@app.task(name="agentops.trail_checkpoint", ignore_result=True)
def trail_checkpoint_task() -> int:
    from agentops.runtime.dispatch import trail_checkpoint_job

    return trail_checkpoint_job()


@app.task(name="agentops.cron_tick", ignore_result=True)
def cron_tick_task() -> int:
    from triggers.cron import cron_tick_job

    return cron_tick_job()


# `celery -A agentops worker --beat` (or a separate `celery -A agentops beat`) runs them.
app.conf.beat_schedule = {
    "agentops-reap-runs": {"task": "agentops.runs_reap", "schedule": 60.0},
    "agentops-trail-checkpoint": {"task": "agentops.trail_checkpoint", "schedule": 300.0},
    # The schedules' tick: the listeners' process ticks more often; this is the backstop.
    # A tick that waited past the next one is dropped (expires): the next covers its
    # slots, so a backlog of ticks is not worked through one by one.
    "agentops-tick-schedules": {
        "task": "agentops.cron_tick",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
}
