"""The engine bench's workload and measures (``manage.py bench_engine``).

An agent step is one model turn that asks for one tool call, plus that call. The model
(the ``bench-agent`` script) and the tool (``bench_noop``) are instant, so what a run
costs is the engine's own work: its reads, its commits, its bookkeeping.

This module is importable before Django is set up, because a worker process of the bench
imports it to start (``worker_main``) and only then sets Django up. So it imports no
models at the top; the command (agentops/management/commands/bench_engine.py) does the
Django side: the task, the runs, the output.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import statistics
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from django.db.backends.base.base import BaseDatabaseWrapper

from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import script, scripted_turn
from agentops.runtime.tools import ToolContext, tool

BENCH_TOOL = "bench_noop"
BENCH_SCRIPT = "bench-agent"
BENCH_OBJECTIVE = "Call " + BENCH_TOOL + " {agent_steps} times, then answer."
OBJECTIVE_COUNT = re.compile(r"Call " + BENCH_TOOL + r" (\d+) times")
# A run is worked in one slice: the bench measures the loop, not the queue hand-offs.
SLICE_SECONDS = 3600.0


# The workload ------------------------------------------------------------------------


@tool(
    schema={
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1}},
        "required": ["n"],
        "additionalProperties": False,
    },
    side_effect="read",
    idempotent=True,
    name=BENCH_TOOL,
)
def bench_noop(ctx: ToolContext | None, *, n: int) -> dict:
    """Do nothing and say so: the engine bench's instant, read-only tool."""
    return {"n": n}


@script(BENCH_SCRIPT)
def bench_agent(messages: list[dict]) -> ModelTurn:
    """Ask for one bench_noop call per turn until the objective's count is reached, then
    answer. Reads only the transcript, like every script: the objective, and the count
    in the last call's answer, so that the model's own cost does not grow with the run
    (as LangGraph's graph keeps its count in its state)."""
    objective = next(m["content"] for m in messages if m["role"] == "user")
    wanted = int(OBJECTIVE_COUNT.search(objective).group(1))
    last = messages[-1]
    done = json.loads(last["content"])["n"] if last["role"] == "tool" else 0
    if done < wanted:
        return scripted_turn({"calls": [(BENCH_TOOL, {"n": done + 1})]}, done)
    return scripted_turn({"content": f"Called {BENCH_TOOL} {wanted} times."}, done)


# Measures ----------------------------------------------------------------------------

TRANSACTION_CONTROL = {"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"}
WRITES = {"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "TRUNCATE"}
CTE_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def statement_writes(keyword: str, sql: str) -> bool:
    """Whether a statement writes: by its first word, or, for ``WITH``, by a write in
    one of its parts (the engine's one-statement commits, agentops.runtime.commits)."""
    return keyword in WRITES or (keyword == "WITH" and CTE_WRITE.search(sql) is not None)


@dataclass
class DatabaseCount:
    commits: int = 0
    queries: int = 0


@contextlib.contextmanager
def database_counted(connection: BaseDatabaseWrapper) -> Iterator[DatabaseCount]:
    """Count the commits and the SQL statements made on ``connection`` inside the block.

    A commit never passes through a cursor: atomic()'s outermost exit and
    transaction.commit() both end in ``DatabaseWrapper._commit()``, which calls the
    driver's ``commit()`` (a protocol message for psycopg, sqlite3's own COMMIT), so an
    execute_wrapper alone would see none of them. We wrap ``_commit`` on this connection
    object instead: every commit Django makes goes through it. The one other way a
    transaction commits is a write run in autocommit mode, outside any atomic block: the
    database commits it by itself, so the execute_wrapper counts such writes as commits
    (the engine's one-statement commits on PostgreSQL among them).

    Queries are the statements sent through Django's cursors, less transaction control
    (SQLite's BEGIN IMMEDIATE goes through a cursor, psycopg's BEGIN does not: leaving
    both out keeps the figure the same on both databases).
    """
    count = DatabaseCount()
    connection.ensure_connection()
    driver_commit = connection._commit

    def commit_counted() -> Any:
        count.commits += 1
        return driver_commit()

    def statement_counted(
        execute: Callable, sql: str, params: Any, many: bool, context: dict
    ) -> Any:
        words = sql.split(None, 1)
        keyword = words[0].upper() if words else ""
        if keyword not in TRANSACTION_CONTROL:
            count.queries += 1
            if statement_writes(keyword, sql) and connection.get_autocommit():
                count.commits += 1  # outside atomic(): the statement is its own transaction
        return execute(sql, params, many, context)

    connection._commit = commit_counted  # an instance attribute shadows the method
    try:
        with connection.execute_wrapper(statement_counted):
            yield count
    finally:
        del connection._commit


@dataclass(frozen=True)
class Spread:
    median: float
    p90: float


def spread(values: list[float]) -> Spread:
    if len(values) == 1:
        return Spread(values[0], values[0])
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1]
    return Spread(statistics.median(values), p90)


