"""The engine's job, as both queues run it (``dispatch.ADVANCE_JOB`` names it)."""

from __future__ import annotations

import logging
import uuid

from agentops.runtime import dispatch
from agentops.runtime.engine import runner, waits
from agentops.runtime.engine.leases import ClaimFailed
from agentops.runtime.engine.loop import advance

logger = logging.getLogger("agentops.dispatch")


def run_advance_job(run_id: str, claim_failures: int = 0) -> str:
    """The job of both queues (django-q2's, and Celery's task calls it): takes the id
    only, and lets the engine re-fetch everything.

    With the async worker (``AGENTOPS_WORKER_CONCURRENCY`` above 0), the job hands the run
    to this process's runner and returns at once, so the queue's worker process takes its
    next message while the run is worked; a worker with no free slot within
    ``runner.SLOT_WAIT_SECONDS``, or stopping, hands the run back to the queue. Inline,
    the job works the slice itself (``advance_job``)."""
    if waits.current_runner() is None:
        worker = runner.runner()
        if worker is not None:
            if worker.submit(uuid.UUID(run_id), claim_failures):
                return "handed to the async worker"
            dispatch.send(uuid.UUID(run_id), claim_failures=claim_failures)
            return "queued_again"
    return advance_job(run_id, claim_failures)


def advance_job(run_id: str, claim_failures: int = 0) -> str:
    """One slice of the run, worked here: inline in the queue's worker, or in a run's
    greenlet on the async worker.

    A claim that cannot reach the database (a restart; the engine has tried again
    already) puts the run back on the queue, up to ``dispatch.CLAIM_RESENDS - 1`` times in a row. A
    failed job is not the answer: django-q2 deletes a failed job's message (``ack_failures``,
    and ``max_attempts`` 1), and retrying through it would wait ``retry`` seconds, past
    the job's time limit, for every job that fails. If the queue (the same database, on
    the ORM broker) cannot be reached either, the job fails; django-q2 cannot delete its
    message then either, so it comes again after ``retry``. Past all that, the reaper."""
    try:
        return advance(uuid.UUID(run_id)).value
    except ClaimFailed:
        if claim_failures + 1 >= dispatch.CLAIM_RESENDS:
            raise
        logger.warning(
            "run %s: the claim could not reach the database; queued again (%d of %d)",
            run_id, claim_failures + 1, dispatch.CLAIM_RESENDS - 1,
        )  # fmt: skip
        dispatch.send(uuid.UUID(run_id), claim_failures=claim_failures + 1)
        return "queued_again"
