"""``manage.py bench_engine``: what the durable step loop costs per agent step.

See docs/benchmarks.md for what each figure means and the figures measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.executor import MigrationExecutor

from agentops import bench
from agentops.commands import ParagraphsCommand
from agentops.config import database_from_url
from agentops.runtime import dispatch
from agentops.runtime.engine import Outcome, advance
from lineage.models import LineageEvent
from tasks.models import AutonomyLevel, Run, RunStatus, Task, Tool, ToolGrant
from tasks.services import run_start, tools_sync

SCRATCH_FILE = "bench.sqlite3"
# Set on the child when the command runs itself again on another database: the child
# must find that database configured, or something is wrong with the settings.
REEXEC_MARKER = "AGENTOPS_BENCH_REEXEC"


def command_in_child(
    command: BaseCommand, name: str, arguments: list[str], *, database_url: str
) -> None:
    """Run the management command ``name`` again in a child process whose Django
    settings name ``database_url`` (a database is fixed when the settings load), passing
    its output on; a child that fails fails the command."""
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
        REEXEC_MARKER: "1",
    }
    with subprocess.Popen(
        [sys.executable, str(settings.BASE_DIR / "manage.py"), name, *arguments],
        cwd=settings.BASE_DIR,
        env=environment,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        for line in child.stdout:
            command.stdout.write(line, ending="")
    if child.returncode != 0:
        raise CommandError(f"the bench stopped with exit status {child.returncode}")


COMMITS_GOAL = 3.0
RATIO_GOAL = 0.5  # agentops / LangGraph per-step overhead, on PostgreSQL
# --positions: the last POSITION_WINDOW agent steps of a run cost at most POSITION_GOAL
# times the first POSITION_WINDOW.
POSITION_WINDOW = 20
POSITION_GOAL = 1.2
LANGGRAPH_MODULES = (
    "langgraph.graph",
    "langgraph.checkpoint.sqlite",
    "langgraph.checkpoint.postgres",
)
WORKER_START_SECONDS = 120.0
WORKER_RUN_SECONDS = 1800.0

HELP = """\
Measure the engine's own cost per agent step (one model turn that asks for one tool
call, plus that call) with an instant scripted model and a no-op read-only tool: the
median and p90 overhead per agent step, agent steps per second with one worker and with
--workers processes, and the database commits and queries per agent step.

Where it writes: the bench makes real tasks, runs, steps and lineage events. With no
--database-url and no DATABASE_URL it uses a scratch SQLite file, var/bench.sqlite3 (in
AGENTOPS_VAR_DIR), that it creates and migrates itself. Otherwise it uses the database
named (already migrated): point DATABASE_URL at a scratch database such as
postgres://postgres@127.0.0.1:5432/agentops_bench, not a live one. Django's database is
fixed when the settings load, so when the bench's database is not the configured one,
the command runs itself again in a child process configured for it.

The runs stay. --cleanup deletes them, their steps and the bench task at the end; their
lineage events stay whatever you pass: the trail is append-only by design, and the
database refuses to delete it.

--compare langgraph runs the same workload on LangGraph, on the same kind of database
(SqliteSaver on a temporary SQLite file; PostgresSaver in a temporary schema of the same
PostgreSQL database), each of its runs right after one of agentops' so that both see the
same load on the machine, and prints the ratio of the overheads. It needs LangGraph:
pip install -e '.[bench]'.

