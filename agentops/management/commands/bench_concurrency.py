"""``manage.py bench_concurrency``: how many runs the queue's worker processes keep in
flight while the model is slow, and what that costs them.

The model is agentops.latency_server, on this process's loopback; the workers are real
queue workers (``manage.py qcluster``, or ``celery -A agentops worker``) that the command
starts, configured through their environment, and stops, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from unittest import mock
from urllib.parse import quote, urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from django.db import connection, connections, transaction
from django.db.models import Count, Max, Min, QuerySet
from django.utils import timezone

from agentops.commands import ParagraphsCommand
from agentops.config import database_from_url
from agentops.latency_server import LatencyServer, ServerFigures
from agentops.management.commands.bench_engine import (
    REEXEC_MARKER,
    database_described,
    migrations_check,
    same_database,
    scratch_checkpoints,
)
from agentops.processes import STOP_SIGNALS, group_stop
from agentops.runtime import dispatch
from lineage.models import LineageEvent
from tasks.models import (
    AutonomyLevel,
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Task,
    Tool,
    ToolGrant,
)
from tasks.services import run_start

SCRATCH_FILE = "bench_concurrency.sqlite3"
# On PostgreSQL, the bench's own database: the prefix, then this process's pid.
SCRATCH_DATABASE_PREFIX = "agentops_bench_concurrency_"
MODEL_NAME = "bench-latency"
# What the workers send as their key: never a real one, which the environment may hold.
API_KEY = "latency-server"
LOOKUP_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1}},
    "required": ["n"],
    "additionalProperties": False,
}
POLL_SECONDS = 0.25
# A django-q2 cluster lets the job in hand finish; an async worker hands its runs back.
STOP_GRACE_SECONDS = 20.0
LOG_TAIL_LINES = 30
LOG_FILE = "bench_concurrency-workers.log"
# Rounds of a warm-up run per worker process, until each has worked one.
WARM_UP_ROUNDS = 5
# The reasons shown for runs that did not succeed: the most frequent, cut short.
REASONS_SHOWN = 5
REASON_CHARS = 300
# Queue messages the bench sends in one transaction (runs_send).
SEND_BATCH = 50
IN_PROGRESS = (RunStatus.QUEUED, RunStatus.RUNNING)

HELP = """\
Measure how many runs the queue's worker processes keep in flight while the model is
slow: --runs runs of --turns model turns each, against a local OpenAI-compatible server
that answers every call after --latency seconds (a plan, then one tool call a turn,
then a final answer). The bench starts --workers queue worker processes itself (one
`manage.py qcluster` with that many workers, or one `celery -A agentops worker` with that
many prefork children), each with AGENTOPS_WORKER_CONCURRENCY=--concurrency (0: inline,
a run holds its worker process for its whole slice), warms each worker process up with
a run of its own, queues the runs all at once, waits until every run has ended or
--timeout, and stops every process it started, also on Ctrl-C or an error.

It prints the wall time, from the first run queued to the last run's end as its worker
recorded it, against the model-bound ideal (turns x latency) and against the slot-bound
one (the runs in rounds of workers x concurrency slots); when the queue handed the runs
out (each run's claim); the most model calls in flight at once, counted by the model's
server; steps and model calls per second; the worker processes' memory at its peak (the
sum of the RSS of every process in their group, children included, and of their PSS,
which counts a page shared by forked processes once); the CPU the workers, the queue's own
processes, the bench and the rest of the machine spent meanwhile; and the errors: runs
that did not succeed and why, tool calls that failed, server errors.

