"""Start the web server and a django-q2 worker cluster together: the embedded default,
one command, no service beyond the database."""

from __future__ import annotations

import signal
import subprocess
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Run the web server and a worker together (django-q2), until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--login", default="", help="a login to print beside the URL")

    def handle(self, *args, **options):
        if settings.AGENTOPS_QUEUE != "q2":
            raise CommandError(
                "serve starts a django-q2 worker; with AGENTOPS_QUEUE=celery start "
                "`celery -A agentops worker` and `manage.py runserver` yourself"
            )
        worker = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=settings.BASE_DIR)

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        url = f"http://{options['host']}:{options['port']}/"
        banner = [f"agentops: web at {url} and a django-q2 worker (pid {worker.pid})"]
        if options["login"]:
            banner.append(f"Log in as {options['login']}")
        banner.append("Stop both with Ctrl-C.")
        self.stdout.write(self.style.SUCCESS("\n  " + "\n  ".join(banner) + "\n"))
        try:
            call_command(
                "runserver",
                f"{options['host']}:{options['port']}",
                use_reloader=False,
                skip_checks=False,
            )
        except KeyboardInterrupt:
            pass
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