# Cost by position within a long run (--positions) -------------------------------------

# What each agent step of a long run re-reads of the run's record: made afresh each turn,
# each would cost more the longer the run. Timed by position to show they do not.
# (label, module, the name the engine calls it by there)
POSITION_PARTS = (
    ("transcript", "agentops.runtime.engine.turns", "transcript_sized"),
    ("loops check", "agentops.runtime.engine.loop", "loops_check"),
    ("token estimate", "agentops.runtime.engine.turns", "tokens_estimate"),
)


class PositionClock:
    """The wall time of each agent step of one run, from one model turn to the next, and
    the time spent in each of POSITION_PARTS within it."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.parts: list[dict[str, float]] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter())
        self.parts.append({})

    def part(self, label: str, seconds: float) -> None:
        if self.parts:  # before the first turn nothing is counted
            self.parts[-1][label] = self.parts[-1].get(label, 0.0) + seconds

    def steps(self) -> list[tuple[float, dict[str, float]]]:
        """Per agent step, in order: its seconds and its parts' seconds."""
        return [
            (after - before, parts)
            for before, after, parts in zip(self.marks, self.marks[1:], self.parts, strict=False)
        ]


@contextlib.contextmanager
def positions_timed() -> Iterator[PositionClock]:
    """Inside the block, each turn of the bench script marks the clock, and each of
    POSITION_PARTS adds its time to the agent step it falls in."""
    import importlib
    from unittest import mock

    from agentops.runtime.models.scripted import SCRIPTS

    clock = PositionClock()

    def marked(messages: list[dict]) -> ModelTurn:
        clock.mark()
        return bench_agent(messages)

    def timed(label: str, function: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                clock.part(label, time.perf_counter() - started)

        return run

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(SCRIPTS, {BENCH_SCRIPT: marked}))
        for label, module_name, name in POSITION_PARTS:
            module = importlib.import_module(module_name)
            if hasattr(module, name):
                function = getattr(module, name)
                stack.enter_context(mock.patch.object(module, name, timed(label, function)))
        yield clock


@dataclass(frozen=True)
class PositionWindow:
    first: int  # agent step numbers, from 1
    last: int
    milliseconds: float  # per agent step
    parts: dict[str, float]  # milliseconds per agent step


def position_windows(clocks: list[PositionClock], *, window: int) -> list[PositionWindow]:
    """The first and the last ``window`` agent steps of the runs: for each position the
    median over the runs, then the mean over the window's positions."""
    per_run = [clock.steps() for clock in clocks]
    count = min(len(steps) for steps in per_run)
    windows = []
    for first in (0, count - window):
        positions = range(first, first + window)
        medians = [statistics.median(run[i][0] for run in per_run) for i in positions]
        parts = {
            label: statistics.mean(
                statistics.median(run[i][1].get(label, 0.0) for run in per_run) for i in positions
            )
            * 1000
            for label, _, _ in POSITION_PARTS
        }
        windows.append(
            PositionWindow(first + 1, first + window, statistics.mean(medians) * 1000, parts)
        )
    return windows


def load_average() -> str:
    """The machine's load (/proc/loadavg), to read the figures by; "" where there is none."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


# Worker processes --------------------------------------------------------------------


def worker_main(
    settings_module: str,
    database: dict,
    warm_up_run_id: str,
    run_ids: list[str],
    messages: Any,
    go: Any,
) -> None:
    """One bench worker, started with multiprocessing's spawn method: set Django up on
    the parent's exact database, advance one run to warm up (the first run of a process
    pays for its imports and caches), say ready, wait for the start signal, advance the
    runs given, and report on ``messages``. Errors are reported, not raised, so the
    parent stops with the worker's traceback instead of waiting."""
    try:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
        import django
        from django.conf import settings

        # The parent's settings dict, not DATABASE_URL: under the test suite the parent
        # works on a test database that no environment variable names.
        settings.DATABASES["default"] = database
        settings.DEBUG = False  # as in the parent: no debug cursor recording every query
        django.setup()
        from django.db import connections

        # Nothing is inherited with spawn; with fork, the parent's sockets would be
        # shared, and a connection must never be used by two processes.
        connections.close_all()
        from agentops.runtime.engine import advance

        warm_up = advance(uuid.UUID(warm_up_run_id), max_seconds=SLICE_SECONDS).value
        messages.put(("ready", os.getpid(), [warm_up]))
        go.wait()
        outcomes = [
            advance(uuid.UUID(run_id), max_seconds=SLICE_SECONDS).value for run_id in run_ids
        ]
        connections.close_all()
        messages.put(("done", os.getpid(), outcomes))
    except BaseException:
        messages.put(("failed", os.getpid(), traceback.format_exc()))


