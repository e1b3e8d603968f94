"""MCP tools against servers that mean harm: a real MCP server on 127.0.0.1 (streamable
HTTP, written here so that it can misbehave) that answers with more than a tool takes,
compresses a huge answer small, pages its listing forever, or never lets a session
close; and a stdio server that answers with more than a tool takes. Each call is made
both ways: ``execute`` and ``aexecute``."""

from __future__ import annotations

import contextlib
import gzip
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentops.runtime.tools import ToolContext
from agentops.runtime.tools import mcp as mcp_tools
from agentops.runtime.tools.base import ToolResult
from agentops.runtime.tools.http import DEFAULT_MAX_RESPONSE_BYTES, MAX_RESPONSE_BYTES_CEILING
from agentops.runtime.tools.mcp import McpExecutor, McpUnavailable, tools_list
from tasks.models import Tool
from tests.conftest import run_coroutine

# The longest a hostile server holds anything back: every wait here ends.
HOLD_SECONDS = 10.0
WRITE_PIECE = 65536


class HostileMcpServer:
    """An MCP server over streamable HTTP on 127.0.0.1, in threads of this process.
    ``answer_bytes``: the text its tool answers with; ``compressed``: sent gzipped (a
    few kilobytes on the wire); ``refuse``: the call gets a JSON-RPC error instead;
    ``page_bytes``: its listing's pages, each with a next page; ``hold_close``: the
    DELETE that ends a session is never answered (until ``HOLD_SECONDS``). Records
    what it was asked and how far its answers got."""

    def __init__(
        self,
        *,
        answer_bytes: int = 10,
        compressed: bool = False,
        refuse: bool = False,
        page_bytes: int = 0,
        hold_close: bool = False,
    ) -> None:
        self.answer_bytes = answer_bytes
        self.compressed = compressed
        self.refuse = refuse
        self.page_bytes = page_bytes
        self.hold_close = hold_close
        self.released = threading.Event()
        self.methods: list[str] = []
        self.encodings: list[str] = []
        self.answer_sent = 0  # bytes of the tool's answer written before the client left
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mcp"

    def __enter__(self) -> HostileMcpServer:
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def result(self, message: dict) -> dict:
        method = message["method"]
        if method == "initialize":
            return {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "hostile", "version": "1"},
            }
        if method == "tools/list":
            page = int((message.get("params") or {}).get("cursor") or 0)
            tool = {"name": f"t{page}", "description": "d" * self.page_bytes}
            return {
                "tools": [{**tool, "inputSchema": {"type": "object"}}],
                "nextCursor": str(page + 1),
            }
        if method == "tools/call":
            return {
                "content": [{"type": "text", "text": "x" * self.answer_bytes}],
                "isError": False,
            }
        return {}

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.methods.append(message.get("method", ""))
                server.encodings.append(self.headers.get("Accept-Encoding", ""))
                if "id" not in message:  # a notification
                    self.empty(202)
                    return
                if server.refuse and message["method"] == "tools/call":
                    reply = {"error": {"code": -32602, "message": "no such ledger"}}
                else:
                    reply = {"result": server.result(message)}
                data = json.dumps({"jsonrpc": "2.0", "id": message["id"], **reply}).encode()
                headers = {"Content-Type": "application/json", "Mcp-Session-Id": "s-1"}
                if server.compressed:
                    data = gzip.compress(data)
                    headers["Content-Encoding"] = "gzip"
                self.send_response(200)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.body_write(data, tool_call=message["method"] == "tools/call")

            def body_write(self, data: bytes, *, tool_call: bool) -> None:
                for start in range(0, len(data), WRITE_PIECE):
                    try:
                        self.wfile.write(data[start : start + WRITE_PIECE])
                    except OSError:
                        return  # the client stopped reading
                    if tool_call:
                        server.answer_sent += len(data[start : start + WRITE_PIECE])

            def do_GET(self) -> None:
                self.empty(405)  # no stream of the server's own

            def do_DELETE(self) -> None:
                server.methods.append("DELETE")
                if server.hold_close:
                    server.released.wait(HOLD_SECONDS)
                self.empty(200)

            def empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

            def handle_error(self, *args: object) -> None:
                pass  # a client that left mid-answer is what these tests make happen

        return Handler


@contextlib.contextmanager
def hostile(**behaviour) -> Iterator[HostileMcpServer]:
    with HostileMcpServer(**behaviour) as server:
        yield server


def server_config(url: str) -> dict:
    return {"transport": "http", "url": url, "allowed_hosts": ["127.0.0.1"], "allow_private": True}


def mcp_tool(server: dict, **config) -> Tool:
    return Tool(
        name=f"hostile_{uuid.uuid4().hex[:8]}",
        kind="mcp",
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=20,
        config={"server": server, "tool": "t", **config},
    )


@pytest.fixture(params=["execute", "aexecute"])
def call_mcp(request):
    """One call, made both ways: ``execute`` (blocking) and ``aexecute`` (awaited on an
    event loop, as the async worker makes it); the result and how long it took."""

    def make(tool: Tool) -> tuple[ToolResult, float]:
        context = ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key="k")
        started = time.monotonic()
        if request.param == "execute":
            result = McpExecutor().execute(tool, {}, context)
        else:
            result = run_coroutine(McpExecutor().aexecute(tool, {}, context))
        return result, time.monotonic() - started

    return make


