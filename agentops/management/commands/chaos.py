"""``manage.py chaos``: runs that make real side effects while their workers are killed,
and what came of it. See agentops/chaos.py for the parts and for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from django.db import InterfaceError, OperationalError, connections
from django.utils import timezone

from agentops.chaos import (
    ChaosTally,
    EffectSink,
    Kill,
    PostgresCluster,
    WorkerPool,
    chaos_input,
    chaos_tally,
    chaos_task_create,
    conninfo_of,
    lease_owners_alive,
    runs_in_progress,
)
from agentops.commands import ParagraphsCommand
from agentops.config import database_from_url
from agentops.management.commands.bench_concurrency import (
    broker_check,
    load_average,
    seconds_between,
    stop_signals_interrupt,
    whole_number,
)
from agentops.management.commands.bench_engine import (
    REEXEC_MARKER,
    database_described,
    migrations_check,
    same_database,
    scratch_checkpoints,
)
from agentops.runtime import dispatch
from agentops.runtime.engine.leases import connection_drop
from agentops.runtime.scheduler import runs_reap
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Task
from tasks.services import run_start

SCRATCH_FILE = "chaos.sqlite3"
POLL_SECONDS = 0.2
PROGRESS_SECONDS = 10.0
LOG_TAIL_LINES = 30
EXAMPLES_SHOWN = 5
# Options passed on as they are when the command runs itself again on another database.
PASSED_ON = (
    "runs",
    "calls",
    "queue",
    "workers",
    "processes",
    "concurrency",
    "kill_every",
    "kill",
    "kills",
    "seed",
    "latency",
    "lease_seconds",
    "requeue_after",
    "reap_every",
    "timeout",
    "broker_url",
    "log",
)

HELP = """\
Make --runs runs of --calls side-effecting calls each (one call a model turn, half to
an idempotent http tool, half to one that is not), through real queue workers that the
command starts, while it SIGKILLs one of them every --kill-every seconds (a random time,
drawn from --seed) and starts it again; with --restart-db, PostgreSQL is restarted twice
as well (when a third and two thirds of the runs are at rest). The calls go to an effect
sink on 127.0.0.1 that records every request: the idempotent side honours the
Idempotency-Key as a real idempotent API does (a repeat gets the first answer and makes
no new effect), the other makes an effect for every request.

When every run is at rest (ended, or waiting for a person) or at --timeout, it stops the
workers and prints what must be zero, and more:

  duplicate effects   a run's call that took effect more than once at the sink
  blind re-fires      a step's call sent again to the non-idempotent side
  lost runs           not at rest at the end and not moved for longer than a recovery
                      takes (a lease, the requeue wait, two reaper passes, 10 s)
  chains intact       every run's lineage verified against the signed checkpoints
  disagreements       a step recorded as succeeded that the sink did not make, or with
                      another answer; an effect whose key no tool step carries

and the runs by status, the runs waiting for a person on an unknown outcome (allowed: a
call to the non-idempotent tool in flight at a kill must become unknown, never be sent
again), and how many of those calls the sink did make. It exits non-zero when any of the
first five is not zero, or when the time bound came before every run was at rest.

