"""``manage.py bench_model_client``: the CPU one model call costs this process, through
the OpenAI-compatible client, blocking and awaited.

The model is agentops.latency_server with no latency, in a child process of its own, so
that what this process spends is the client's work alone: building and sending the
request, reading and checking the answer, and the event loop around them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from agentops.bench import load_average
from agentops.commands import ParagraphsCommand
from agentops.management.commands.bench_concurrency import whole_number
from agentops.runtime.models.base import ModelError, ModelTurn
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient, coroutine_run

MODEL_NAME = "bench-latency"
# What the client sends as its key: never a real one, which the environment may hold.
API_KEY = "latency-server"
TOOL = "bench_lookup"
# The server's script answers a call with a tool call until this many assistant turns.
SCRIPT_TURNS = 2
SERVER_START_SECONDS = 30.0
SERVER_STOP_SECONDS = 10.0
CALL_SECONDS = 30.0

# The child: the latency server until its stdin closes (the bench closes it, or ends).
SERVER_CHILD = """\
import sys
from agentops.latency_server import LatencyServer
server = LatencyServer(latency=0, turns=int(sys.argv[1]), tool=sys.argv[2]).start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""

# A turn as the engine asks it: its instructions, the objective, and three tools.
SYSTEM_PROMPT = (
    "You are an agent working a task for an operator. Work in small steps: call one "
    "granted tool at a time, read its answer, and stop with a final answer when the "
    "objective is met. Give your confidence in each call as _confidence. " * 6
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "minimum": 1},
                    "_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["n", "_confidence"],
                "additionalProperties": False,
            },
        },
    }
    for name, description in [
        ("plan_update", "Record the plan."),
        ("ask_person", "Ask a person a question."),
        (TOOL, "Look a number up."),
    ]
]
MESSAGES = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": f"Call {TOOL} until you know the answer, then answer."},
]

HELP = """\
Print the CPU that one model call costs this process through agentops' OpenAI-compatible
client (agentops.runtime.models.openai_compatible), on both of its paths:

- blocking, `complete` (the inline worker's): each call on an event loop and with a
  client of its own, as a queue worker with AGENTOPS_WORKER_CONCURRENCY=0 makes it;
- awaited, `acomplete` (the async worker's): every call on one event loop, through the
  client and the connection pool it keeps for that loop and server.

The model is the latency server (agentops/latency_server.py) answering at once on
loopback, in a child process that the bench starts and stops, whatever happens: its CPU
is not counted in the figures, and is printed beside them. Each call sends what the
engine sends on a turn (instructions, the objective, three tools, max_tokens) and gets a
tool call back, which the bench checks. --warm-up calls on each path go first, untimed
(imports, the first connection, caches).

The figures are time.process_time() of this process (all its threads: the anyio worker
thread the openai package starts on a new client's first call is counted) around
--calls calls, divided by --calls; the wall time beside them. The machine's load average
is printed first: on a busy machine CPU time per call rises too (caches, frequency),
less than wall time does.
"""


@dataclass(frozen=True)
class PathFigures:
    """What ``calls`` calls on one path cost: this process's CPU, the wall time, and the
    server's CPU (None where /proc cannot say), all in seconds."""

    calls: int
    cpu: float
    wall: float
    server_cpu: float | None

    def line(self, name: str) -> str:
        def per_call(seconds: float) -> str:
            return f"{seconds / self.calls * 1000:.3f} ms"

        server = (
            f"; the server's CPU, not counted: {per_call(self.server_cpu)}"
            if self.server_cpu is not None
            else ""
        )
        return (
            f"{name}: {per_call(self.cpu)} of CPU a call (wall {per_call(self.wall)}), "
            f"{self.calls} calls{server}"
        )


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--calls",
            type=whole_number(1, 1_000_000),
            default=500,
            help="calls timed on each path (default 500)",
        )
        parser.add_argument(
            "--warm-up",
            type=whole_number(0, 10_000),
            default=20,
            help="untimed calls on each path before the timed ones (default 20)",
        )

    def handle(self, *args, **options) -> None:
        calls, warm_up = options["calls"], options["warm_up"]
        self.stdout.write(f"load average before: {load_average() or 'unknown'}")
        with latency_server_child() as (base_url, server_pid):
            self.stdout.write(f"latency server: {base_url}, process {server_pid}, latency 0 s")
            client = OpenAICompatibleClient(
                model=MODEL_NAME, api_key=API_KEY, base_url=base_url, timeout=CALL_SECONDS
            )
            blocking = path_measure(
                lambda: calls_blocking(client, warm_up),
                lambda: calls_blocking(client, calls),
                calls=calls,
                server_pid=server_pid,
            )
            self.stdout.write(blocking.line("blocking (complete, a loop and a client a call)"))
            # coroutine_run, not asyncio.run: a caller's thread may run a loop already.
            awaited = coroutine_run(
                calls_awaited(client, warm_up=warm_up, calls=calls, pid=server_pid)
            )
            self.stdout.write(awaited.line("awaited (acomplete, one loop, the shared pool)"))
        self.stdout.write(f"load average after: {load_average() or 'unknown'}")