# LangGraph, for --compare langgraph ---------------------------------------------------


class LangGraphState(TypedDict):
    messages: Annotated[list[dict], operator.add]
    calls: int


def langgraph_app(*, steps: int, checkpointer: Any) -> Any:
    """The same workload as plain StateGraph nodes: an "agent" node that returns a fake
    tool call ``steps`` times and then an answer, a "tool" node that calls bench_noop."""
    from langgraph.graph import END, START, StateGraph

    def agent(state: LangGraphState) -> dict:
        if state["calls"] < steps:
            n = state["calls"] + 1
            call = {"id": f"call_{n}", "name": BENCH_TOOL, "arguments": json.dumps({"n": n})}
            return {"messages": [{"role": "assistant", "content": "", "tool_calls": [call]}]}
        return {"messages": [{"role": "assistant", "content": f"Called {BENCH_TOOL}."}]}

    def tool_node(state: LangGraphState) -> dict:
        call = state["messages"][-1]["tool_calls"][0]
        result = bench_noop(None, **json.loads(call["arguments"]))
        answer = {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}
        return {"messages": [answer], "calls": state["calls"] + 1}

    def route(state: LangGraphState) -> str:
        return "tool" if state["messages"][-1].get("tool_calls") else END

    graph = StateGraph(LangGraphState)
    graph.add_node("agent", agent)
    graph.add_node("tool", tool_node)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tool", END])
    graph.add_edge("tool", "agent")
    return graph.compile(checkpointer=checkpointer)


def langgraph_run(app: Any, *, steps: int) -> float:
    """One run on a new thread; returns its wall time in seconds.

    ``durability="sync"`` writes each step's checkpoint before the next step starts, as
    agentops commits each step before the next; LangGraph's default ("async") writes it
    while the next step runs, and its saver may lose the last steps on a crash."""
    config = {
        "configurable": {"thread_id": uuid.uuid4().hex},
        "recursion_limit": 2 * steps + 10,
    }
    start = {"messages": [{"role": "user", "content": BENCH_OBJECTIVE.format(agent_steps=steps)}]}
    started = time.perf_counter()
    final = app.invoke({**start, "calls": 0}, config, durability="sync")
    elapsed = time.perf_counter() - started
    if final["calls"] != steps:
        raise RuntimeError(f"the LangGraph run made {final['calls']} tool calls, not {steps}")
    return elapsed


@contextlib.contextmanager
def langgraph_sqlite_saver(directory: Path) -> Iterator[Any]:
    """SqliteSaver on a new file beside the bench's SQLite database (the same disk),
    with the journal settings agentops gives SQLite: WAL and synchronous=NORMAL (the
    saver sets WAL itself and leaves SQLite's default, FULL, which syncs every commit).
    The file is removed afterwards."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    with (
        tempfile.TemporaryDirectory(prefix="langgraph-bench-", dir=directory) as scratch,
        SqliteSaver.from_conn_string(str(Path(scratch) / "checkpoints.sqlite3")) as saver,
    ):
        saver.setup()
        saver.conn.execute("PRAGMA synchronous=NORMAL")
        yield saver


@contextlib.contextmanager
def langgraph_postgres_saver(database: dict) -> Iterator[Any]:
    """PostgresSaver on the bench's PostgreSQL server and database, in a schema of its
    own that is dropped afterwards, whatever happens."""
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg import sql
    from psycopg.rows import dict_row

    conninfo = psycopg.conninfo.make_conninfo(
        **{
            key: value
            for key, value in {
                "dbname": database["NAME"],
                "host": database.get("HOST"),
                "port": database.get("PORT"),
                "user": database.get("USER"),
                "password": database.get("PASSWORD"),
            }.items()
            if value
        }
    )
    schema = sql.Identifier(f"langgraph_bench_{uuid.uuid4().hex[:12]}")
    # As PostgresSaver.from_conn_string opens its connection, plus the schema.
    with psycopg.connect(
        conninfo, autocommit=True, prepare_threshold=0, row_factory=dict_row
    ) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        try:
            conn.execute(sql.SQL("SET search_path TO {}").format(schema))
            saver = PostgresSaver(conn)
            saver.setup()
            yield saver
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
