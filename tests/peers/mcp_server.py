"""A small MCP server for the tests, made with the mcp package and served over streamable
HTTP on 127.0.0.1: ``python -m tests.peers.mcp_server --port P`` serves ``/mcp``.

Its tools:
- ``add`` (read-only, idempotent by its annotations): the sum of two integers;
- ``fail``: always answers with an error result carrying the text it was given;
- ``slow``: sleeps, then says so (for timeouts);
- ``whoami``: the Authorization header the request came with (for secrets in headers);
- ``note.save`` (no annotations): a name the importer must sanitise.

``McpPeer`` starts it in a subprocess, waits until it answers, and stops it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

ROOT = Path(__file__).resolve().parents[2]


def server_build() -> MCPServer:
    server = MCPServer("agentops-test")

    @server.tool(
        description="Add two integers.",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
    )
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Fail with the given reason.")
    def fail(reason: str) -> str:
        raise ToolError(reason)

    @server.tool(description="Sleep for a number of seconds.")
    async def slow(seconds: float) -> str:
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(
        description="The Authorization header of the request.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    def whoami(ctx: Context) -> str:
        headers = ctx.headers or {}
        return headers.get("authorization", "(no Authorization header)")

    @server.tool(name="note.save", description="Save a note.")
    def note_save(text: str) -> str:
        return f"saved {text!r}"

    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class McpPeer:
    """The test server in a subprocess of the test process, on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen | None = None

    def start(self, *, wait_seconds: float = 20.0) -> McpPeer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.mcp_server", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the MCP test server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the MCP test server did not listen on {self.port} in {wait_seconds} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    server_build().run(transport="streamable-http", host="127.0.0.1", port=arguments.port)
