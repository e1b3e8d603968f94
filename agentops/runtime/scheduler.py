"""Periodic work: the reaper that hands forgotten runs back to the queue.

Triggers (cron, webhook, queue, email) will fire from here too.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from tasks.models import Run, RunStatus

logger = logging.getLogger("agentops.scheduler")

REAPER_SCHEDULE_NAME = "agentops: reap runs"


def runs_reap() -> list[uuid.UUID]:
    """Re-enqueue every run that no worker is working on but should be.

    - ``running`` with an expired lease (or none): its worker died or lost the database;
    - ``queued`` for longer than a lease without a worker claiming it: its queue message
      was lost (a broker restart, a job killed at the queue's timeout).

    A duplicate message is harmless: the lease lets one worker in and the other returns
    at once. Re-enqueued queued runs get a fresh ``queued_at``, so a backlog is sent
    again at most once a lease period, not once a minute."""
    from agentops.runtime.dispatch import send

    now = timezone.now()
    grace = timedelta(seconds=settings.AGENTOPS_LEASE_SECONDS)
    stale = Run.objects.filter(
        Q(status=RunStatus.RUNNING, lease_expires_at__lt=now)
        | Q(status=RunStatus.RUNNING, lease_owner="")
        | Q(status=RunStatus.QUEUED, queued_at__lt=now - grace)
    )
    run_ids = list(stale.values_list("pk", flat=True))
    Run.objects.filter(pk__in=run_ids, status=RunStatus.QUEUED).update(queued_at=now)
    for run_id in run_ids:
        send(run_id)
    if run_ids:
        logger.info("reaper: re-enqueued %d runs: %s", len(run_ids), run_ids)
    return run_ids