Where it writes: a database of its own, made afresh at every start, on the kind that
--database-url or DATABASE_URL names: with neither, or a SQLite URL, the scratch file
var/bench_concurrency.sqlite3 (in AGENTOPS_VAR_DIR), deleted, created and migrated; with
a PostgreSQL URL, a database agentops_bench_concurrency_<pid> on that server, created,
migrated and dropped at the end whatever happens (the database named only lets the
bench in). --in-place works on the database named instead, already migrated, whose
django-q2 queue no other cluster reads; its runs stay, and --cleanup deletes them, the
bench task and its tool at the end (their lineage events stay: the trail is append-only
by design). --queue celery sends to the Redis broker --broker-url names (default:
REDIS_URL), on Celery's default queue, which the bench's workers read: give it a Redis
database of its own (redis://127.0.0.1:6379/11), never a deployment's.
"""


def whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is not between {minimum} and {maximum}")
        return value

    return parse


def seconds_between(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{value:g} s is not between {minimum:g} and {maximum:g} seconds"
            )
        return value

    return parse


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--runs", type=whole_number(1, 10_000), default=40, help="runs timed (default 40)"
        )
        parser.add_argument(
            "--turns",
            # The engine's first turn is always the plan; the last, the answer.
            type=whole_number(2, 1_000),
            default=5,
            help="model turns per run, the plan and the answer included (default 5)",
        )
        parser.add_argument(
            "--latency",
            type=seconds_between(0.001, 30.0),
            default=1.0,
            help="seconds the model takes to answer each call (default 1.0)",
        )
        parser.add_argument(
            "--workers",
            type=whole_number(1, 64),
            default=2,
            help="queue worker processes (default 2)",
        )
        parser.add_argument(
            "--concurrency",
            type=whole_number(0, 100_000),
            default=settings.AGENTOPS_WORKER_CONCURRENCY,
            help="AGENTOPS_WORKER_CONCURRENCY of each worker process; 0: inline (default: "
            f"as configured here, {settings.AGENTOPS_WORKER_CONCURRENCY})",
        )
        parser.add_argument(
            "--queue",
            choices=["q2", "celery"],
            default=settings.AGENTOPS_QUEUE,
            help=f"the queue the workers take runs from (default: {settings.AGENTOPS_QUEUE})",
        )
        parser.add_argument(
            "--timeout",
            type=seconds_between(1.0, 86_400.0),
            default=600.0,
            help="seconds the bench waits for its workers and runs, all told (default 600)",
        )
        parser.add_argument(
            "--database-url",
            default="",
            help="the kind of database (and its server) the bench makes its own on; with "
            f"--in-place, the database to bench (default: DATABASE_URL, else var/{SCRATCH_FILE})",
        )
        parser.add_argument(
            "--in-place",
            action="store_true",
            help="work on the database named, already migrated, instead of one of the bench's "
            "own; its runs stay unless --cleanup",
        )
        parser.add_argument(
            "--cleanup",
            action="store_true",
            help="--in-place: delete the bench's runs, task and tool at the end (their lineage "
            "stays)",
        )
        parser.add_argument(
            "--broker-url",
            default="",
            help="--queue celery: the Redis broker, a database of the bench's own (default: "
            "REDIS_URL)",
        )
        parser.add_argument(
            "--log",
            default="",
            help="the worker processes' log (default: var/bench_concurrency-workers.log)",
        )
        # Set by the bench for its own child process, on the PostgreSQL database it made.
        parser.add_argument("--scratch-made", action="store_true", help=argparse.SUPPRESS)

    def handle(self, *args, **options) -> None:
        named = options["database_url"] or os.environ.get("DATABASE_URL", "").strip()
        if options["in_place"] and not named:
            raise CommandError("--in-place needs --database-url or DATABASE_URL")
        if options["cleanup"] and not options["in_place"]:
            raise CommandError("--cleanup is for --in-place: the bench's own database goes anyway")
        if options["queue"] == "celery":
            # Checked first: a missing broker stops the bench before it makes anything.
            options["broker_url"] = options["broker_url"] or settings.REDIS_URL
            if not options["broker_url"]:
                raise CommandError("--queue celery needs --broker-url or REDIS_URL")
            broker_check(options["broker_url"])
        scratch_url = f"sqlite:///{settings.VAR_DIR / SCRATCH_FILE}"
        own = not (options["in_place"] or options["scratch_made"])
        url = scratch_url if own and not named else named
        try:
            target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        if own and target["ENGINE"].endswith("sqlite3"):
            url = scratch_url
            target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
        elif own:
            # A database of the bench's own on that server, benched by a child process.
            with scratch_postgres(url) as scratch_database_url:
                self.rerun_on(scratch_database_url, {**options, "scratch_made": True})
            return
        connection = connections["default"]
        if not same_database(target, connection.settings_dict):
            self.rerun_on(url, options)
            return
        if options["scratch_made"]:
            call_command("migrate", interactive=False, verbosity=0)
        elif own:
            # A fresh file: no queue message or run of an earlier bench is left to compete.
            connection.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{target['NAME']}{suffix}").unlink(missing_ok=True)
            call_command("migrate", interactive=False, verbosity=0)
        else:
            migrations_check(connection)
        try:
            with stop_signals_interrupt():
                self.bench(options, url=url, scratch=not options["in_place"])
        except KeyboardInterrupt:
            raise CommandError(
                "interrupted: the worker processes and the latency server are stopped"
            ) from None

    def rerun_on(self, url: str, options: dict) -> None:
        """Run this command again in a child process whose Django is configured for
        ``url``, and pass its output on."""
        if os.environ.get(REEXEC_MARKER):
            raise CommandError(
                f"the bench was started on {url} but Django is configured for "
                f"{database_described(connections['default'].settings_dict)}: "
                f"does {settings.SETTINGS_MODULE} read DATABASE_URL?"
            )
        # The URLs go in the environment, not on the command line, where any user of the
        # machine could read a password in them.
        arguments = []
        for name in ("runs", "turns", "latency", "workers", "concurrency", "queue", "timeout"):
            arguments += [f"--{name}", str(options[name])]
        if options["log"]:
            arguments += ["--log", options["log"]]
        for name in ("in_place", "cleanup", "scratch_made"):
            if options[name]:
                arguments.append(f"--{name.replace('_', '-')}")
        environment = {
            **os.environ,
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
            REEXEC_MARKER: "1",
        }
        if options["broker_url"]:
            environment["REDIS_URL"] = options["broker_url"]
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "bench_concurrency"]
        with (
            stop_signals_interrupt(),
            subprocess.Popen(
                [*command, *arguments],
                cwd=settings.BASE_DIR,
                env=environment,
                stdout=subprocess.PIPE,
                text=True,
            ) as child,
        ):
            try:
                for line in child.stdout:
                    self.stdout.write(line, ending="")
            except Interrupted as interruption:
                # Ctrl-C at a terminal reaches the child too (the same process group); a
                # SIGTERM sent to this process alone is passed on. Either way the child
                # stops its own workers, and this waits for it.
                if interruption.signum != signal.SIGINT:
                    child.terminate()
                child.wait()
                raise CommandError("interrupted: the bench's child process has stopped") from None
        if child.returncode != 0:
            raise CommandError(f"the bench stopped with exit status {child.returncode}")

    # The bench ---------------------------------------------------------------------

    def bench(self, options: dict, *, url: str, scratch: bool) -> None:
        runs, turns, latency = options["runs"], options["turns"], options["latency"]
        workers, concurrency, queue = options["workers"], options["concurrency"], options["queue"]
        deadline = time.monotonic() + options["timeout"]
        database = connections["default"].settings_dict
        if not scratch:
            made = ""
        elif database["ENGINE"].endswith("sqlite3"):
            made = " (a scratch file the bench made afresh)"
        else:
            made = " (a scratch database the bench made, dropped at the end)"
        self.say(f"database: {database_described(database)}{made}")
        mode = "inline" if concurrency == 0 else f"up to {concurrency} runs in flight each"
        self.say(f"queue: {queue}  worker processes: {workers} ({mode})")
        if queue == "celery":
            self.say(f"broker: {options['broker_url']} (Celery's default queue)")
        self.say(f"runs: {runs}  turns per run: {turns}  model latency: {latency:g} s")
        self.say(f"machine: {os.cpu_count()} CPUs, load average {load_average()} before")

        tool_name = f"bench_lookup_{uuid.uuid4().hex[:8]}"
        log = Path(options["log"]) if options["log"] else settings.VAR_DIR / LOG_FILE
        with ExitStack() as stack:
            # Measured as production runs: with DEBUG on, Django's cursor would time and
            # keep every statement (here, and in the workers through their environment).
            stack.enter_context(mock.patch.object(settings, "DEBUG", False))
            # The runs are queued where the workers read: this process sends them too.
            stack.enter_context(mock.patch.object(settings, "AGENTOPS_QUEUE", queue))
            if queue == "celery":
                stack.enter_context(celery_broker(options["broker_url"]))
            # A run's end writes a signed checkpoint: with the bench's own key and log,
            # never a deployment's; the worker processes read them from the environment.
            stack.enter_context(scratch_checkpoints())
            server = stack.enter_context(
                LatencyServer(latency=latency, turns=turns, tool=tool_name)
            )
            # Starting a run checks that its model is configured: here as in the workers.
            stack.enter_context(mock.patch.object(settings, "OPENAI_BASE_URL", server.base_url))
            stack.enter_context(mock.patch.object(settings, "OPENAI_API_KEY", API_KEY))
            task = bench_task_create(tool_name=tool_name, lookup_url=server.lookup_url, turns=turns)
            environment = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
                "DATABASE_URL": url,
                "DEBUG": "false",
                # This process's key, however it got it (DEBUG makes one in development).
                "SECRET_KEY": settings.SECRET_KEY,
                "AGENTOPS_QUEUE": queue,
                "AGENTOPS_WORKER_CONCURRENCY": str(concurrency),
                "AGENTOPS_Q2_WORKERS": str(workers),
                "OPENAI_BASE_URL": server.base_url,
                "OPENAI_API_KEY": API_KEY,
                "PYTHONUNBUFFERED": "1",
            }
            if queue == "celery":
                environment["REDIS_URL"] = options["broker_url"]
            worker = stack.enter_context(workers_started(queue, workers, environment, log))
            watch = WorkerWatch(worker, log)

            warm_up, warmed = self.warm_up(task, workers=workers, watch=watch, deadline=deadline)
            warm_up_failed = Run.objects.filter(pk__in=warm_up).exclude(status=RunStatus.SUCCEEDED)
            if warm_up_failed.exists():
                run = warm_up_failed.first()
                raise CommandError(
                    f"a warm-up run ended {run.status}: {run.reason or run.outcome}; "
                    f"server errors: {server.figures().errors}; the worker log: {log}\n"
                    f"{watch.log_tail()}"
                )
            self.say(
                f"warm-up: {len(warm_up)} runs, worked by {warmed} of {workers} worker processes"
            )

            timed_runs = Run.objects.filter(task=task).exclude(pk__in=warm_up)
            timed = runs_started(task, runs)
            watch.memory = GroupMemory()
            server.figures_reset()
            started_clock = time.monotonic()
            started_at = timezone.now()
            cpu_before = CpuReading.now(worker.pid)
            sessions_before = database_sessions()
            runs_send(timed)
            sent = time.monotonic() - started_clock
            ended = self.runs_wait(timed_runs, watch, deadline)
            waited = time.monotonic() - started_clock
            cpu = CpuUse.between(
                cpu_before,
                CpuReading.now(worker.pid),
                workers=claiming_processes([*warm_up, *timed]),
            )
            # Counted before the workers stop: a run they finish while stopping is not
            # the bench's to count.
            figures = server.figures()
            tally = runs_tally(timed_runs, since=started_at)
            sessions_after = database_sessions()
            sessions = None if sessions_before is None else sessions_after - sessions_before

        # The last run's end as its worker recorded it, not the poll that saw it.
        wall = (tally.last_end - started_at).total_seconds() if ended and tally.last_end else waited
        self.report(
            options,
            tally=tally,
            wall=wall,
            sent=sent,
            ended=ended,
            figures=figures,
            memory=watch.memory,
            cpu=cpu,
            sessions=sessions,
        )
        self.say(f"bench task: {task.slug}  worker process group: {worker.pid}  log: {log}")
        if options["cleanup"]:
            self.cleanup(task)
        elif not scratch:
            self.say(
                f"note: the bench wrote {len(timed) + len(warm_up)} runs to "
                f"{database_described(database)}, and they stay; --cleanup deletes them "
                "(their lineage events stay: the trail is append-only by design)"
            )

        problems = []
        if not ended:
            problems.append(f"not every run ended within --timeout {options['timeout']:g} s")
        if tally.not_succeeded:
            problems.append(f"{tally.not_succeeded} runs did not succeed ({tally.first_problem})")
        if tally.failed_calls:
            problems.append(f"{tally.failed_calls} tool calls failed")
        if figures.errors:
            problems.append(f"the latency server answered {figures.errors} requests with errors")
        if problems:
            raise CommandError("; ".join(problems))

    def warm_up(
        self, task: Task, *, workers: int, watch: WorkerWatch, deadline: float
    ) -> tuple[list[uuid.UUID], int]:
        """Runs until every worker process has worked one (its imports done, its async
        worker started, its connections open), in rounds of a run per process, at most
        ``WARM_UP_ROUNDS``: the queue decides which process takes a message, so one
        round may leave a process cold. The runs, and how many processes worked one."""
        warm_up: list[uuid.UUID] = []
        warmed = 0
        for _ in range(WARM_UP_ROUNDS):
            batch = runs_started(task, workers)
            warm_up += batch
            runs_send(batch)
            if not self.runs_wait(Run.objects.filter(pk__in=batch), watch, deadline):
                raise CommandError(
                    "the warm-up runs did not end within --timeout; the end of the worker "
                    f"log, {watch.log}:\n{watch.log_tail()}"
                )
            warmed = len(claiming_processes(warm_up))
            if warmed >= workers:
                break
        return warm_up, warmed

    def runs_wait(self, runs: QuerySet[Run], watch: WorkerWatch, deadline: float) -> bool:
        """Wait until none of the runs is queued or running (a run waiting on a person
        will not move in a bench: it counts as ended, not succeeded); False at the
        deadline. Stops with the worker log when the worker processes die."""
        runs = runs.filter(status__in=IN_PROGRESS)
        while True:
            watch.check()
            watch.memory.sample(watch.worker.pid)
            if not runs.exists():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)

    def report(
        self,
        options: dict,
        *,
        tally: Tally,
        wall: float,
        sent: float,
        ended: bool,
        figures: ServerFigures,
        memory: GroupMemory,
        cpu: CpuUse,
        sessions: int | None,
    ) -> None:
        runs, turns, latency = options["runs"], options["turns"], options["latency"]
        workers, concurrency = options["workers"], options["concurrency"]
        ideal = turns * latency
        slots = workers * max(concurrency, 1)
        rounds = math.ceil(runs / slots)
        self.say(f"wall time: {wall:.2f} s" + ("" if ended else " (timed out)"))
        self.say(
            f"model-bound ideal ({turns} turns x {latency:g} s): {ideal:.2f} s  "
            f"wall/ideal: {wall / ideal:.2f}"
        )
        self.say(
            f"slot-bound ideal ({runs} runs in {rounds} round{'s' if rounds > 1 else ''} of "
            f"{workers} x {max(concurrency, 1)} slots): {rounds * ideal:.2f} s  "
            f"wall/ideal: {wall / (rounds * ideal):.2f}"
        )
        self.say(f"runs queued: all {runs} in {sent:.2f} s")
        if tally.claims_after is not None:
            first, last = tally.claims_after
            self.say(
                f"runs claimed from the queue: the first after {first:.2f} s, the last after "
                f"{last:.2f} s ({tally.claimed} runs: {tally.claimed / max(last, 1e-9):.1f} a "
                "second)"
            )
        self.say(f"most model calls in flight: {figures.in_flight_peak} (of {runs} runs)")
        self.say(
            f"steps per second: {tally.steps / wall:.1f} ({tally.steps} steps)  "
            f"model calls per second: {figures.completions / wall:.1f} "
            f"({figures.completions} calls)"
        )
        self.say(
            f"worker memory at its peak, {memory.processes} processes: RSS "
            f"{memory.rss / 2**20:.1f} MiB, PSS {memory.pss / 2**20:.1f} MiB"
        )
        self.say(
            f"CPU while the timed runs were worked: worker processes "
            f"{cpu.workers:.1f} s ({cpu.worker_processes} that worked runs), the queue's "
            f"other processes {cpu.queue:.1f} s, this process {cpu.own:.1f} s (the model's "
            f"server, the polling), elsewhere on the machine {cpu.elsewhere:.1f} s (the "
            f"database server, Redis, anything else); the machine's {os.cpu_count()} CPUs "
            f"{cpu.machine_busy:.0%} busy"
        )
        if sessions is not None:
            self.say(
                f"database sessions opened while the timed runs were worked: {sessions} "
                "(every process's, this one's included: pg_stat_database)"
            )
        shown = ", ".join(f"{n} {status}" for status, n in sorted(tally.statuses.items()))
        self.say(
            f"errors: runs not succeeded: {tally.not_succeeded} ({shown})  tool calls failed: "
            f"{tally.failed_calls}  server errors: {figures.errors}"
        )
        for status, reason, n in tally.reasons:
            self.say(f"  {n} {status}: {reason or '(no reason recorded)'}")
        self.say(f"machine: load average {load_average()} after")

    def cleanup(self, task: Task) -> None:
        run_ids = list(Run.objects.filter(task=task).values_list("pk", flat=True))
        events = LineageEvent.objects.filter(run_uuid__in=run_ids).count()
        tools = list(Tool.objects.filter(grants__task=task))
        Run.objects.filter(pk__in=run_ids).delete()  # their steps go with them
        task.delete()  # its versions and grants go with it
        for tool in tools:
            tool.delete()
        self.say(
            f"cleanup: deleted {len(run_ids)} runs, their steps, the bench task and its tool; "
            f"their {events} lineage events stay: the trail is append-only by design"
        )

    def say(self, line: str) -> None:
        self.stdout.write(line)


# Helpers -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise ``Interrupted`` once, until the block ends; the signals
    that follow are ignored. SIGTERM's default action would end the bench without its
    ``finally`` blocks and orphan the worker processes (in sessions of their own), and a
    second KeyboardInterrupt could cut those blocks short. ``group_stop`` sets its own
    handlers while it stops a group: a signal then makes it kill the group at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, from /proc/loadavg."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown (no /proc/loadavg)"


def broker_check(url: str) -> None:
    """Stop now with a clear error when Celery's broker does not answer."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except ValueError as error:
        raise CommandError(f"--broker-url {url!r} is not a Redis URL ({error})") from None
    except redis.RedisError as error:
        raise CommandError(
            f"--queue celery: the broker at {url} does not answer ({error}); "
            "set --broker-url or REDIS_URL"
        ) from None


@contextlib.contextmanager
def celery_broker(url: str) -> Iterator[None]:
    """This process's Celery messages go to ``url`` until the block ends. The app reads
    its broker when it first sends and keeps the pools it built: they are forgotten
    before and after, as Celery and kombu themselves do after a fork."""
    import kombu.pools

    from agentops.celery import app

    def forget() -> None:
        app.__dict__.pop("amqp", None)
        app._pool = None
        kombu.pools.reset()

    with (
        mock.patch.object(settings, "CELERY_BROKER_URL", url),
        mock.patch.object(settings, "REDIS_URL", url),
    ):
        forget()
        try:
            yield
        finally:
            forget()


@contextlib.contextmanager
def scratch_postgres(url: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server that ``url`` names, until the
    block ends; then dropped, with any connection left to it, whatever happened. Its
    URL: ``url`` with the database's name in place of the one named there."""
    from django.db.utils import ConnectionHandler

    name = f"{SCRATCH_DATABASE_PREFIX}{os.getpid()}"
    target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
    # A connection of its own, outside Django's configured ones: the server's
    # maintenance database (``_nodb_cursor``), never the database named.
    handler = ConnectionHandler({"default": target})
    server = handler["default"]
    quoted = server.ops.quote_name(name)
    try:
        with server._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")  # an old pid's
            cursor.execute(f"CREATE DATABASE {quoted}")
    except Exception as error:
        raise CommandError(
            f"could not make the bench's database {name} on {database_described(target)}: {error}"
        ) from None
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{quote(name)}"))
    finally:
        with server._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        handler.close_all()


def bench_task_create(*, tool_name: str, lookup_url: str, turns: int) -> Task:
    """A fresh autonomous task on the latency server's model, granted a read-only HTTP
    tool of its own that the server answers at once. An HTTP tool, not a Python one: the
    worker processes run the queue's own commands and load no code of the bench's."""
    tool = Tool.objects.create(
        name=tool_name,
        kind=Tool.Kind.HTTP,
        description="Look a number up (the concurrency bench's instant read).",
        input_schema=LOOKUP_SCHEMA,
        side_effect="read",
        idempotency=Tool.Idempotency.KEY,
        config={
            "method": "GET",
            "url": lookup_url,
            "query": {"n": "{n}"},
            "allowed_hosts": ["127.0.0.1"],
            "allow_private": True,  # the latency server is on this machine's loopback
        },
        timeout_seconds=10.0,
    )
    slug = f"bench-concurrency-{uuid.uuid4().hex[:12]}"
    task = Task.objects.create(
        slug=slug,
        name=f"Concurrency bench {slug}",
        objective_template=f"Call {tool_name} on every turn but the last, then answer.",
        input_schema={"type": "object"},
        model=MODEL_NAME,
        # A model turn and a plan or call per turn, the answer, and room to spare.
        max_steps=2 * turns + 10,
        autonomy_level=AutonomyLevel.AUTONOMOUS,
        # The server's script ends with the answer: no self-check turn after it.
        self_check=False,
    )
    ToolGrant.objects.create(task=task, tool=tool)
    return task


@dataclass(frozen=True)
class Tally:
    """The timed runs as they stood when the bench stopped waiting."""

    statuses: dict[str, int]
    steps: int
    failed_calls: int  # tool steps that did not succeed
    first_problem: str  # the first run that did not succeed, and why
    # The runs that did not succeed, by status and reason, the most frequent first.
    reasons: list[tuple[str, str, int]]
    last_end: datetime | None
    claimed: int  # runs some worker claimed
    # Seconds from the first message sent to the first and the last run's first claim.
    claims_after: tuple[float, float] | None

    @property
    def not_succeeded(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != RunStatus.SUCCEEDED)


def runs_tally(runs: QuerySet[Run], *, since: datetime) -> Tally:
    statuses = dict(runs.values("status").annotate(n=Count("pk")).values_list("status", "n"))
    steps = Step.objects.filter(run__in=runs)
    failed_calls = steps.filter(kind=StepKind.TOOL).exclude(status=StepStatus.SUCCEEDED)
    not_succeeded = runs.exclude(status=RunStatus.SUCCEEDED)
    first = not_succeeded.first()
    first_problem = ""
    if first is not None:
        first_problem = f"run {first.pk}: {first.status}"
        first_problem += f": {first.reason}" if first.reason else ""
    reasons = list(
        not_succeeded.values("status", "reason")
        .annotate(n=Count("pk"))
        .order_by("-n", "status", "reason")
        .values_list("status", "reason", "n")[:REASONS_SHOWN]
    )
    # A run's started_at is set by its first claim (queued -> running), by the worker.
    claims = runs.aggregate(
        first=Min("started_at"),
        last=Max("started_at"),
        n=Count("started_at"),
        end=Max("finished_at"),
    )
    claims_after = None
    if claims["first"] is not None:
        claims_after = (
            (claims["first"] - since).total_seconds(),
            (claims["last"] - since).total_seconds(),
        )
    return Tally(
        statuses=statuses,
        steps=steps.count(),
        failed_calls=failed_calls.count(),
        first_problem=first_problem,
        reasons=[(status, reason[:REASON_CHARS], n) for status, reason, n in reasons],
        last_end=claims["end"],
        claimed=claims["n"],
        claims_after=claims_after,
    )


def database_sessions() -> int | None:
    """How many sessions PostgreSQL has opened to this database so far (its statistics,
    flushed first), or None on SQLite: a worker that reconnects for each job or queue
    operation opens thousands in a bench."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def claiming_processes(run_ids: list[uuid.UUID]) -> set[int]:
    """The ids of the worker processes on this machine that claimed these runs, as each
    claim's event names its worker: ``host:pid:slice``."""
    workers = LineageEvent.objects.filter(
        run_uuid__in=run_ids, kind=f"run.{RunStatus.RUNNING}"
    ).values_list("payload", flat=True)
    pids = set()
    for payload in workers:
        worker = payload.get("worker") if isinstance(payload, dict) else None
        host, _, pid = str(worker).rpartition(":")[0].rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            pids.add(int(pid))
    return pids


def runs_started(task: Task, count: int) -> list[uuid.UUID]:
    """Start ``count`` runs and hold their queue messages back (``runs_send`` sends
    them), so that the workers meet them all at once: starting a run takes longer than
    working a step of one, and the clock starts when they are sent."""
    held: list[uuid.UUID] = []
    with mock.patch.object(dispatch, "send", held.append):
        for _ in range(count):
            run_start(task=task, run_input={})
    return held


def runs_send(run_ids: list[uuid.UUID]) -> None:
    """Put the runs' messages on the queue, ``SEND_BATCH`` to a transaction.

    In production each message comes from the request or the trigger that started its
    run. Sent one by one from this one process, django-q2's ORM broker would open a
    new database connection for each (it closes "old" connections before every
    operation outside a transaction, and ours live for one: CONN_MAX_AGE 0): on
    PostgreSQL about 20 ms a message, so the bench's own sending, not the workers,
    would set the pace. In a transaction it keeps the connection; the messages of a
    batch reach the workers together when it commits."""
    # django-q2 logs each message it queues (INFO): a line a run, in the bench's output.
    q2_logger = logging.getLogger("django-q")
    level = q2_logger.level
    q2_logger.setLevel(max(level, logging.WARNING))
    try:
        for start in range(0, len(run_ids), SEND_BATCH):
            with transaction.atomic():
                for run_id in run_ids[start : start + SEND_BATCH]:
                    dispatch.send(run_id)
    finally:
        q2_logger.setLevel(level)


@contextlib.contextmanager
def workers_started(
    queue: str, workers: int, environment: dict[str, str], log: Path
) -> Iterator[subprocess.Popen]:
    """The queue's worker processes, in a process group of their own, until the block
    ends; then stopped, gracefully first, the whole group surely (``group_stop``)."""
    if queue == "celery":
        command = [sys.executable, "-m", "celery", "-A", "agentops", "worker"]
        command += ["--pool=prefork", f"--concurrency={workers}", "--loglevel=WARNING"]
        command += ["--hostname", f"agentops-bench-{os.getpid()}@%h"]
        command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    else:
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "qcluster"]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: its children end with it
        )
    try:
        yield process
    finally:
        group_stop(process, grace=STOP_GRACE_SECONDS)


