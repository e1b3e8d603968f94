"""Work that follows a commit without holding up what made it: an approval's notices (a
webhook, mail) and the seal of a run's trail at its end (a checkpoint, maybe a webhook).

On the async worker's engine thread one slow far side would hold every run of the
process, so there it goes to the worker's bounded pool (``offload``, set for each run
by the runner); anywhere else it runs at once, as before. Either way its failures are
the work's own to log: none reaches the commit that asked for it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger("agentops.background")

offload: ContextVar[Callable[[Callable[[], None]], Any] | None] = ContextVar(
    "agentops_background_offload", default=None
)


def soon(work: Callable[[], None]) -> None:
    """``work()`` now, or on the async worker's pool when called from one of its runs."""
    submit = offload.get()
    if submit is None:
        work()
        return
    submit(lambda: logged(work))


def logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        logger.exception("background work failed")
    finally:
        from django.db import connection

        connection.close_if_unusable_or_obsolete()