--positions measures instead what an agent step costs by its position within a long run
(--steps 200 --runs 5, say): each position's median over the runs, the first 20 agent
steps against the last 20, with the time spent in the parts that read the run's record
each turn (the transcript, the loops check, the token estimate), and the machine's load
before and after. A step that cost more the longer the run would show here.
"""


def positive_int(maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is not between 1 and {maximum}")
        return value

    return parse


def same_database(one: dict, other: dict) -> bool:
    if one["ENGINE"] != other["ENGINE"]:
        return False
    if one["ENGINE"].endswith("sqlite3"):
        return Path(str(one["NAME"])).resolve() == Path(str(other["NAME"])).resolve()
    return all(
        str(one.get(key) or "") == str(other.get(key) or "")
        for key in ("NAME", "HOST", "PORT", "USER")
    )


@contextlib.contextmanager
def scratch_checkpoints() -> Iterator[Path]:
    """A new signing key and a checkpoint log in a temporary directory, in this process's
    settings and in the environment of the processes it starts, until the block ends."""
    import tempfile

    from lineage.anchoring import key_encode, new_seed

    with tempfile.TemporaryDirectory(prefix="agentops-bench-") as directory:
        log = Path(directory) / "lineage_checkpoints.jsonl"
        key = key_encode(new_seed())
        variables = {
            "AGENTOPS_LINEAGE_SIGNING_KEY": key,
            "AGENTOPS_LINEAGE_CHECKPOINT_FILE": str(log),
        }
        with (
            mock.patch.dict(os.environ, variables),
            mock.patch.object(settings, "AGENTOPS_LINEAGE_SIGNING_KEY", key),
            mock.patch.object(settings, "AGENTOPS_LINEAGE_CHECKPOINT_FILE", log),
            mock.patch.object(settings, "AGENTOPS_LINEAGE_SINK", "lineage.anchoring.FileSink"),
        ):
            yield log


def database_described(database: dict) -> str:
    if database["ENGINE"].endswith("sqlite3"):
        path = Path(str(database["NAME"])).resolve()
        shown = (
            path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path
        )
        return f"sqlite {shown}"
    where = f"{database.get('HOST') or 'localhost'}:{database.get('PORT') or 5432}"
    return f"postgresql {database['NAME']} on {where}"


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--runs", type=positive_int(10_000), default=20, help="runs timed (default 20)"
        )
        parser.add_argument(
            "--steps", type=positive_int(1_000), default=10, help="agent steps per run (10)"
        )
        parser.add_argument(
            "--workers",
            type=positive_int(64),
            default=2,
            help="worker processes for the parallel figure (default 2)",
        )
        parser.add_argument("--compare", choices=["langgraph"], help="also run LangGraph")
        parser.add_argument(
            "--database-url",
            default="",
            help=f"the database to bench (default: DATABASE_URL, else var/{SCRATCH_FILE})",
        )
        parser.add_argument(
            "--cleanup",
            action="store_true",
            help="delete the bench's runs and task at the end (their lineage stays)",
        )
        parser.add_argument(
            "--positions",
            action="store_true",
            help="instead, the cost of an agent step by its position within a long run "
            "(e.g. --steps 200 --runs 5): the first 20 agent steps against the last 20",
        )

    def handle(self, *args, **options) -> None:
        if options["compare"] == "langgraph":
            langgraph_check()
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

        scratch_database = database_from_url("scratch", scratch_url, base_dir=settings.BASE_DIR)
        scratch = same_database(scratch_database, connection.settings_dict)
        if scratch:
            call_command("migrate", interactive=False, verbosity=0)
        else:
            migrations_check(connection)
        if options["positions"]:
            self.bench_positions(options, scratch=scratch)
        else:
            self.bench(options, scratch=scratch)

    def rerun_on(self, url: str, options: dict) -> None:
        """Run this command again in a child process whose Django is configured for
        ``url``, and pass its output on."""
        if os.environ.get(REEXEC_MARKER):
            raise CommandError(
                f"the bench was started on {url} but Django is configured for "
                f"{database_described(connections['default'].settings_dict)}: "
                f"does {settings.SETTINGS_MODULE} read DATABASE_URL?"
            )
        arguments = ["--runs", str(options["runs"]), "--steps", str(options["steps"])]
        arguments += ["--workers", str(options["workers"]), "--database-url", url]
        if options["compare"]:
            arguments += ["--compare", options["compare"]]
        if options["cleanup"]:
            arguments.append("--cleanup")
        if options["positions"]:
            arguments.append("--positions")
        command_in_child(self, "bench_engine", arguments, database_url=url)

    # The bench ---------------------------------------------------------------------

    def bench(self, options: dict, *, scratch: bool) -> None:
        runs, steps, workers = options["runs"], options["steps"], options["workers"]
        connection = connections["default"]
        database = connection.settings_dict
        self.say(
            f"database: {database_described(database)}"
            + (" (a scratch file the bench migrates)" if scratch else "")
        )
        self.say(f"runs: {runs}  agent steps per run: {steps}  workers: {workers}")
        with ExitStack() as stack:
            # The bench advances every run itself. run_start's queue message would have a
            # running worker race it (and with Celery, need Redis): it is not sent.
            stack.enter_context(mock.patch.object(dispatch, "send", lambda run_id: None))
            # Measure the engine as it runs in production: with DEBUG on, Django's debug
            # cursor times and records every statement.
            stack.enter_context(mock.patch.object(settings, "DEBUG", False))
            # And as it ends a run in production: its trail is checkpointed (signed,
            # written, synced), here with a key and into a log of the bench's own, never
            # a deployment's; the worker processes read them from the environment.
            stack.enter_context(scratch_checkpoints())
            task = bench_task_create(steps=steps)

            # One run counted, outside the timings; it warms the caches up too.
            counted_run = bench_run_start(task, steps)
            with bench.database_counted(connection) as count:
                bench_advance(counted_run)

            # With --compare, each timed run is followed by a LangGraph run of the same
            # workload, so both figures are taken under the same load on the machine.
            langgraph = None
            if options["compare"] == "langgraph":
                langgraph = stack.enter_context(self.langgraph_started(steps=steps))
            timed_runs = [bench_run_start(task, steps) for _ in range(runs)]
            seconds, their_seconds = [], []
            for run in timed_runs:
                seconds.append(bench_advance(run))
                if langgraph is not None:
                    their_seconds.append(bench.langgraph_run(langgraph.app, steps=steps))
            overhead = bench.spread([s * 1000 / steps for s in seconds])

            parallel_runs = [bench_run_start(task, steps) for _ in range(max(runs, workers))]
            warm_up_runs = [bench_run_start(task, steps) for _ in range(workers)]
            parallel_seconds = self.workers_advance(parallel_runs, warm_up_runs)

        self.say(
            f"engine overhead per agent step: median {overhead.median:.2f} ms, "
            f"p90 {overhead.p90:.2f} ms"
        )
        self.say(f"agent steps per second, 1 worker: {runs * steps / sum(seconds):.1f}")
        self.say(
            f"agent steps per second, {workers} worker process{'es' if workers > 1 else ''}: "
            f"{len(parallel_runs) * steps / parallel_seconds:.1f}"
        )
        commits = count.commits / steps
        self.say(
            f"commits per agent step: {commits:.2f} ({count.commits} per run of {steps} "
            "agent steps, counted on one extra run)"
        )
        self.say(
            f"goal: at most {COMMITS_GOAL:g} commits per agent step: "
            + ("PASS" if commits <= COMMITS_GOAL else "MISS")
        )
        self.say(f"queries per agent step: {count.queries / steps:.2f} ({count.queries} per run)")

        made = Run.objects.filter(task=task)
        failed = made.exclude(status=RunStatus.SUCCEEDED)
        self.say(f"bench task: {task.slug}  runs made: {made.count()}  failed: {failed.count()}")
        if failed.exists():
            first = failed.first()
            raise CommandError(f"run {first.pk} ended {first.status}: {first.reason}")

        if langgraph is not None:
            self.langgraph_compare(langgraph.saver_name, their_seconds, steps, overhead.median)

        if options["cleanup"]:
            self.cleanup(task)
        elif scratch:
            self.say(
                f"note: the runs are in the scratch file {database['NAME']}; delete it "
                "whenever you like"
            )
        else:
            self.say(
                f"note: the bench wrote {made.count()} runs to the configured database "
                f"({database_described(database)}), and they stay. Point DATABASE_URL at a "
                "scratch database, or pass --cleanup to delete the runs (their lineage "
                "events stay: the trail is append-only by design)"
            )

    def bench_positions(self, options: dict, *, scratch: bool) -> None:
        """What an agent step costs by its position within a long run: the first
        ``POSITION_WINDOW`` agent steps against the last, each position's median over the
        runs. A step whose cost grew with the run's length would show here."""
        runs, steps = options["runs"], options["steps"]
        window = max(1, min(POSITION_WINDOW, steps // 2))
        database = connections["default"].settings_dict
        self.say(
            f"database: {database_described(database)}"
            + (" (a scratch file the bench migrates)" if scratch else "")
        )
        self.say(f"runs: {runs}  agent steps per run: {steps}  (cost by position)")
        self.say(f"load average before: {bench.load_average() or 'unknown'}")
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(dispatch, "send", lambda run_id: None))
            stack.enter_context(mock.patch.object(settings, "DEBUG", False))
            stack.enter_context(scratch_checkpoints())
            task = bench_task_create(steps=steps)
            bench_advance(bench_run_start(task, steps))  # warms the caches up
            clocks = []
            for _ in range(runs):
                run = bench_run_start(task, steps)
                with bench.positions_timed() as clock:
                    bench_advance(run)
                clocks.append(clock)
        self.say(f"load average after: {bench.load_average() or 'unknown'}")
        first, last = bench.position_windows(clocks, window=window)
        for span in (first, last):
            parts = ", ".join(f"{label} {ms:.3f}" for label, ms in span.parts.items())
            self.say(
                f"agent steps {span.first}-{span.last}: {span.milliseconds:.2f} ms per agent "
                f"step (of which, ms: {parts})"
            )
        ratio = last.milliseconds / first.milliseconds
        self.say(
            f"last {window} / first {window}: {ratio:.2f}; goal at most {POSITION_GOAL:g}: "
            + ("PASS" if ratio <= POSITION_GOAL else "MISS")
        )
        made = Run.objects.filter(task=task)
        failed = made.exclude(status=RunStatus.SUCCEEDED)
        self.say(f"bench task: {task.slug}  runs made: {made.count()}  failed: {failed.count()}")
        if failed.exists():
            first_failed = failed.first()
            raise CommandError(
                f"run {first_failed.pk} ended {first_failed.status}: {first_failed.reason}"
            )
        if options["cleanup"]:
            self.cleanup(task)

    def workers_advance(self, runs: list[Run], warm_up_runs: list[Run]) -> float:
        """Advance ``runs`` in one worker process per warm-up run, all at once; return
        the wall time from the start signal to the last worker's report."""
        workers = len(warm_up_runs)
        context = multiprocessing.get_context("spawn")
        messages = context.Queue()
        go = context.Event()
        database = dict(connections["default"].settings_dict)
        shares = [[str(run.pk) for run in runs[index::workers]] for index in range(workers)]
        processes = [
            context.Process(
                target=bench.worker_main,
                args=(settings.SETTINGS_MODULE, database, str(warm_up.pk), share, messages, go),
                name=f"bench-worker-{index}",
            )
            for index, (warm_up, share) in enumerate(zip(warm_up_runs, shares, strict=True))
        ]
        for process in processes:
            process.start()
        try:
            outcomes = []
            for _ in processes:
                outcomes += worker_message(messages, processes, "ready", WORKER_START_SECONDS)[2]
            started = time.perf_counter()
            go.set()
            for _ in processes:
                outcomes += worker_message(messages, processes, "done", WORKER_RUN_SECONDS)[2]
            seconds = time.perf_counter() - started
        finally:
            for process in processes:
                if not go.is_set():  # a worker failed to start: the others would wait on
                    process.terminate()
                process.join(timeout=30)
                if process.is_alive():
                    process.terminate()
                    process.join()
        unfinished = [o for o in outcomes if o != Outcome.FINISHED.value]
        if unfinished:
            raise CommandError(
                f"{len(unfinished)} runs in the worker processes did not finish: advance "
                f"returned {', '.join(sorted(set(unfinished)))}"
            )
        return seconds

    @contextlib.contextmanager
    def langgraph_started(self, *, steps: int) -> Iterator[LangGraphBench]:
        """The LangGraph app on a checkpointer on the same kind of database, warmed up
        by one run as agentops is."""
        connection = connections["default"]
        if connection.vendor == "postgresql":
            saver_name = "PostgresSaver, a temporary schema"
            saver = bench.langgraph_postgres_saver(connection.settings_dict)
        else:
            saver_name = "SqliteSaver, a temporary file"
            saver = bench.langgraph_sqlite_saver(langgraph_directory(connection.settings_dict))
        with saver as checkpointer:
            app = bench.langgraph_app(steps=steps, checkpointer=checkpointer)
            bench.langgraph_run(app, steps=steps)
            yield LangGraphBench(app=app, saver_name=saver_name)

    def langgraph_compare(
        self, saver_name: str, seconds: list[float], steps: int, mine: float
    ) -> None:
        connection = connections["default"]
        theirs = bench.spread([s * 1000 / steps for s in seconds])
        self.say(
            f"langgraph overhead per agent step ({saver_name}, durability=sync, its runs "
            f"alternating with agentops'): median {theirs.median:.2f} ms, "
            f"p90 {theirs.p90:.2f} ms"
        )
        ratio = mine / theirs.median
        self.say(f"ratio agentops/langgraph: {ratio:.2f}")
        if connection.vendor == "postgresql":
            verdict = "PASS" if ratio <= RATIO_GOAL else "MISS"
        else:
            verdict = f"not judged on {connection.vendor}"
        self.say(f"goal on PostgreSQL: ratio at most {RATIO_GOAL:g}: {verdict}")

    def cleanup(self, task: Task) -> None:
        run_ids = list(Run.objects.filter(task=task).values_list("pk", flat=True))
        events = LineageEvent.objects.filter(run_uuid__in=run_ids).count()
        Run.objects.filter(pk__in=run_ids).delete()  # their steps go with them
        task.delete()  # its versions and grants go with it
        self.say(
            f"cleanup: deleted {len(run_ids)} runs, their steps and the bench task; their "
            f"{events} lineage events stay: the trail is append-only by design"
        )

    def say(self, line: str) -> None:
        self.stdout.write(line)


# Helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LangGraphBench:
    app: Any
    saver_name: str


def langgraph_check() -> None:
    try:
        for module in LANGGRAPH_MODULES:
            importlib.import_module(module)
    except ImportError as error:
        raise CommandError(
            f"--compare langgraph needs LangGraph and its checkpointers ({error.name} is not "
            "installed): pip install -e '.[bench]'"
        ) from None


def langgraph_directory(database: dict) -> Path:
    """Where LangGraph's SQLite file goes: beside the bench's own, on the same disk."""
    name = str(database["NAME"])
    return Path(name).resolve().parent if name != ":memory:" else settings.VAR_DIR


def migrations_check(connection: BaseDatabaseWrapper) -> None:
    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        raise CommandError(
            f"{database_described(connection.settings_dict)} has unapplied migrations: run "
            "manage.py migrate on it first, or leave DATABASE_URL unset to bench a scratch "
            "SQLite file"
        )


def bench_task_create(*, steps: int) -> Task:
    """A fresh task: the bench's script and tool, autonomy 3, budget enough for the run."""
    tools_sync()
    slug = f"bench-{uuid.uuid4().hex[:12]}"
    task = Task.objects.create(
        slug=slug,
        name=f"Engine bench {slug}",
        objective_template=bench.BENCH_OBJECTIVE,
        input_schema={
            "type": "object",
            "properties": {"agent_steps": {"type": "integer", "minimum": 1}},
            "required": ["agent_steps"],
        },
        model=f"scripted:{bench.BENCH_SCRIPT}",
        # A model turn and a call per agent step, the final answer, and room to spare.
        max_steps=2 * steps + 10,
        autonomy_level=AutonomyLevel.AUTONOMOUS,
        # The workload ends with the final answer, as LangGraph's graph does: no
        # self-check turn after it.
        self_check=False,
    )
    ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=bench.BENCH_TOOL))
    return task


def bench_run_start(task: Task, steps: int) -> Run:
    return run_start(task=task, run_input={"agent_steps": steps})


def bench_advance(run: Run) -> float:
    """Advance the run in one slice; return the wall time of ``advance`` in seconds."""
    started = time.perf_counter()
    outcome = advance(run.pk, max_seconds=bench.SLICE_SECONDS)
    seconds = time.perf_counter() - started
    if outcome is not Outcome.FINISHED:
        raise CommandError(f"run {run.pk}: advance returned {outcome.value}, not finished")
    return seconds


def worker_message(messages: Any, processes: list, kind: str, timeout: float) -> tuple:
    """The next message from the workers; stops on a worker's failure, death or silence."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = messages.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise CommandError(
                    f"{dead[0].name} died (exit status {dead[0].exitcode}) before it reported"
                ) from None
            continue
        if message[0] == "failed":
            raise CommandError(f"a bench worker (pid {message[1]}) failed:\n{message[2]}")
        if message[0] != kind:
            raise CommandError(f"a bench worker said {message[0]!r}, expected {kind!r}")
        return message
    raise CommandError(f"no bench worker said {kind!r} within {timeout:.0f} seconds")