def turn_check(turn: ModelTurn) -> None:
    """The server's script answers each of these calls with a call of TOOL: anything
    else means the bench measured something other than a whole, good call."""
    names = [call.name for call in turn.tool_calls]
    if names != [TOOL]:
        raise CommandError(f"the latency server answered {names!r}, not one call of {TOOL}")


def calls_blocking(client: OpenAICompatibleClient, count: int) -> None:
    for _ in range(count):
        turn_check(
            call_made(lambda: client.complete(messages=MESSAGES, tools=TOOLS, max_tokens=64))
        )


async def calls_awaited(
    client: OpenAICompatibleClient, *, warm_up: int, calls: int, pid: int
) -> PathFigures:
    """The awaited path, on this loop: the warm-up, then the timed calls."""
    for _ in range(warm_up):
        turn_check(await call_awaited(client))
    cpu, wall, server = time.process_time(), time.perf_counter(), process_cpu(pid)
    for _ in range(calls):
        turn_check(await call_awaited(client))
    return figures_since(cpu, wall, server, calls=calls, pid=pid)


async def call_awaited(client: OpenAICompatibleClient) -> ModelTurn:
    try:
        return await client.acomplete(messages=MESSAGES, tools=TOOLS, max_tokens=64)
    except ModelError as error:
        raise CommandError(f"a model call failed: {error}") from error


def call_made(call: Callable[[], ModelTurn]) -> ModelTurn:
    try:
        return call()
    except ModelError as error:
        raise CommandError(f"a model call failed: {error}") from error


def path_measure(
    warm: Callable[[], None], timed: Callable[[], None], *, calls: int, server_pid: int
) -> PathFigures:
    warm()
    cpu, wall, server = time.process_time(), time.perf_counter(), process_cpu(server_pid)
    timed()
    return figures_since(cpu, wall, server, calls=calls, pid=server_pid)


def figures_since(
    cpu: float, wall: float, server: float | None, *, calls: int, pid: int
) -> PathFigures:
    server_now = process_cpu(pid)
    return PathFigures(
        calls=calls,
        cpu=time.process_time() - cpu,
        wall=time.perf_counter() - wall,
        server_cpu=server_now - server if server is not None and server_now is not None else None,
    )


def process_cpu(pid: int) -> float | None:
    """The CPU seconds process ``pid`` has used (user and system, all its threads), from
    /proc; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces:
    # utime and stime are the 14th and 15th fields of the line, 12th and 13th after it.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def latency_server_child() -> Iterator[tuple[str, int]]:
    """The latency server in a child process: yields its base URL and its pid, and ends
    it on the way out (its stdin closed, then killed if it has not ended in time)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_CHILD, str(SCRIPT_TURNS), TOOL],
        cwd=settings.BASE_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = port_read(process)
        yield f"http://127.0.0.1:{port}/v1", process.pid
    finally:
        process.stdin.close()
        try:
            process.wait(SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def port_read(process: subprocess.Popen) -> int:
    """The port the child prints once it listens, within SERVER_START_SECONDS."""
    line: list[str] = []

    def read() -> None:
        line.append(process.stdout.readline())

    # readline blocks: on a thread, so that a child that never prints cannot hold us.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(SERVER_START_SECONDS)
    text = line[0].strip() if line else ""
    if not text.isdigit():
        raise CommandError(
            f"the latency server did not start within {SERVER_START_SECONDS:g} s"
            + (f" (it printed {text!r})" if text else "")
            + (f", exit status {process.poll()}" if process.poll() is not None else "")
        )
    return int(text)