@dataclass
class GroupMemory:
    """The memory of a process group at the sample where the sum of its RSS peaked."""

    rss: int = 0  # bytes
    pss: int = 0  # bytes: shared pages divided among the processes that share them
    processes: int = 0

    def sample(self, group: int) -> None:
        pids = group_members(group)
        rss = sum(process_bytes(pid, "statm") for pid in pids)
        if rss > self.rss:
            # PSS costs the kernel a walk of each process's pages: read at a new peak only.
            self.rss, self.processes = rss, len(pids)
            self.pss = sum(process_bytes(pid, "smaps_rollup") for pid in pids)


def group_members(group: int) -> list[int]:
    """The processes of process group ``group``: a worker process started in a session
    of its own and every process it started (its pool's children, a cluster's sentinel,
    pusher, monitor and workers), read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # The fields after the command name, which may hold spaces and parentheses:
            # state, ppid, pgrp, ...
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group:
            members.append(int(entry.name))
    return members


def process_bytes(pid: int, source: str) -> int:
    """A process's resident memory (``statm``) or proportional set size
    (``smaps_rollup``) in bytes; 0 for a process gone meanwhile."""
    try:
        text = Path(f"/proc/{pid}/{source}").read_text()
    except OSError:
        return 0
    if source == "statm":
        return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds spent so far: by each process of the worker group, by this process
    (all its threads: the model's server, the polling), and by the whole machine."""

    processes: dict[int, float]
    own: float
    machine_busy: float  # all CPUs together, every process's work
    machine_total: float

    @classmethod
    def now(cls, group: int) -> CpuReading:
        ticks = os.sysconf("SC_CLK_TCK")
        processes = {}
        for pid in group_members(group):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # gone meanwhile
            processes[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        own = os.times()
        busy = total = 0.0
        with contextlib.suppress(OSError):
            # cpu  user nice system idle iowait irq softirq steal ...
            counts = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            total = sum(counts[:8]) / ticks
            busy = total - (counts[3] + counts[4]) / ticks
        return cls(processes, own.user + own.system, busy, total)


@dataclass(frozen=True)
class CpuUse:
    """What the timed runs cost in CPU, from one reading to the next."""

    workers: float  # the processes that worked runs
    worker_processes: int
    queue: float  # the group's other processes: a cluster's sentinel, pusher, monitor
    own: float
    machine_busy: float  # the share of the machine's CPUs busy, others' work included
    machine_busy_seconds: float

    @property
    def elsewhere(self) -> float:
        """CPU seconds the machine spent outside the bench's processes: the database
        server, Redis, and whatever else runs here."""
        return max(0.0, self.machine_busy_seconds - self.workers - self.queue - self.own)

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading, *, workers: set[int]) -> CpuUse:
        spent = {
            pid: seconds - before.processes.get(pid, 0.0)
            for pid, seconds in after.processes.items()
        }
        total = after.machine_total - before.machine_total
        return cls(
            workers=sum(seconds for pid, seconds in spent.items() if pid in workers),
            worker_processes=len(workers & spent.keys()),
            queue=sum(seconds for pid, seconds in spent.items() if pid not in workers),
            own=after.own - before.own,
            machine_busy=(after.machine_busy - before.machine_busy) / total if total else 0.0,
            machine_busy_seconds=after.machine_busy - before.machine_busy,
        )


@dataclass
class WorkerWatch:
    worker: subprocess.Popen
    log: Path
    memory: GroupMemory = field(default_factory=GroupMemory)

    def check(self) -> None:
        if self.worker.poll() is not None:
            raise CommandError(
                f"the worker processes stopped (exit status {self.worker.returncode}); the "
                f"end of their log, {self.log}:\n{self.log_tail()}"
            )

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])
