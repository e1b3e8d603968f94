"""``celery -A agentops worker --triggers``: the triggers' listeners (``manage.py
triggers``: the schedules' tick, the queue consumers, the SMTP listener) started with
the worker, as ``--beat`` embeds beat.

A bootstep of the worker's blueprint, so it runs in the worker's main process, never in
a pool's children, and starts the listeners as a child process with the worker's
environment: a process of their own, as under ``manage.py serve``, so a stuck broker or
a consumer never holds up the worker, and a pool child recycled drops no SMTP session.

- **Stopped with the worker**: SIGTERM, up to ``LISTENERS_GRACE_SECONDS`` for their own
  bounded stop, then SIGKILL to their process group (``agentops.processes.group_stop``).
- **Started again** if they end while the worker runs: after 1 s, doubling to a minute
  (``triggers.listeners.Backoff``), from 1 s again once a process lived a minute.
- **Never left behind**: they are started with ``--exit-with-parent <worker pid>``, so a
  worker killed outright (SIGKILL, the OOM killer), whose stop never runs, leaves
  listeners that see their parent gone and stop by themselves.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from celery import bootsteps
from click import Option

from agentops.processes import group_stop

logger = logging.getLogger("agentops.celery_triggers")

# The listeners stop within their own bound (triggers.listeners.STOP_SECONDS, 10 s);
# past this they are killed, as serve does: what a consumer had not acknowledged is
# offered again.
LISTENERS_GRACE_SECONDS = 12
# How soon the worker sees that its listeners' process ended.
LISTENERS_CHECK_SECONDS = 0.5

TRIGGERS_OPTION = Option(
    ("--triggers",),
    is_flag=True,
    default=False,
    help=(
        "Run the triggers' listeners (manage.py triggers: schedules, queue consumers, "
        "the SMTP listener) with this worker, stopped with it. One worker per machine "
        "at most: the SMTP listener binds a port."
    ),
)


class ListenersSupervisor:
    """One ``manage.py triggers`` child of this process, kept running until ``stop``."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.stopping = threading.Event()
        # Held while a process is started, so that a stop never misses one started
        # by the watch at the same moment.
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.watch, name="triggers-listeners-watch", daemon=True
        )

    def process_start(self) -> None:
        from django.conf import settings

        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "triggers", "--exit-with-parent", str(os.getpid())],
            cwd=settings.BASE_DIR,
            # A group of its own, ended as one (group_stop); a terminal's Ctrl-C reaches
            # the worker, which stops it, not the listeners straight.
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        logger.info("the triggers' listeners started (pid %d)", self.process.pid)

    def start(self) -> None:
        with self.lock:
            self.process_start()
        self.thread.start()

    def watch(self) -> None:
        """Start the listeners again whenever they end before the worker stops them."""
        from triggers.listeners import BACKOFF_MAX_SECONDS, Backoff

        backoff = Backoff()
        while not self.stopping.wait(LISTENERS_CHECK_SECONDS):
            process = self.process
            if process is None or (code := process.poll()) is None:
                continue
            if time.monotonic() - self.started_at > BACKOFF_MAX_SECONDS:
                backoff.reset()
            retry_in = backoff.next()
            logger.warning(
                "the triggers' listeners (pid %d) exited with %s; starting them again in %.0f s",
                process.pid,
                code,
                retry_in,
            )
            if self.stopping.wait(retry_in):
                return
            with self.lock:
                if self.stopping.is_set():
                    return
                try:
                    self.process_start()
                except OSError as error:
                    logger.warning("starting the triggers' listeners: %s", error)
                    self.started_at = time.monotonic()

    def stop(self) -> None:
        """SIGTERM, their own stop for up to ``LISTENERS_GRACE_SECONDS``, then SIGKILL
        to the group; nothing is started after this began."""
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is None:
            return
        logger.info(
            "stopping the triggers' listeners (pid %d, up to %d s)",
            process.pid,
            LISTENERS_GRACE_SECONDS,
        )
        group_stop(process, grace=LISTENERS_GRACE_SECONDS)
        logger.info("the triggers' listeners stopped (exit code %s)", process.returncode)


class TriggerListeners(bootsteps.StartStopStep):
    """The worker's step for ``--triggers``; enabled by that option only."""

    label = "Triggers"
    conditional = True
    # Started once the pool is up (prefork children are forked from a process with no
    # listeners' thread yet) and stopped before it, while the pool finishes its jobs.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, triggers: bool = False, **options) -> None:
        self.enabled = bool(triggers)
        super().__init__(worker, **options)

    def create(self, worker) -> ListenersSupervisor:
        return ListenersSupervisor()
