"""The http tool against far sides that mean harm, each a real server on 127.0.0.1 that
reads the request and then misbehaves: a body of endless tiny chunks, chunk extensions
that carry a byte in sixty thousand, endless informational (1xx) responses; and a
resolver that never answers. Every limit holds the same way, with the same words, on
both paths: ``execute`` (blocking) and ``aexecute`` (on the async worker's loop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from agentops.runtime.tools import ToolContext
from agentops.runtime.tools.base import ToolResult
from agentops.runtime.tools.http import MAX_INFORMATIONAL, HttpExecutor, wire_limit
from tasks.models import Tool
from tests.conftest import run_coroutine

EXECUTOR = HttpExecutor()
PATHS = ["execute", "aexecute"]
# How long a hostile server goes on, whatever the client does: every loop here ends.
SERVER_SECONDS = 20.0
BLACKHOLE = "blackhole.test"


class HostileServer:
    """A server on 127.0.0.1 that reads each request's head and then runs ``behaviour``
    on the connection, in a thread of its own; ``behaviour`` writes until the client
    goes, ``SERVER_SECONDS`` pass, or the server stops (``going_on``; stopping also shuts
    the connections, waking a write the client left blocked)."""

    def __init__(self, behaviour: Callable[[HostileServer, socket.socket], None]) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.threads: list[threading.Thread] = []
        self.connections: list[socket.socket] = []

    def going_on(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() - self.started < SERVER_SECONDS

    def __enter__(self) -> HostileServer:
        self.thread_start(self.accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for conn in self.connections:
            with contextlib.suppress(OSError):  # already closed
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()

    def thread_start(self, target: Callable, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def accept(self) -> None:
        while self.going_on():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections.append(conn)
            self.thread_start(self.serve, conn)

    def serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client went: that is its right
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                head += conn.recv(4096) or b"\r\n\r\n"
            self.behaviour(self, conn)


def tiny_chunks(server: HostileServer, conn: socket.socket) -> None:
    """A 200 whose body is one-byte chunks, as fast as the client takes them."""
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    flood = b"1\r\nx\r\n" * 10_000
    while server.going_on():
        conn.sendall(flood)


def extension_chunks(server: HostileServer, conn: socket.socket) -> None:
    """A 200 whose chunks each carry one byte and 60,000 bytes of chunk extension."""
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"1;pad=" + b"a" * 60_000 + b"\r\nx\r\n"
    while server.going_on():
        conn.sendall(chunk)


def informational_flood(server: HostileServer, conn: socket.socket) -> None:
    """Informational responses and never an answer."""
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    while server.going_on():
        conn.sendall(hint * 100)


def informational_then_answer(server: HostileServer, conn: socket.socket) -> None:
    """As many informational responses as a client must take, then the answer."""
    hints = b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * (
        MAX_INFORMATIONAL - 1
    )
    body = b'{"answer": 42}'
    conn.sendall(
        hints + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


@contextlib.contextmanager
def hostile(behaviour: Callable) -> Iterator[HostileServer]:
    with HostileServer(behaviour) as server:
        yield server


def hostile_tool(url: str, **fields) -> Tool:
    """A read-only GET tool on a local address (so allow_private); ``config_<key>`` fields
    set config keys."""
    config = {
        "method": "GET",
        "url": url,
        "allowed_hosts": ["127.0.0.1", "localhost", BLACKHOLE],
        "allow_private": True,
    }
    for key in [key for key in fields if key.startswith("config_")]:
        config[key.removeprefix("config_")] = fields.pop(key)
    return Tool(
        name=f"hostile_{uuid.uuid4().hex[:8]}",
        kind=Tool.Kind.HTTP,
        input_schema={"type": "object"},
        retry_backoff_seconds=0.0,
        config=config,
        **{"side_effect": "read", "timeout_seconds": 10.0, **fields},
    )


def context(n: int = 1) -> ToolContext:
    return ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key=f"run-{n}:1")


def call_made(path: str, tool: Tool) -> ToolResult:
    """One call of ``tool``, made by ``path``: execute, or aexecute on a loop of its own."""
    if path == "execute":
        return EXECUTOR.execute(tool, {}, context())
    return run_coroutine(EXECUTOR.aexecute(tool, {}, context()))


def timed(path: str, tool: Tool) -> tuple[ToolResult, float]:
    started = time.monotonic()
    result = call_made(path, tool)
    return result, time.monotonic() - started


# Finding 2: a body that never ends, in pieces too small to be worth the reading --------


async def beside_a_ticker(tool: Tool) -> tuple[ToolResult, float]:
    """The call awaited on this loop beside a task that ticks every 5 ms; the longest
    the ticks waited for the loop, as every other run on the worker would."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    result = await EXECUTOR.aexecute(tool, {}, context())
    ticker.cancel()
    return result, max(gaps)


