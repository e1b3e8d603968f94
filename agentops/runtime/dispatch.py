"""Hand a run to the configured queue. The engine never knows which queue called it."""

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
            "agentops.runtime.dispatch.run_advance_job",
            str(run_id),
            task_name=f"run {run_id}",
            group="runs",
            **extra,
        )


def run_advance_job(run_id: str, claim_failures: int = 0) -> str:
    """The job of both queues (django-q2's, and Celery's task calls it): takes the id
    only, and lets the engine re-fetch everything.

    A claim that cannot reach the database (a restart; the engine has tried again
    already) puts the run back on the queue, up to ``CLAIM_RESENDS - 1`` times in a row. A
    failed job is not the answer: django-q2 deletes a failed job's message (``ack_failures``,
    and ``max_attempts`` 1), and retrying through it would wait ``retry`` seconds, past
    the job's time limit, for every job that fails. If the queue (the same database, on
    the ORM broker) cannot be reached either, the job fails; django-q2 cannot delete its
    message then either, so it comes again after ``retry``. Past all that, the reaper."""
    from agentops.runtime.engine import ClaimFailed, advance

    try:
        return advance(uuid.UUID(run_id)).value
    except ClaimFailed:
        if claim_failures + 1 >= CLAIM_RESENDS:
            raise
        logger.warning(
            "run %s: the claim could not reach the database; queued again (%d of %d)",
            run_id, claim_failures + 1, CLAIM_RESENDS - 1,
        )  # fmt: skip
        send(uuid.UUID(run_id), claim_failures=claim_failures + 1)
        return "queued_again"


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
