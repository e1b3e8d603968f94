"""Hand a run to the configured queue. The engine never knows which queue called it, and
this module never imports the engine: it names the engine's job (``ADVANCE_JOB``), which
lives with the engine (``agentops.runtime.engine.jobs``)."""

from __future__ import annotations

import logging
import uuid

from django.conf import settings
from django.db import transaction

logger = logging.getLogger("agentops.dispatch")


def enqueue(run_id: uuid.UUID) -> None:
    """Queue ``advance(run_id)`` once the current transaction commits, so a worker never
    sees a run before the change that queued it is visible."""
    transaction.on_commit(lambda: send(run_id))


# The job of both queues, by name: django-q2 imports it in its worker.
ADVANCE_JOB = "agentops.runtime.engine.jobs.run_advance_job"

# How many jobs in a row may meet a claim that cannot reach the database (each after the
# engine's own tries, about 8 s): the first CLAIM_RESENDS - 1 put the run back on the
# queue, the last fails and leaves the run to the reaper.
CLAIM_RESENDS = 5


def send(run_id: uuid.UUID, *, claim_failures: int = 0) -> None:
    """Put one message for the run on the queue now (callers outside a transaction)."""
    extra = {"claim_failures": claim_failures} if claim_failures else {}
    if settings.AGENTOPS_QUEUE == "celery":
        from agentops.celery import run_advance_task

        # No time limit in the message: the worker's own (CELERY_TASK_TIME_LIMIT, three of
        # its slices) rules, not the one of the process that happened to send it.
        run_advance_task.apply_async((str(run_id),), extra, time_limit=None)
    else:
        from django_q.tasks import async_task

        async_task(
            ADVANCE_JOB,
            str(run_id),
            task_name=f"run {run_id}",
            group="runs",
            # A job that succeeded is not recorded: with the async worker it is a
            # hand-over, and the monitor locks every success kept to prune one
            # (save_limit). Failures are still recorded.
            save=False,
            **extra,
        )


def worker_connections_keep() -> None:
    """In a queue worker process, before it forks its pool: keep database connections
    open between jobs for ``AGENTOPS_WORKER_CONN_MAX_AGE`` seconds, checked before reuse
    (``CONN_HEALTH_CHECKS``). Web processes keep ``CONN_MAX_AGE`` 0 (Django advises against
    persistent connections under ASGI, and the development server starts a thread per
    request); a worker, with its few long-lived threads, would otherwise reconnect for
    every job, and django-q2's ORM broker for every operation (docs/benchmarks.md)."""
    seconds = settings.AGENTOPS_WORKER_CONN_MAX_AGE
    if not seconds:
        return
    for database in settings.DATABASES.values():
        # Django's connections read these dicts themselves, at each connect.
        database["CONN_MAX_AGE"] = seconds
        database["CONN_HEALTH_CHECKS"] = True


def runs_reap_job() -> int:
    """The periodic job (a django-q2 schedule, or Celery beat): the reaper, and the
    approvals past their deadline."""
    from agentops.runtime.scheduler import runs_reap
    from approvals.services import approvals_expire

    approvals_expire()
    return len(runs_reap())


def trail_checkpoint_job() -> int:
    """The periodic job (a django-q2 schedule, or Celery beat): sign every lineage chain
    that grew since its last checkpoint, outside the database (``lineage.anchoring``).
    Returns how many chains were sealed anew."""
    from lineage.anchoring import trail_checkpoint

    return trail_checkpoint().anchored