def test_a_flood_of_tiny_chunks_does_not_hold_the_event_loop():
    with hostile(tiny_chunks) as server:
        tool = hostile_tool(server.url, timeout_seconds=2.0, config_max_response_bytes=10_000_000)
        result, longest_gap = run_coroutine(beside_a_ticker(tool))

    assert not result.ok and "timed out after 2 s" in result.error
    # Read whole buffers at a time, it held the loop for a second at a stretch.
    assert longest_gap < 0.25, f"the loop waited {longest_gap:.2f} s behind the call"


@pytest.mark.parametrize("path", PATHS)
def test_a_flood_of_tiny_chunks_ends_at_the_timeout(path):
    with hostile(tiny_chunks) as server:
        tool = hostile_tool(server.url, timeout_seconds=1.0, config_max_response_bytes=10_000_000)
        result, elapsed = timed(path, tool)

    assert not result.ok and result.transient
    assert "timed out after 1 s" in result.error
    assert elapsed < 1.5


@pytest.mark.parametrize("path", PATHS)
def test_chunk_framing_counts_against_the_bytes_a_response_may_take(path):
    # A thousand bytes of body: the server would send 60 MB to deliver them.
    with hostile(extension_chunks) as server:
        tool = hostile_tool(server.url, config_max_response_bytes=1000)
        result, elapsed = timed(path, tool)

    assert not result.ok and not result.transient
    assert result.error == (
        f"GET {server.url}/: the response took more than {wire_limit(1000)} bytes as sent "
        "(status lines, headers and chunk framing count); cut off"
    )
    assert elapsed < 5.0  # well before the 10 s timeout


@pytest.mark.parametrize("path", PATHS)
def test_endless_informational_responses_end_the_call(path):
    with hostile(informational_flood) as server:
        result, elapsed = timed(path, hostile_tool(server.url))

    assert not result.ok and not result.transient
    assert result.error == (
        f"GET {server.url}/: the server sent more than {MAX_INFORMATIONAL} informational "
        "(1xx) responses and no answer; cut off"
    )
    assert elapsed < 5.0


@pytest.mark.parametrize("path", PATHS)
def test_the_answer_after_informational_responses_is_read(path):
    # execute took the first 103 for the answer ("answered 103 Early Hints").
    with hostile(informational_then_answer) as server:
        result = call_made(path, hostile_tool(server.url))

    assert result.ok, result.error
    assert result.value["body"] == {"answer": 42}


def test_a_limit_past_a_post_says_it_may_have_had_an_effect():
    with hostile(informational_flood) as server:
        tool = hostile_tool(server.url, config_method="POST", side_effect="reversible")
        result = call_made("aexecute", tool)

    assert not result.ok and not result.transient
    assert result.error.endswith("and no answer; cut off; it may have had an effect")


# Finding 11: both paths, the same limits and the same words ------------------------------


@pytest.mark.parametrize(
    ("behaviour", "fields"),
    [
        (tiny_chunks, {"timeout_seconds": 1.0}),
        (extension_chunks, {"config_max_response_bytes": 1000}),
        (informational_flood, {}),
        (informational_then_answer, {}),
    ],
)
def test_both_paths_meet_a_hostile_server_with_the_same_result(behaviour, fields):
    with hostile(behaviour) as server:
        tool = hostile_tool(server.url, **fields)
        blocking = call_made("execute", tool)
        awaited = call_made("aexecute", tool)

    assert (blocking.ok, blocking.error, blocking.transient, blocking.value) == (
        awaited.ok,
        awaited.error,
        awaited.transient,
        awaited.value,
    )


