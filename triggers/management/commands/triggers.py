"""``manage.py triggers``: the triggers' listeners (the schedules' tick, the queue
consumers, the SMTP listener for inbound email) until SIGTERM or Ctrl-C, or, with
``--exit-with-parent PID``, until the process that started them is gone."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from django.core.management.base import BaseCommand, CommandError

from triggers.listeners import STOP_SECONDS, Listeners

logger = logging.getLogger("agentops.triggers.listeners")

# How soon the listeners see that the process that started them is gone.
PARENT_CHECK_SECONDS = 1.0
# Past their own bounded stop, a process whose parent is gone ends outright.
PARENT_GONE_EXIT_SECONDS = STOP_SECONDS + 5


def parent_watch(pid: int, stop: threading.Event) -> None:
    """Set ``stop`` once process ``pid`` is no longer this process's parent: it ended,
    killed outright included (this process was then handed to init or a subreaper), so
    its own stop, which would have ended this one, never ran. Should the listeners' stop
    then outlast ``PARENT_GONE_EXIT_SECONDS``, end the process anyway: nobody is left to
    stop it. Returns at once when ``stop`` is set otherwise (SIGTERM, Ctrl-C)."""
    while os.getppid() == pid:
        if stop.wait(PARENT_CHECK_SECONDS):
            return
    logger.warning(
        "the process that started the triggers' listeners (pid %d) is gone: they stop", pid
    )
    stop.set()
    time.sleep(PARENT_GONE_EXIT_SECONDS)
    logger.error(
        "the triggers' listeners did not stop within %.0f s of their parent's end: exiting",
        PARENT_GONE_EXIT_SECONDS,
    )
    os._exit(1)


class Command(BaseCommand):
    help = (
        "Run the triggers' listeners: the schedules' tick, a consumer for each enabled "
        "queue trigger and the SMTP listener for email triggers, until SIGTERM or Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--smtp-host",
            default=None,
            help="where the SMTP listener binds (AGENTOPS_SMTP_LISTEN_HOST; empty: none)",
        )
        parser.add_argument("--smtp-port", type=int, default=None, help="AGENTOPS_SMTP_LISTEN_PORT")
        parser.add_argument(
            "--exit-with-parent",
            type=int,
            default=None,
            metavar="PID",
            help=(
                "stop once the process PID is no longer this one's parent (it ended, even "
                "killed outright): how `celery -A agentops worker --triggers` never leaves "
                "its listeners behind"
            ),
        )

    def handle(self, *args, **options):
        parent = options["exit_with_parent"]
        if parent is not None and parent <= 1:
            raise CommandError(
                f"--exit-with-parent takes the process id of the parent to watch, not {parent}"
            )
        stop = threading.Event()

        def stop_asked(signum, frame):
            stop.set()

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stop_asked)
        listeners = Listeners(
            stop=stop, smtp_host=options["smtp_host"], smtp_port=options["smtp_port"]
        )
        if parent is not None:
            threading.Thread(
                target=parent_watch, args=(parent, stop), name="parent-watch", daemon=True
            ).start()
        host = listeners.smtp_host
        smtp = f"{host}:{listeners.smtp_port}" if host else "off (AGENTOPS_SMTP_LISTEN_HOST empty)"
        self.stdout.write(
            f"agentops triggers (pid {os.getpid()}): schedules every "
            f"{listeners.tick_seconds:g} s, triggers read every "
            f"{listeners.reload_seconds:g} s, SMTP {smtp} while an email "
            f"trigger is enabled. Stop with SIGTERM or Ctrl-C (up to {STOP_SECONDS:g} s)"
            + (f"; they stop when their parent (pid {parent}) ends." if parent else ".")
        )
        self.stdout.flush()
        listeners.run()
        self.stdout.write("agentops triggers: stopped")