# Finding 9: an answer larger than the tool takes -----------------------------------------


def refusal(url: str, limit: int) -> str:
    return (
        f"the MCP server at {url} answered with more than {limit} bytes (the tool's "
        "max_response_bytes); the answer was refused"
    )


def test_a_huge_result_is_refused_and_reading_stops_at_the_limit(call_mcp):
    with hostile(answer_bytes=40_000_000) as server:
        result, _ = call_mcp(mcp_tool(server_config(server.url)))

    assert not result.ok and not result.transient
    assert result.error == refusal(server.url, DEFAULT_MAX_RESPONSE_BYTES) + (
        "; the call may have taken effect"
    )
    # The client left once it had the limit's worth: the server got well short of its
    # 40 MB into the connection (the kernel's buffers took a few MB of it).
    assert server.answer_sent < 20_000_000


def test_max_response_bytes_lets_a_tool_take_a_larger_answer(call_mcp):
    with hostile(answer_bytes=3_000_000) as server:
        small, _ = call_mcp(mcp_tool(server_config(server.url)))
        large, _ = call_mcp(mcp_tool(server_config(server.url), max_response_bytes=4_000_000))

    assert not small.ok and "more than 1000000 bytes" in small.error
    assert large.ok, large.error
    assert large.value["content"] == ["x" * 3_000_000]


def test_an_answer_compressed_small_cannot_unpack_past_the_limit(call_mcp):
    # 50 MB of answer, some 50 KB gzipped: metered as sent, it would pass.
    with hostile(answer_bytes=50_000_000, compressed=True) as server:
        result, _ = call_mcp(mcp_tool(server_config(server.url)))

    assert not result.ok and result.value is None
    assert "the server compressed its answer (gzip) though it was asked not to" in result.error
    assert set(server.encodings) == {"identity"}


def test_a_listing_that_pages_forever_is_refused(settings):
    with hostile(page_bytes=1_000_000) as server:
        started = time.monotonic()
        with pytest.raises(McpUnavailable) as refused:
            tools_list(server_config(server.url), timeout=20)
        elapsed = time.monotonic() - started

    assert str(refused.value) == (
        f"the MCP server at {server.url} did not list its tools: it sent more than "
        f"{MAX_RESPONSE_BYTES_CEILING} bytes in answer"
    )
    assert elapsed < 10  # not the 20 s timeout
    assert server.methods.count("tools/list") <= 11


STDIO_SERVER = """
import json, sys

for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message["method"] == "initialize":
        result = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "hostile", "version": "1"},
        }
    elif message["method"] == "tools/call":
        result = {"content": [{"type": "text", "text": "x" * int(sys.argv[1])}]}
    elif message["method"] == "tools/list":
        result = {"tools": []}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""


def test_a_stdio_servers_huge_result_is_refused_too(settings, tmp_path: Path, call_mcp):
    script = tmp_path / "hostile_mcp.py"
    script.write_text(STDIO_SERVER)
    command = [sys.executable, str(script), "3000000"]
    settings.AGENTOPS_MCP_COMMANDS = [["=", *command]]
    stdio = {"transport": "stdio", "command": command}

    result, _ = call_mcp(mcp_tool(stdio))

    assert not result.ok and not result.transient
    assert result.error == (
        f"the MCP server `{sys.executable} {script} 3000000` answered with more than "
        f"{DEFAULT_MAX_RESPONSE_BYTES} bytes (the tool's max_response_bytes); the answer was "
        "refused; the call may have taken effect"
    )


def test_max_response_bytes_is_checked_as_the_http_tools_is():
    stdio = {"transport": "stdio", "command": ["python", "-m", "mcp_server_time"]}
    for size, says in [
        (0, "max_response_bytes must be a positive whole number, not 0"),
        ("1000", "max_response_bytes must be a positive whole number, not '1000'"),
        (10**9, f"max_response_bytes may be at most {MAX_RESPONSE_BYTES_CEILING}"),
    ]:
        problems = McpExecutor().config_errors(
            {"server": stdio, "tool": "t", "max_response_bytes": size}
        )
        assert any(says in problem for problem in problems), problems


# Finding 8: a session the far side never lets close --------------------------------------


@pytest.mark.parametrize("refuse", [False, True], ids=["answers", "refuses"])
def test_a_close_the_server_never_answers_does_not_hold_the_outcome(monkeypatch, call_mcp, refuse):
    monkeypatch.setattr(mcp_tools, "CLOSE_SECONDS", 0.5, raising=False)
    with hostile(hold_close=True, refuse=refuse) as server:
        result, elapsed = call_mcp(mcp_tool(server_config(server.url)))

    if refuse:
        assert not result.ok and result.error.endswith("refused the call: no such ledger")
    else:
        assert result.ok, result.error
        assert result.value["content"] == ["x" * 10]
    assert "DELETE" in server.methods  # the close was tried, and cut short
    assert elapsed < 3.0, f"the call took {elapsed:.1f} s"