# Finding 10: a resolver that never answers -------------------------------------------------


@pytest.fixture
def blackholed(monkeypatch) -> Iterator[list[str]]:
    """Lookups of ``BLACKHOLE`` wait, as on a DNS server that drops every query, until
    the test ends (then fail as the system resolver's would); every other name resolves
    as usual. Yields the lookups of it that were made. (The system resolver reads its
    servers from /etc/resolv.conf, which a test does not change: this stands in for it.)"""
    release = threading.Event()
    made: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == BLACKHOLE:
            made.append(host)
            release.wait(SERVER_SECONDS)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield made
    release.set()


def answering(server: HostileServer, conn: socket.socket) -> None:
    """Not hostile at all: the service other calls want to reach."""
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )


def calls_beside_hung_lookups(
    path: str, hung: Tool, healthy: Tool, count: int
) -> tuple[list[ToolResult], ToolResult, float]:
    """``count`` calls of ``hung`` at once, then one of ``healthy`` while they wait; the
    results, and how long the healthy call took. On the loop, as on the async worker,
    the loop's default executor is a pool (four threads here, the worker's has 32)."""

    async def on_a_loop() -> tuple[list[ToolResult], ToolResult, float]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
        waiting = [
            asyncio.create_task(EXECUTOR.aexecute(hung, {}, context(n))) for n in range(count)
        ]
        await asyncio.sleep(0.1)  # the lookups have started
        started = time.monotonic()
        result = await EXECUTOR.aexecute(healthy, {}, context(count))
        took = time.monotonic() - started
        return list(await asyncio.gather(*waiting)), result, took

    if path == "aexecute":
        return run_coroutine(on_a_loop())
    with ThreadPoolExecutor(max_workers=count) as pool:
        waiting = [pool.submit(EXECUTOR.execute, hung, {}, context(n)) for n in range(count)]
        time.sleep(0.1)
        started = time.monotonic()
        result = EXECUTOR.execute(healthy, {}, context(count))
        took = time.monotonic() - started
        return [future.result() for future in waiting], result, took


@pytest.mark.parametrize("path", PATHS)
def test_lookups_that_never_answer_leave_other_names_lookups_working(path, blackholed):
    with hostile(answering) as server:
        hung = hostile_tool(f"http://{BLACKHOLE}:{server.port}/", timeout_seconds=1.0)
        healthy = hostile_tool(f"http://localhost:{server.port}/", timeout_seconds=2.0)
        hung_results, result, took = calls_beside_hung_lookups(path, hung, healthy, 8)

    assert result.ok, result.error
    assert took < 1.0
    for hung_result in hung_results:
        assert not hung_result.ok and hung_result.transient
        assert hung_result.error == (
            f"GET http://{BLACKHOLE}:{server.port}/: looking up {BLACKHOLE} took longer "
            "than the 1 s allowed"
        )


@pytest.mark.parametrize("path", PATHS)
def test_calls_to_a_name_that_never_answers_share_one_lookup(path, blackholed):
    hung = hostile_tool(f"http://{BLACKHOLE}/", timeout_seconds=0.5)

    def together() -> list[ToolResult]:
        if path == "aexecute":

            async def gathered() -> list[ToolResult]:
                calls = (EXECUTOR.aexecute(hung, {}, context(n)) for n in range(10))
                return list(await asyncio.gather(*calls))

            return run_coroutine(gathered())
        with ThreadPoolExecutor(max_workers=10) as pool:
            return list(pool.map(lambda n: EXECUTOR.execute(hung, {}, context(n)), range(10)))

    started = time.monotonic()
    results = together()
    elapsed = time.monotonic() - started

    assert all("took longer than the 0.5 s allowed" in result.error for result in results)
    assert elapsed < 1.5  # each call waited its own timeout, not the resolver's
    assert blackholed == [BLACKHOLE]  # one thread hangs, not ten