The workers: --workers queue workers (`manage.py qcluster`, or `celery -A agentops
worker` with --queue celery), each with --processes worker processes and
AGENTOPS_WORKER_CONCURRENCY=--concurrency (0: inline, a run holds a process for its
slice). A kill ends one process holding a run (its queue's master starts another) or a
whole worker, pool and all (the command starts another): --kill. The command plays the
scheduler: it runs the reaper every --reap-every seconds (a deployment runs it every
minute), with the workers' leases at --lease-seconds, so that a recovery takes seconds.

Where it writes: with no --database-url and no DATABASE_URL, a scratch SQLite file,
var/chaos.sqlite3, deleted, made and migrated at every start. Otherwise the database
named, already migrated: a scratch one (postgres://postgres@127.0.0.1:5432/agentops_chaos)
whose django-q2 queue no other cluster reads. --restart-db needs PostgreSQL on this
machine (pg_ctlcluster), and leaves it running. --queue celery uses the broker of
--broker-url (default: REDIS_URL), on Celery's default queue: give it a Redis database
of its own (redis://127.0.0.1:6379/13). The runs stay; --cleanup deletes them, the task
and its tools at the end (their lineage events stay: the trail is append-only).
"""


def seconds_range(text: str) -> tuple[float, float]:
    """``"1-5"``: from 1 to 5 seconds; ``"2"``: 2 seconds."""
    low, _, high = text.partition("-")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds or a range such as 1-5"
        ) from None
    if not 0.1 <= bounds[0] <= bounds[1] <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give seconds from 0.1 to 3600, the smaller first"
        )
    return bounds


@dataclass
class ChaosClock:
    """What happened while the runs were worked."""

    kills: list[Kill] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)  # seconds each took
    wall: float = 0.0
    timed_out: bool = False
    own_read_failures: int = 0  # this process's reads that met the database away


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        add = parser.add_argument
        add("--runs", type=whole_number(1, 10_000), default=100, help="runs (default 100)")
        add(
            "--calls",
            type=whole_number(1, 200),
            default=10,
            help="side-effecting calls per run (default 10)",
        )
        add(
            "--queue",
            choices=["q2", "celery"],
            default=settings.AGENTOPS_QUEUE,
            help=f"the queue the workers take runs from (default: {settings.AGENTOPS_QUEUE})",
        )
        add("--workers", type=whole_number(1, 16), default=2, help="queue workers (default 2)")
        add(
            "--processes",
            type=whole_number(1, 16),
            default=2,
            help="worker processes in each queue worker (default 2)",
        )
        add(
            "--concurrency",
            type=whole_number(0, 100_000),
            default=settings.AGENTOPS_WORKER_CONCURRENCY,
            help="AGENTOPS_WORKER_CONCURRENCY of the workers; 0: inline (default: as "
            f"configured here, {settings.AGENTOPS_WORKER_CONCURRENCY})",
        )
        add(
            "--kill-every",
            type=seconds_range,
            default=(1.0, 5.0),
            metavar="MIN-MAX",
            help="seconds between kills, drawn at random in this range (default 1-5)",
        )
        add(
            "--kill",
            choices=["process", "group", "mixed"],
            default="mixed",
            help="what a kill ends: one process holding a run, a whole worker, or either "
            "at random (default mixed)",
        )
        add(
            "--kills",
            type=whole_number(0, 100_000),
            default=None,
            help="stop killing after this many (default: until every run is at rest)",
        )
        add("--seed", type=int, default=1, help="the seed of the kills' times and targets")
        add(
            "--restart-db",
            action="store_true",
            help="restart PostgreSQL twice during the run (a local cluster only)",
        )
        add(
            "--latency",
            type=seconds_between(0.0, 30.0),
            default=0.1,
            help="seconds the sink takes to answer, after it made the effect (default 0.1)",
        )
        add(
            "--lease-seconds",
            type=seconds_between(5.0, 600.0),
            default=5.0,
            help="the workers' AGENTOPS_LEASE_SECONDS (default 5)",
        )
        add(
            "--requeue-after",
            type=seconds_between(1.0, 3600.0),
            default=30.0,
            help="seconds a queued run waits unclaimed before the reaper sends it again "
            "(default 30)",
        )
        add(
            "--reap-every",
            type=seconds_between(0.2, 120.0),
            default=1.0,
            help="seconds between the reaper's passes (default 1)",
        )
        add(
            "--timeout",
            type=seconds_between(1.0, 86_400.0),
            default=900.0,
            help="seconds the runs get to come to rest, kills included (default 900)",
        )
        add(
            "--database-url",
            default="",
            help=f"the database (default: DATABASE_URL, else var/{SCRATCH_FILE})",
        )
        add(
            "--broker-url",
            default="",
            help="--queue celery: the Redis broker (default: REDIS_URL)",
        )
        add(
            "--log",
            default="",
            help="the workers' log (default: var/chaos-workers.log)",
        )
        add(
            "--cleanup",
            action="store_true",
            help="delete the runs, the task and its tools at the end (their lineage stays)",
        )

    def handle(self, *args, **options) -> None:
        self.verbosity = options["verbosity"]
        scratch_url = f"sqlite:///{settings.VAR_DIR / SCRATCH_FILE}"
        url = options["database_url"] or os.environ.get("DATABASE_URL", "").strip() or scratch_url
        try:
            target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        connection = connections["default"]
        if not same_database(target, connection.settings_dict):
            self.rerun_on(url, options)
            return
        cluster = None
        if options["restart_db"]:
            if connection.vendor != "postgresql":
                raise CommandError(
                    "--restart-db restarts PostgreSQL: run on a DATABASE_URL=postgres://... "
                    f"database, not {database_described(connection.settings_dict)}"
                )
            try:
                cluster = PostgresCluster.serving(connection.settings_dict)
            except ValueError as error:
                raise CommandError(str(error)) from None
        if options["queue"] == "celery":
            options["broker_url"] = (
                options["broker_url"] or os.environ.get("REDIS_URL", "") or settings.REDIS_URL
            )
            if not options["broker_url"]:
                raise CommandError("--queue celery needs --broker-url or REDIS_URL")
            broker_check(options["broker_url"])
        scratch_database = database_from_url("scratch", scratch_url, base_dir=settings.BASE_DIR)
        scratch = same_database(scratch_database, connection.settings_dict)
        if scratch:
            # A fresh file: no queue message or run of an earlier chaos run is left.
            connection.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{scratch_database['NAME']}{suffix}").unlink(missing_ok=True)
            call_command("migrate", interactive=False, verbosity=0)
        else:
            migrations_check(connection)
        try:
            with stop_signals_interrupt():
                self.chaos(options, url=url, scratch=scratch, cluster=cluster)
        except KeyboardInterrupt:
            raise CommandError(
                "interrupted: the workers and the sink are stopped"
                + (", PostgreSQL is running" if cluster else "")
            ) from None

    def rerun_on(self, url: str, options: dict) -> None:
        """Run this command again in a child process whose Django is configured for
        ``url``, and pass its output on."""
        if os.environ.get(REEXEC_MARKER):
            raise CommandError(
                f"the chaos run was started on {url} but Django is configured for "
                f"{database_described(connections['default'].settings_dict)}: "
                f"does {settings.SETTINGS_MODULE} read DATABASE_URL?"
            )
        arguments = ["--database-url", url, "--verbosity", str(options["verbosity"])]
        for name in PASSED_ON:
            value = options[name]
            if value is None or value == "":
                continue
            if name == "kill_every":
                value = f"{value[0]:g}-{value[1]:g}"
            arguments += [f"--{name.replace('_', '-')}", str(value)]
        for flag in ("restart_db", "cleanup"):
            if options[flag]:
                arguments.append(f"--{flag.replace('_', '-')}")
        environment = {
            **os.environ,
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
            REEXEC_MARKER: "1",
        }
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), "chaos"]
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
            except KeyboardInterrupt:
                child.terminate()  # it stops its own workers; this waits for it
                child.wait()
                raise
        if child.returncode != 0:
            raise CommandError(f"the chaos run stopped with exit status {child.returncode}")

    # The chaos run ------------------------------------------------------------------

    def chaos(
        self, options: dict, *, url: str, scratch: bool, cluster: PostgresCluster | None
    ) -> None:
        runs, calls, queue = options["runs"], options["calls"], options["queue"]
        workers, processes = options["workers"], options["processes"]
        concurrency, seed = options["concurrency"], options["seed"]
        low, high = options["kill_every"]
        database = connections["default"].settings_dict
        log = Path(options["log"] or settings.VAR_DIR / "chaos-workers.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")

        self.say(
            f"chaos: {runs} runs x {calls} side-effecting calls ({(calls + 1) // 2} "
            f"idempotent, {calls // 2} not), seed {seed}"
        )
        self.say(
            f"database: {database_described(database)}"
            + (" (a scratch file made afresh)" if scratch else "")
        )
        mode = "inline" if concurrency == 0 else f"up to {concurrency} runs in flight each"
        self.say(
            f"queue: {queue}, {workers} workers x {processes} processes, {mode} "
            f"(AGENTOPS_WORKER_CONCURRENCY={concurrency})"
        )
        what = {"process": "a process holding a run", "group": "a whole worker"}.get(
            options["kill"], "a process holding a run or a whole worker"
        )
        limit = f", at most {options['kills']}" if options["kills"] is not None else ""
        self.say(
            f"killing: {what}, SIGKILLed every {low:g}-{high:g} s{limit}; database restarts: "
            + (f"2 (PostgreSQL {cluster.version}/{cluster.name})" if cluster else "none")
        )
        self.say(
            f"leases: {options['lease_seconds']:g} s; the reaper every {options['reap_every']:g}"
            f" s, a queued run sent again after {options['requeue_after']:g} s; the sink "
            f"answers in {options['latency']:g} s"
        )
        self.say(f"machine: {os.cpu_count()} CPUs, load average {load_average()} before")

        with ExitStack() as stack:
            # The runs are queued where the workers read: this process sends them too,
            # the reaper's included.
            stack.enter_context(mock.patch.object(settings, "AGENTOPS_QUEUE", queue))
            stack.enter_context(loggers_quiet("django-q", "agentops.scheduler"))
            if queue == "celery":
                stack.enter_context(celery_broker(options["broker_url"]))
            # The reaper here sends a queued run again after --requeue-after (it waits a
            # lease, AGENTOPS_LEASE_SECONDS, in a deployment); the workers' own leases
            # are --lease-seconds, from their environment.
            stack.enter_context(
                mock.patch.object(settings, "AGENTOPS_LEASE_SECONDS", options["requeue_after"])
            )
            # A run's end writes a signed checkpoint: with a key and a log of this run's
            # own, never a deployment's; the workers read them from the environment.
            stack.enter_context(scratch_checkpoints())
            sink = stack.enter_context(EffectSink(latency=options["latency"]))
            task = chaos_task_create(
                sink=sink, calls=calls, timeout=max(10.0, 20 * options["latency"])
            )
            environment = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
                "DATABASE_URL": url,
                "AGENTOPS_QUEUE": queue,
                "AGENTOPS_WORKER_CONCURRENCY": str(concurrency),
                "AGENTOPS_Q2_WORKERS": str(processes),
                "AGENTOPS_LEASE_SECONDS": str(options["lease_seconds"]),
                "PYTHONUNBUFFERED": "1",
            }
            if queue == "celery":
                environment["REDIS_URL"] = options["broker_url"]
            pool = WorkerPool(
                queue=queue,
                processes=processes,
                environment=environment,
                log=log,
                root=settings.BASE_DIR,
            )
            stack.callback(pool.stop)
            if cluster is not None:
                # Before the workers are stopped (the callbacks run last first), and
                # whatever happened: PostgreSQL is left running.
                stack.callback(cluster.ensure_running)
            pool.start(workers)
            run_ids = runs_started(task, runs, calls)
            clock = self.runs_work(options, task=task, pool=pool, cluster=cluster)
            ended_at = timezone.now()
            owners_alive = lease_owners_alive(runs_in_progress(Run.objects.filter(task=task)))
            pool.stop()
            stall = (
                options["lease_seconds"] + options["requeue_after"] + 2 * options["reap_every"] + 10
            )
            tally = chaos_tally(
                task, sink, stall=stall, ended_at=ended_at, owners_alive=owners_alive
            )

        self.report(options, clock=clock, tally=tally, pool=pool, log=log)
        self.say(f"chaos task: {task.slug}  runs: {len(run_ids)}  workers' log: {log}")
        if options["cleanup"]:
            self.cleanup(task)
        if not tally.passed or clock.timed_out:
            raise CommandError("the chaos run found faults: " + "; ".join(faults(tally, clock)))

    def runs_work(
        self, options: dict, *, task: Task, pool: WorkerPool, cluster: PostgresCluster | None
    ) -> ChaosClock:
        """Let the workers work the runs, killing one every so often, restarting the
        database where asked, and reaping as a scheduler would, until every run is at
        rest or the time bound."""
        rng = random.Random(options["seed"])
        low, high = options["kill_every"]
        runs = Run.objects.filter(task=task)
        total = options["runs"]
        restart_at = [total / 3, 2 * total / 3] if cluster is not None else []
        conninfo = conninfo_of(connections["default"].settings_dict)
        clock = ChaosClock()
        started = time.monotonic()
        deadline = started + options["timeout"]
        next_kill = None  # the first kill's clock starts when a worker holds a run
        next_reap = started + options["reap_every"]
        next_progress = started + PROGRESS_SECONDS
        while True:
            now = time.monotonic()
            pool.replace_stopped()
            try:
                in_progress = runs_in_progress(runs).count()
                if in_progress == 0:
                    break
                if now >= deadline:
                    clock.timed_out = True
                    break
                if now >= next_reap:
                    runs_reap()
                    next_reap = now + options["reap_every"]
                if next_kill is None and runs.filter(status=RunStatus.RUNNING).exists():
                    next_kill = now + rng.uniform(low, high)
                kills_left = options["kills"] is None or len(clock.kills) < options["kills"]
                if kills_left and next_kill is not None and now >= next_kill:
                    kill = pool.kill(rng, mode=options["kill"], at=now - started)
                    if kill is not None:
                        clock.kills.append(kill)
                        self.note(
                            f"  {kill.at:6.1f} s: killed {kill.kind} {kill.pid} (worker "
                            f"{kill.group}), holding {kill.runs_held} runs"
                        )
                    next_kill = now + rng.uniform(low, high)
            except (OperationalError, InterfaceError):
                # The database is away (restarting): this process's reads wait for it.
                clock.own_read_failures += 1
                connection_drop()
                time.sleep(POLL_SECONDS)
                continue
            at_rest = total - in_progress
            if restart_at and at_rest >= restart_at[0]:
                restart_at.pop(0)
                self.note(f"  {now - started:6.1f} s: restarting PostgreSQL")
                connection_drop()
                try:
                    clock.restarts.append(cluster.restart(conninfo))
                except RuntimeError as error:
                    raise CommandError(f"--restart-db: {error}") from None
            if now >= next_progress:
                self.say(
                    f"  {now - started:6.1f} s: {at_rest} of {total} runs at rest, "
                    f"{len(clock.kills)} kills"
                )
                next_progress = now + PROGRESS_SECONDS
            time.sleep(POLL_SECONDS)
        clock.wall = time.monotonic() - started
        return clock

    def report(
        self, options: dict, *, clock: ChaosClock, tally: ChaosTally, pool: WorkerPool, log: Path
    ) -> None:
        total = options["runs"]
        self.say(
            f"wall time: {clock.wall:.1f} s ("
            + ("the time bound came first" if clock.timed_out else "every run at rest")
            + ")"
        )
        processes = sum(1 for k in clock.kills if k.kind == "process")
        self.say(
            f"kills made: {len(clock.kills)} ({processes} of a worker process holding a run, "
            f"{len(clock.kills) - processes} of a whole worker); runs the killed held: "
            f"{sum(k.runs_held for k in clock.kills)}"
        )
        if clock.restarts:
            took = ", ".join(f"{seconds:.1f} s" for seconds in clock.restarts)
            self.say(f"database restarts: {len(clock.restarts)} (down and back: {took})")
        if pool.stopped_by_themselves:
            self.say(
                f"workers that stopped by themselves (started again): "
                f"{len(pool.stopped_by_themselves)}; see {log}"
            )
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(tally.by_status.items()))
        self.say(f"runs by status: {statuses} (of {total})")
        never_reached = tally.unknown_steps - tally.unknown_made
        self.say(
            f"waiting for a person on an unknown outcome: {tally.waiting_unknown} runs; of "
            f"the calls left unknown ({tally.unknown_steps}), the sink made "
            f"{tally.unknown_made} and {never_reached} never reached it"
        )
        if tally.waiting_other:
            other = ", ".join(f"{n} {kind}" for kind, n in sorted(tally.waiting_other.items()))
            self.say(f"waiting for a person on something else: {other}")
        for reason, n in sorted(tally.reasons.items()):
            self.say(f"  {n} x {reason}")
        steps = ", ".join(f"{n} {status}" for status, n in sorted(tally.tool_steps.items()))
        self.say(f"tool steps: {steps or 'none'}")
        self.say(
            f"recoveries: {tally.recoveries} (run.recovered); idempotent calls retried with "
            f"their key: {tally.retried} (tool.retried)"
        )
        effects = ", ".join(f"{n} {side}" for side, n in sorted(tally.effects.items()))
        self.say(
            f"the sink: {tally.requests} requests; effects: {effects or 'none'}; re-sends "
            f"answered from their key: {tally.resends}"
        )
        self.say(f"duplicate effects: {tally.duplicate_effects}")
        for example in tally.duplicate_examples:
            self.say(f"  {example}")
        self.say(f"blind re-fires: {tally.blind_refires}")
        for example in tally.refire_examples:
            self.say(f"  {example}")
        self.say(f"lost runs: {len(tally.lost)}")
        for lost in tally.lost[:EXAMPLES_SHOWN]:
            self.say(f"  {lost.describe()}")
        if tally.unfinished:
            self.say(f"runs still moving at the time bound: {len(tally.unfinished)}")
            for run in tally.unfinished[:EXAMPLES_SHOWN]:
                self.say(f"  {run.describe()}")
        self.say(f"chains intact: {tally.chains - len(tally.chains_broken)} of {tally.chains}")
        for broken in tally.chains_broken[:EXAMPLES_SHOWN]:
            self.say(f"  {broken}")
        self.say(f"records that disagree with the sink: {len(tally.disagreements)}")
        for disagreement in tally.disagreements[:EXAMPLES_SHOWN]:
            self.say(f"  {disagreement}")
        self.say(f"machine: load average {load_average()} after")
        self.say(
            "result: "
            + (
                "the three zeros hold and every chain is intact"
                if tally.passed and not clock.timed_out
                else "FAULTS: " + "; ".join(faults(tally, clock))
            )
        )

    def cleanup(self, task: Task) -> None:
        run_ids = list(Run.objects.filter(task=task).values_list("pk", flat=True))
        events = LineageEvent.objects.filter(run_uuid__in=run_ids).count()
        tools = list(task.tools.all())
        Run.objects.filter(pk__in=run_ids).delete()  # their steps and approvals go with them
        task.delete()  # its versions and grants go with it
        for tool in tools:
            tool.delete()
        self.say(
            f"cleanup: deleted {len(run_ids)} runs, their steps, the task and its tools; "
            f"their {events} lineage events stay: the trail is append-only by design"
        )

    def say(self, line: str) -> None:
        self.stdout.write(line)

    def note(self, line: str) -> None:
        """A line for -v 2: each kill and restart as it happens."""
        if self.verbosity >= 2:
            self.stdout.write(line)


# Helpers -----------------------------------------------------------------------------


def faults(tally: ChaosTally, clock: ChaosClock) -> list[str]:
    found = []
    if tally.duplicate_effects:
        found.append(f"{tally.duplicate_effects} duplicate effects")
    if tally.blind_refires:
        found.append(f"{tally.blind_refires} blind re-fires")
    if tally.lost:
        found.append(f"{len(tally.lost)} lost runs")
    if tally.chains_broken:
        found.append(f"{len(tally.chains_broken)} broken chains")
    if tally.disagreements:
        found.append(f"{len(tally.disagreements)} records that disagree with the sink")
    if clock.timed_out:
        found.append(
            f"{len(tally.unfinished) + len(tally.lost)} runs not at rest at the time bound"
        )
    return found


def runs_started(task: Task, count: int, calls: int) -> list[uuid.UUID]:
    """Start the runs, holding their queue messages back, then send them all at once:
    the workers meet every run together."""
    held: list[uuid.UUID] = []
    run_input = chaos_input(task, calls)
    with mock.patch.object(dispatch, "send", held.append):
        for _ in range(count):
            run_start(task=task, run_input=run_input)
    for run_id in held:
        dispatch.send(run_id)
    return held


@contextlib.contextmanager
def loggers_quiet(*names: str) -> Iterator[None]:
    """Only warnings from these loggers until the block ends: django-q2 logs each message
    it queues and the reaper each pass that sends one (INFO), lines the report says in
    figures."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def celery_broker(url: str) -> Iterator[None]:
    """This process's Celery messages to ``url`` until the block ends. The app reads its
    broker when it first sends and keeps what it built: forgotten before and after."""
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
