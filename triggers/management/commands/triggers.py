"""``manage.py triggers``: the triggers' listeners (the schedules' tick, the queue
consumers, the SMTP listener for inbound email) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading

from django.core.management.base import BaseCommand

from triggers.listeners import STOP_SECONDS, Listeners


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

    def handle(self, *args, **options):
        stop = threading.Event()

        def stop_asked(signum, frame):
            stop.set()

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stop_asked)
        listeners = Listeners(
            stop=stop, smtp_host=options["smtp_host"], smtp_port=options["smtp_port"]
        )
        host = listeners.smtp_host
        smtp = f"{host}:{listeners.smtp_port}" if host else "off (AGENTOPS_SMTP_LISTEN_HOST empty)"
        self.stdout.write(
            f"agentops triggers (pid {os.getpid()}): schedules every "
            f"{listeners.tick_seconds:g} s, triggers read every "
            f"{listeners.reload_seconds:g} s, SMTP {smtp} while an email "
            f"trigger is enabled. Stop with SIGTERM or Ctrl-C (up to {STOP_SECONDS:g} s)."
        )
        self.stdout.flush()
        listeners.run()
        self.stdout.write("agentops triggers: stopped")
