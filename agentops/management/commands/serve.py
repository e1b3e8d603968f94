"""Start the web server, a django-q2 worker cluster and the triggers' listeners
(``manage.py triggers``: schedules, queue consumers, inbound email) together: the
embedded default, one command, no service beyond the database."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import uvicorn
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from agentops.processes import group_stop

# How long the worker may take to finish the job in hand when asked to stop.
STOP_GRACE_SECONDS = 15
# The listeners stop within their own bound (triggers.listeners.STOP_SECONDS); past
# this, they are killed: what a consumer had not acknowledged is offered again.
LISTENERS_GRACE_SECONDS = 12


class Command(BaseCommand):
    help = (
        "Run the web server, a worker (django-q2) and the triggers' listeners together, "
        "until interrupted."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--login", default="", help="a login to print beside the URL")

    def handle(self, *args, **options):
        if settings.AGENTOPS_QUEUE != "q2":
            raise CommandError(
                "serve starts a django-q2 worker; with AGENTOPS_QUEUE=celery start "
                "`celery -A agentops worker` and an ASGI server "
                "(`uvicorn agentops.asgi:application`, see docs/deploy.md) yourself"
            )
        self.warnings_say(options["host"])
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=settings.BASE_DIR,
            # A group of its own, ended as one (group_stop). It also keeps a terminal's
            # Ctrl-C from reaching the cluster straight: it stops when serve stops it.
            start_new_session=True,
        )
        # The schedules, the queue consumers and the SMTP listener: a process of their
        # own, so a stuck broker never holds up the web server, stopped with the worker,
        # and by themselves should this process be killed outright.
        listeners = subprocess.Popen(
            [sys.executable, "manage.py", "triggers", "--exit-with-parent", str(os.getpid())],
            cwd=settings.BASE_DIR,
            start_new_session=True,
        )

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        url = f"http://{options['host']}:{options['port']}/"
        processes = settings.Q_CLUSTER["workers"]
        in_flight = settings.AGENTOPS_WORKER_CONCURRENCY
        each = (
            f"up to {in_flight} runs in flight each"
            if in_flight
            else "one run each (AGENTOPS_WORKER_CONCURRENCY=0)"
        )
        banner = [
            f"agentops: web at {url} and a django-q2 worker (pid {worker.pid}): "
            f"{processes} processes, {each}; the triggers' listeners (pid {listeners.pid})"
        ]
        if options["login"]:
            banner.append(f"Log in as {options['login']}")
        # Not `make demo`'s pid: make does not pass a SIGTERM on to what it started.
        banner.append(f"Stop them with Ctrl-C, or SIGTERM to this process (pid {os.getpid()}).")
        self.stdout.write(self.style.SUCCESS("\n  " + "\n  ".join(banner) + "\n"))
        try:
            # ASGI (uvicorn): a live page's event stream waits without holding a thread.
            # The app serves its static files itself (agentops.static_files).
            call_command("check")
            uvicorn.run(
                "agentops.asgi:application",
                host=options["host"],
                port=options["port"],
                lifespan="off",
                # Open event streams end at once on a stop; the browser reconnects.
                timeout_graceful_shutdown=2,
                log_level="info",
            )
        except KeyboardInterrupt:
            pass
        finally:
            self.stdout.write(
                f"Stopping the worker and the listeners (up to {STOP_GRACE_SECONDS} s; "
                "Ctrl-C again stops them now)"
            )
            # Both asked at once: the listeners stop in a few seconds while the worker
            # finishes the job in hand; their grace counts from now too.
            asked = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                listeners.terminate()
            try:
                group_stop(worker, grace=STOP_GRACE_SECONDS)
            finally:
                left = LISTENERS_GRACE_SECONDS - (time.monotonic() - asked)
                group_stop(listeners, grace=max(left, 0.5))

    def warnings_say(self, host: str) -> None:
        """What would make this server unsafe or unreachable, said before it starts."""
        if settings.DEBUG:
            self.stderr.write(
                "Warning: DEBUG is on: an error page shows the settings and the environment "
                "to whoever can reach this server. Turn it off (DEBUG=false in .env or the "
                "environment) unless you are debugging; static files are served either way."
            )
        hosts = settings.ALLOWED_HOSTS
        if "*" not in hosts and host.strip("[]") not in [h.strip("[]") for h in hosts]:
            self.stderr.write(
                f"Warning: {host} is not in ALLOWED_HOSTS ({', '.join(hosts)}): requests "
                f"to http://{host}/ will be refused with a 400. Add it to ALLOWED_HOSTS."
            )
