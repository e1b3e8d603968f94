"""A slow model for ``manage.py bench_concurrency``: an OpenAI-compatible Chat Completions
server on 127.0.0.1 that answers every call after a set delay, with a scripted agent.

What the bench measures is how many runs the workers keep in flight while the model
thinks, so the model must be slow and cheap: each ``POST /v1/chat/completions`` waits
``latency`` seconds on an ``asyncio.sleep`` and costs nothing else, and one event loop on
one thread holds thousands of such calls open at once (one connection each, kept alive
between calls, as the openai package keeps them).

The script, for a run of ``turns`` turns (a turn is counted by the assistant messages in
the request, so a retried or recovered call gets the same answer again):

- a request whose ``tool_choice`` names ``plan_update`` (the engine's first turn) gets
  a plan;
- turns before the last call ``tool`` once, with ``{"n": <turn>}``;
- the last turn answers with a final text and no tool calls.

``GET /v1/bench/lookup?n=<n>`` answers ``{"n": <n>}`` at once: the bench grants it to
its task as an HTTP tool, so a worker process needs no code of the bench's to call it.

The HTTP/1.1 is the least that clients need, and correct for it: requests with a
``Content-Length`` (a chunked body is refused with 501), persistent connections unless
either side says ``Connection: close`` (HTTP/1.0: unless the client says keep-alive),
one request at a time on a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

from agentops.runtime.builtins import PLAN_TOOL

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
LOOKUP_PATH = "/v1/bench/lookup"
# Connections waiting to be accepted: a thousand clients may connect in the same instant.
BACKLOG = 4096
MAX_HEAD_BYTES = 65536
MAX_BODY_BYTES = 16 * 1024 * 1024
START_SECONDS = 10.0
STOP_SECONDS = 10.0
BYTES_PER_TOKEN = 4  # a rough count of tokens for the usage the server reports
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
}


class ScriptError(ValueError):
    """A request the script cannot answer: the server's answer is a 400 that says why."""


