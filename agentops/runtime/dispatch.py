"""Hand a run to the configured queue. The engine never knows which queue called it."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import transaction


def enqueue(run_id: uuid.UUID) -> None:
    """Queue ``advance(run_id)`` once the current transaction commits, so a worker never
    sees a run before the change that queued it is visible."""
    transaction.on_commit(lambda: send(run_id))


def send(run_id: uuid.UUID) -> None:
    """Put one message for the run on the queue now (callers outside a transaction)."""
    if settings.AGENTOPS_QUEUE == "celery":
        from agentops.celery import run_advance_task

        # No time limit in the message: the worker's own (CELERY_TASK_TIME_LIMIT, three of
        # its slices) rules, not the one of the process that happened to send it.
        run_advance_task.apply_async((str(run_id),), time_limit=None)
    else:
        from django_q.tasks import async_task

        async_task(
            "agentops.runtime.dispatch.run_advance_job",
            str(run_id),
            task_name=f"run {run_id}",
            group="runs",
        )


def run_advance_job(run_id: str) -> str:
    """The django-q2 job: takes the id only, and lets the engine re-fetch everything."""
    from agentops.runtime.engine import advance

    return advance(uuid.UUID(run_id)).value


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
