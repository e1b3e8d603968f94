"""``manage.py bench_pages``: the operator's pages at 100,000 runs, 1,000,000 steps and
1,000,000 lineage events on PostgreSQL, each page's server time and query count."""

from __future__ import annotations

import os
from contextlib import ExitStack
from unittest import mock

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from django.db import connections
from django.db.utils import ConnectionHandler

from agentops.bench import load_average
from agentops.bench_pages import (
    ADMIN_USERNAME,
    DEFAULT_RUNS,
    DEFAULT_STEPS_PER_RUN,
    GOAL_MS,
    LONG_RUN_ID,
    LONG_RUN_STEPS,
    REQUESTS,
    TASK_PREFIX,
    PageFigures,
    Volume,
    connect_ms,
    held_now,
    holds_volume,
    page_time,
    pages_to_time,
    seed,
)
from agentops.commands import ParagraphsCommand
from agentops.config import database_from_url
from agentops.management.commands.bench_engine import (
    REEXEC_MARKER,
    command_in_child,
    database_described,
    positive_int,
    same_database,
    scratch_checkpoints,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/agentops_bench_pages"
# The bench seeds a month of made-up runs and --reseed drops the database: it works only
# on a database whose name says it is a bench's.
BENCH_NAME_PREFIX = "agentops_bench"
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")

HELP = """\
Time the operator's pages at scale: --runs runs (default 100,000) of --steps-per-run
steps and as many lineage events each (default 10: about 1,000,000 of each), plus one
run of 500 steps and 500 events for the run page and the lineage page, with tasks,
granted tools, pending and decided approvals, over the last 30 days.

Each page is requested through Django's test client as a superuser: once to warm up,
once to count its queries, then --requests times (default 12), timed. Per page it
prints the median and p90 server time, the query count, the response's size, and
whether the median is under 150 ms; a page that answers anything but 200 gets a line
saying so. The machine's load average is printed before and after.

Where it writes: a PostgreSQL database of its own on this machine, by default
agentops_bench_pages on 127.0.0.1 (--database-url to choose another; its host must be
loopback and its name start with agentops_bench). The bench creates it when missing,
migrates it, and seeds it with COPY when it is empty (a few minutes). A database that
already holds the volume asked is used as it is; --reseed drops it and makes it again.
The database stays afterwards, so the next run of the bench starts at once.
"""


def bench_database(url: str) -> dict:
    """The database ``url`` names, if the bench may use it: PostgreSQL, on this
    machine, with a bench's name; else a CommandError that says which it is not."""
    try:
        target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
    except ImproperlyConfigured as error:
        raise CommandError(str(error)) from None
    if not target["ENGINE"].endswith("postgresql"):
        raise CommandError(f"--database-url must name a PostgreSQL database, not {url!r}")
    host = str(target.get("HOST") or "")
    local = (
        not host  # the server's socket on this machine
        or host.startswith("/")
        or host in LOOPBACK_HOSTS
        or host.startswith("127.")
    )
    if not local:
        raise CommandError(
            f"--database-url: {host} is not a loopback address; the bench seeds and drops "
            "databases only on this machine"
        )
    if not str(target["NAME"]).startswith(BENCH_NAME_PREFIX):
        raise CommandError(
            f"--database-url: the database {target['NAME']!r} is not a bench's: its name must "
            f"start with {BENCH_NAME_PREFIX} (the bench fills it with made-up runs, and "
            "--reseed drops it)"
        )
    return target


def bench_database_prepare(target: dict, *, reseed: bool) -> str:
    """Create the bench's database when missing (drop it first with ``reseed``), from
    the server's maintenance database; says what it did."""
    handler = ConnectionHandler({"default": target})
    server = handler["default"]
    name = target["NAME"]
    quoted = server.ops.quote_name(name)
    try:
        with server._nodb_cursor() as cursor:
            if reseed:
                cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if cursor.fetchone():
                return "there already"
            cursor.execute(f"CREATE DATABASE {quoted}")
            return "dropped and created again" if reseed else "created"
    except Exception as error:
        raise CommandError(
            f"could not prepare the bench's database on {database_described(target)}: {error}"
        ) from None
    finally:
        handler.close_all()


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database-url",
            default="",
            help=f"the bench's database (default {DEFAULT_DATABASE_URL})",
        )
        parser.add_argument(
            "--runs",
            type=positive_int(10_000_000),
            default=DEFAULT_RUNS,
            help=f"runs seeded, the long run among them (default {DEFAULT_RUNS:,})",
        )
        parser.add_argument(
            "--steps-per-run",
            type=positive_int(LONG_RUN_STEPS),
            default=DEFAULT_STEPS_PER_RUN,
            help="steps, and lineage events, of each run but the long one "
            f"(default {DEFAULT_STEPS_PER_RUN})",
        )
        parser.add_argument(
            "--requests",
            type=positive_int(1000),
            default=REQUESTS,
            help=f"timed requests per page (default {REQUESTS})",
        )
        parser.add_argument(
            "--reseed", action="store_true", help="drop the database and seed it again"
        )

    def handle(self, *args, **options) -> None:
        child = bool(os.environ.get(REEXEC_MARKER))
        # The child is given its database in DATABASE_URL, not on its command line,
        # where any user of the machine could read a password.
        url = (
            os.environ.get("DATABASE_URL", "")
            if child
            else options["database_url"] or DEFAULT_DATABASE_URL
        )
        target = bench_database(url)
        if not child:
            done = bench_database_prepare(target, reseed=options["reseed"])
            self.say(f"database: {database_described(target)} ({done})")
            arguments = [
                *("--runs", str(options["runs"])),
                *("--steps-per-run", str(options["steps_per_run"])),
                *("--requests", str(options["requests"])),
            ]
            command_in_child(self, "bench_pages", arguments, database_url=url)
            return
        if not same_database(target, connections["default"].settings_dict):
            raise CommandError(
                f"the bench was started on {database_described(target)} but Django is "
                f"configured for {database_described(connections['default'].settings_dict)}: "
                f"does {settings.SETTINGS_MODULE} read DATABASE_URL?"
            )
        call_command("migrate", interactive=False, verbosity=0)
        volume = Volume(runs=options["runs"], steps_per_run=options["steps_per_run"])
        self.volume_ensure(volume, target)
        self.pages_time(requests=options["requests"])

    def volume_ensure(self, volume: Volume, target: dict) -> None:
        """Seed the volume into an empty database; use one that holds it as it is."""
        from tasks.models import Task

        held = held_now()
        if holds_volume(held, volume):
            self.say("seeding: skipped, the database holds that volume already (--reseed)")
        elif held.runs == 0 and not Task.objects.filter(slug__startswith=TASK_PREFIX).exists():
            self.say(
                f"seeding: {volume.runs:,} runs, {volume.steps:,} steps, "
                f"{volume.events:,} lineage events..."
            )
            seconds = seed(volume)
            self.say(f"seeding: done in {seconds:.1f} s")
            held = held_now()
        else:
            raise CommandError(
                f"{database_described(target)} holds {held.runs:,} runs, {held.steps:,} "
                f"steps and {held.events:,} lineage events, not the {volume.runs:,}, "
                f"{volume.steps:,} and {volume.events:,} asked: pass --reseed to make it again"
            )
        self.say(
            f"runs: {held.runs:,}  steps: {held.steps:,}  lineage events: {held.events:,}  "
            f"approvals: {held.approvals:,} ({held.pending:,} pending)"
        )
        self.say(f"long run: {LONG_RUN_ID} ({LONG_RUN_STEPS} steps, {LONG_RUN_STEPS} events)")

    def pages_time(self, *, requests: int) -> None:
        from django.contrib.auth.models import User
        from django.test import Client

        admin = User.objects.get(username=ADMIN_USERNAME)
        with ExitStack() as stack:
            # As production serves pages: no debug cursor recording every query, and no
            # checkpoint log of this machine's own (the seeded trails are in none).
            stack.enter_context(mock.patch.object(settings, "DEBUG", False))
            stack.enter_context(scratch_checkpoints())
            hosts = [*settings.ALLOWED_HOSTS, "testserver"]
            stack.enter_context(mock.patch.object(settings, "ALLOWED_HOSTS", hosts))
            client = Client(raise_request_exception=False)
            client.force_login(admin)
            pages = pages_to_time()
            connecting = connect_ms()
            self.say(
                f"requests: 1 to warm up, 1 counting queries, {requests} timed per page, "
                f"through Django's test client as the superuser {ADMIN_USERNAME}; one "
                f"database connection kept (opening one takes {connecting:.1f} ms here, "
                "which each request adds where CONN_MAX_AGE is 0)"
            )
            self.say(f"load average before: {load_average() or 'unknown'}")
            self.say(
                f"{'page':<52} {'status':>6} {'median ms':>9} {'p90 ms':>8} {'queries':>7} "
                f"{'KiB':>8}  goal < {GOAL_MS:.0f} ms"
            )
            figures = []
            for page in pages:
                figure = page_time(client, page, requests=requests)
                figures.append(figure)
                self.say(figure_line(figure))
            self.say(f"load average after: {load_average() or 'unknown'}")
        self.summary(figures)

    def summary(self, figures: list[PageFigures]) -> None:
        answered = [f for f in figures if f.answered]
        missed = [f.page.path for f in answered if not f.meets_goal]
        refused = [f"{f.page.path} ({f.status})" for f in figures if not f.answered]
        self.say(
            f"pages under {GOAL_MS:.0f} ms: {len(answered) - len(missed)} of {len(figures)}"
            f"; missed: {', '.join(missed) or 'none'}"
            f"; not answering 200: {', '.join(refused) or 'none'}"
        )

    def say(self, line: str) -> None:
        self.stdout.write(line)


def figure_line(figure: PageFigures) -> str:
    path = figure.page.path
    if not figure.answered:
        said = f": {figure.said}" if figure.said else ""
        return f"{path:<52} {figure.status:>6}  answered {figure.status}, not 200: no figures{said}"
    verdict = "PASS" if figure.meets_goal else "MISS"
    return (
        f"{path:<52} {figure.status:>6} {figure.median_ms:>9.1f} {figure.p90_ms:>8.1f} "
        f"{figure.queries:>7} {figure.kib:>8.1f}  {verdict}"
    )