class BadRequest(Exception):
    """A request the server cannot read as HTTP: answered once, then the connection ends."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerFigures:
    """What the server has seen since it started, or since ``figures_reset``."""

    completions: int  # chat completions answered, 200 each
    lookups: int  # tool calls answered
    in_flight: int  # chat completions waiting out their latency now
    in_flight_peak: int
    connections: int  # open now
    connections_peak: int
    errors: int  # answers of 400 and above, requests that were not HTTP


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    keep_alive: bool
    body: bytes


def scripted_reply(request: Any, *, turns: int, tool: str) -> dict:
    """The assistant message for this request (see the module's docstring), or
    ``ScriptError`` when the request is not one the script can answer."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise ScriptError("the request must be a JSON object with a list of messages")
    turn = 1 + sum(
        1
        for message in request["messages"]
        if isinstance(message, dict) and message.get("role") == "assistant"
    )
    forced = forced_tool(request.get("tool_choice"))
    if forced == PLAN_TOOL:
        plan = {"steps": [{"title": f"Call {tool} {max(turns - 2, 0)} times"}, {"title": "Answer"}]}
        return assistant_message(tool_calls=[(f"call_{turn}", PLAN_TOOL, plan)])
    if forced is not None:
        raise ScriptError(f"tool_choice names {forced!r}: the script calls only {PLAN_TOOL} so")
    if turn >= turns:
        return assistant_message(content=f"Done: called {tool} on every turn but this one.")
    offered = {
        spec.get("function", {}).get("name")
        for spec in request.get("tools") or []
        if isinstance(spec, dict) and isinstance(spec.get("function"), dict)
    }
    if tool not in offered:
        raise ScriptError(f"the request offers no tool named {tool!r}")
    # The engine asks for the agent's confidence with every call of a granted tool.
    arguments = {"n": turn, "_confidence": 0.99}
    return assistant_message(tool_calls=[(f"call_{turn}", tool, arguments)])


def forced_tool(tool_choice: Any) -> str | None:
    """The function a ``tool_choice`` forces, if it names one."""
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        return tool_choice["function"].get("name")
    return None


def assistant_message(
    *, content: str | None = None, tool_calls: list[tuple[str, str, dict]] = ()
) -> dict:
    """An assistant message; tool_calls are (id, name, arguments)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            for call_id, name, arguments in tool_calls
        ]
    return message


def completion(message: dict, *, model: str, number: int, prompt_bytes: int) -> dict:
    """A Chat Completions response body around ``message``, with usage."""
    prompt_tokens = max(1, prompt_bytes // BYTES_PER_TOKEN)
    completion_tokens = max(1, len(json.dumps(message)) // BYTES_PER_TOKEN)
    return {
        "id": f"chatcmpl-bench-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}


def response_bytes(status: int, body: dict, *, keep_alive: bool) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + data


async def request_read(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection; None when the client closed it between two.
    Raises ``BadRequest`` for what is not a request this server can read."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise BadRequest(400, "the request ended before its headers did") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, f"the request's head is over {MAX_HEAD_BYTES} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(400, f"not an HTTP/1.x request line: {lines[0][:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, f"not a header line: {line[:100]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest(501, "a chunked body is not supported: send a Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "Content-Length is not a whole number") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise BadRequest(413, f"the body must be 0 to {MAX_BODY_BYTES} bytes, not {length}")
    body = await reader.readexactly(length) if length else b""
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    path, _, query = target.partition("?")
    return Request(method=method, path=path, query=query, keep_alive=keep_alive, body=body)


class LatencyServer:
    """The server on its own thread and event loop, from ``start()`` (or ``with``) to
    ``stop()``. Its figures may be read from any thread."""

    def __init__(self, *, latency: float, turns: int, tool: str, port: int = 0) -> None:
        if latency < 0:
            raise ValueError(f"latency must be 0 seconds or more, not {latency}")
        if turns < 1:
            raise ValueError(f"turns must be at least 1, not {turns}")
        self.latency = latency
        self.turns = turns
        self.tool = tool
        self.port = port
        # The counters change on the server's thread and are read on others: one lock.
        self._lock = threading.Lock()
        self._completions = self._lookups = self._errors = 0
        self._in_flight = self._in_flight_peak = 0
        self._connections = self._connections_peak = 0
        self._handlers: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        """The URL the openai package takes as its base (OPENAI_BASE_URL)."""
        return f"http://{HOST}:{self.port}/v1"

    @property
    def lookup_url(self) -> str:
        return f"http://{HOST}:{self.port}{LOOKUP_PATH}"

    # Lifecycle -----------------------------------------------------------------------

    def start(self) -> LatencyServer:
        """Listen, on a thread of its own; return once connections are accepted."""
        self._thread = threading.Thread(target=self._serve, name="latency-server", daemon=True)
        self._thread.start()
        if not self._started.wait(START_SECONDS):
            raise RuntimeError(f"the latency server did not start within {START_SECONDS:g} s")
        if self._failure is not None:
            raise RuntimeError(f"the latency server could not start: {self._failure}")
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection, and end the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_SECONDS)
        self._thread = None

    def __enter__(self) -> LatencyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by start(), which waits on the thread
            self._failure = error
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._connection, HOST, self.port, backlog=BACKLOG, limit=MAX_HEAD_BYTES
        )
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stopping.wait()
        # Closing the server stops accepting; the connections kept alive end here.
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    # Figures -------------------------------------------------------------------------

    def figures(self) -> ServerFigures:
        with self._lock:
            return ServerFigures(
                completions=self._completions,
                lookups=self._lookups,
                in_flight=self._in_flight,
                in_flight_peak=self._in_flight_peak,
                connections=self._connections,
                connections_peak=self._connections_peak,
                errors=self._errors,
            )

    def figures_reset(self) -> None:
        """Count afresh from now: the counts to zero, the peaks to what is open now."""
        with self._lock:
            self._completions = self._lookups = self._errors = 0
            self._in_flight_peak = self._in_flight
            self._connections_peak = self._connections

    # Serving -------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        self._handlers.add(handler)
        with self._lock:
            self._connections += 1
            self._connections_peak = max(self._connections_peak, self._connections)
        try:
            while True:
                try:
                    request = await request_read(reader)
                except BadRequest as error:
                    self._count_error()
                    writer.write(
                        response_bytes(error.status, error_body(str(error)), keep_alive=False)
                    )
                    await writer.drain()
                    return
                if request is None:
                    return
                status, body = await self._answer(request)
                if status >= 400:
                    self._count_error()
                writer.write(response_bytes(status, body, keep_alive=request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request: nothing to answer
        except asyncio.CancelledError:
            # The server stops (``_main``). Ended quietly, not raised: asyncio's stream
            # protocol logs every connection task that ends cancelled as an error.
            pass
        finally:
            with self._lock:
                self._connections -= 1
            self._handlers.discard(handler)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, request: Request) -> tuple[int, dict]:
        if request.path == CHAT_PATH:
            if request.method != "POST":
                return 405, error_body(f"{CHAT_PATH} takes POST, not {request.method}")
            return await self._chat(request)
        if request.path == LOOKUP_PATH:
            if request.method != "GET":
                return 405, error_body(f"{LOOKUP_PATH} takes GET, not {request.method}")
            return self._lookup(request)
        return 404, error_body(f"no route {request.method} {request.path}")

    async def _chat(self, request: Request) -> tuple[int, dict]:
        try:
            body = json.loads(request.body)
            message = scripted_reply(body, turns=self.turns, tool=self.tool)
        except (ValueError, RecursionError) as error:  # ScriptError is a ValueError
            return 400, error_body(str(error))
        with self._lock:
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
        try:
            await asyncio.sleep(self.latency)
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._completions += 1
            number = self._completions
        model = body.get("model") if isinstance(body.get("model"), str) else "bench"
        return 200, completion(message, model=model, number=number, prompt_bytes=len(request.body))

    def _lookup(self, request: Request) -> tuple[int, dict]:
        values = parse_qs(request.query).get("n", [])
        try:
            n = int(values[0])
        except (IndexError, ValueError):
            return 400, error_body(f"{LOOKUP_PATH} takes n, a whole number")
        with self._lock:
            self._lookups += 1
        return 200, {"n": n}

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1
