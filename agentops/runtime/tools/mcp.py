"""Tools served by a Model Context Protocol server, one Tool row per server tool.

A row's config names the server and the server's own name for the tool:

    {"server": {"transport": "stdio", "command": ["python", "-m", "mcp_server_time"],
                "env": {"KEY": "secret:NAME"}},
     "tool": "get_current_time",
     "annotations": {"read_only_hint": true, ...}}   # as listed at import, for the record

or ``{"transport": "http", "url": "http://127.0.0.1:8765/mcp", "headers": {"Authorization":
"Bearer {secret:TOKEN}"}}`` for a streamable HTTP server. Rows are made by
``manage.py mcp_import``; each call opens its own session (a stdio server is started for
the call and stopped after it), so a worker keeps no connection between steps.

What a failure means for a retry: a server that cannot be started, reached or
initialised was never asked anything, so that failure is transient. Once the call is
sent, a timeout or a lost connection leaves its effect unknown: transient only for a
tool that is idempotent. A server's error answer goes back to the model.
"""

from __future__ import annotations

import asyncio
import math
import re
import shlex
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
from django.conf import settings
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult, PaginatedRequestParams

from agentops.runtime.secrets import PREFIX, SecretMissing, config_resolve, secret_errors
from agentops.runtime.tools.base import ToolContext, ToolResult, arguments_errors

if TYPE_CHECKING:
    from tasks.models import Tool

STDIO = "stdio"
HTTP = "http"
TRANSPORTS = (STDIO, HTTP)
CONFIG_KEYS = {"server", "tool", "annotations"}
SERVER_KEYS = {STDIO: {"transport", "command", "env"}, HTTP: {"transport", "url", "headers"}}
# A first word that means "the Python running this worker": the server then runs with
# the worker's own interpreter and packages, whatever python is first on PATH.
PYTHON_WORDS = ("python", "python3")
# Variables that change what a program loads or runs rather than what it is told: set in a
# stdio server's env, one would turn an allowed command into any code (LD_PRELOAD,
# PYTHONPATH, NODE_OPTIONS=--import=data:..., PATH...). By prefix, then by whole name.
LOADER_ENV_PREFIXES = (
    "LD_",
    "DYLD_",
    "PYTHON",
    "NODE_",
    "NPM_CONFIG_",
    "PERL",
    "RUBY",
    "JAVA_",
    "_JAVA_",
    "JDK_JAVA_",
    "UV_",
    "PIP_",
    "GIT_",
    "BASH_FUNC_",
)
LOADER_ENV_NAMES = {"PATH", "HOME", "BASH_ENV", "ENV", "SHELLOPTS", "PS4", "IFS", "CLASSPATH"}
# Starting a stdio server (an interpreter and its imports) takes a second or two; one
# that has not finished the handshake in this long is taken as down. Not part of the
# tool's timeout_seconds, which bounds the call itself.
CONNECT_SECONDS = 15.0
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STDERR_TAIL = 500
# Where the idempotency key goes in the request's _meta, for servers that dedupe on it.
IDEMPOTENCY_META_KEY = "agentops/idempotency-key"


class McpUnavailable(Exception):
    """The server could not be started or reached, or did not finish the handshake:
    nothing was asked of it."""


@dataclass(frozen=True)
class ServerTool:
    """One tool as a server lists it."""

    name: str
    description: str
    input_schema: dict
    annotations: dict

    @property
    def read_only(self) -> bool:
        return self.annotations.get("read_only_hint") is True

    @property
    def idempotent(self) -> bool:
        return self.annotations.get("idempotent_hint") is True


# Config ------------------------------------------------------------------------------


def config_errors(config: Any) -> list[str]:
    """Every problem with an mcp tool's config, each naming the key at fault."""
    if not isinstance(config, dict):
        return [f"the config must be a JSON object, not {type(config).__name__}"]
    problems = [f"unknown key {key!r}" for key in sorted(set(config) - CONFIG_KEYS)]
    if "server" not in config:
        problems.append("server: missing; say how to reach the MCP server")
    else:
        problems += [f"server: {problem}" for problem in server_errors(config["server"])]
    tool_name = config.get("tool")
    if not isinstance(tool_name, str) or not tool_name.strip():
        problems.append("tool: missing; name the server's tool (as the server lists it)")
    if "annotations" in config and not isinstance(config["annotations"], dict):
        problems.append("annotations: must be a JSON object (the tool's annotations as listed)")
    problems += secret_errors(config.get("server"))
    return problems


def server_errors(server: Any) -> list[str]:
    """Every problem with the ``server`` part of a config."""
    if not isinstance(server, dict):
        return [f"must be a JSON object, not {type(server).__name__}"]
    transport = server.get("transport")
    if transport not in TRANSPORTS:
        return [f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}"]
    problems = [
        f"unknown key {key!r} for the {transport} transport"
        for key in sorted(set(server) - SERVER_KEYS[transport])
    ]
    if transport == STDIO:
        command = server.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(word, str) and word for word in command)
        ):
            problems.append(
                'command: must be a non-empty list of words, like ["python", "-m", "server"]'
            )
        else:
            problems += command_errors(command)
        problems += string_map_errors(server, "env")
        problems += loader_env_errors(server.get("env"))
    else:
        problems += url_errors(server.get("url"))
        problems += string_map_errors(server, "headers")
    return problems


def command_key(words: list[str]) -> list[str]:
    """A command as it is compared with AGENTOPS_MCP_COMMANDS: a first word that means
    this worker's Python (``stdio_parameters`` runs it as such) compares as ``python``."""
    if words and (words[0] in PYTHON_WORDS or words[0] == sys.executable):
        return ["python", *words[1:]]
    return list(words)


def command_allowed(command: list[str]) -> bool:
    """Whether the deployment lets workers run ``command``: it starts with one of
    AGENTOPS_MCP_COMMANDS, word for word (later words are the server's arguments)."""
    key = command_key(command)
    return any(
        allowed and key[: len(allowed)] == command_key(allowed)
        for allowed in settings.AGENTOPS_MCP_COMMANDS
    )


def command_errors(command: list[str]) -> list[str]:
    """A stdio server is a program every worker starts: the right to save a tool must not
    be the right to run any code there, so only the deployment's commands may be."""
    if command_allowed(command):
        return []
    return [
        f"command: `{shlex.join(command)}` is not a command MCP servers may run on this "
        "deployment's workers: its start must be one of AGENTOPS_MCP_COMMANDS"
    ]


def loader_env_errors(env: Any) -> list[str]:
    if not isinstance(env, dict):
        return []
    return [
        f"env.{name}: a stdio server's environment may not set {name}, which changes what "
        "the program loads or runs"
        for name in env
        if isinstance(name, str)
        and (name.upper() in LOADER_ENV_NAMES or name.upper().startswith(LOADER_ENV_PREFIXES))
    ]


def url_errors(url: Any) -> list[str]:
    if not isinstance(url, str) or not url:
        return ["url: missing; give the server's streamable HTTP endpoint, like http://host/mcp"]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"url: {url!r} is not an http:// or https:// URL with a host"]
    return []


def string_map_errors(server: dict, key: str) -> list[str]:
    if key not in server:
        return []
    values = server[key]
    if not isinstance(values, dict):
        return [f"{key}: must be a JSON object of names to text values"]
    problems = []
    for name, value in values.items():
        if not isinstance(value, str):
            problems.append(f"{key}.{name}: must be text, not {type(value).__name__}")
        elif value.startswith(PREFIX) and not SECRET_NAME.fullmatch(value[len(PREFIX) :]):
            problems.append(f"{key}.{name}: {value!r} does not name a secret (secret:NAME)")
    return problems


def server_describe(server: dict) -> str:
    """The server as a person recognises it, from the config as stored (so with
    ``secret:NAME`` references, never their values, and without URL credentials)."""
    if server.get("transport") == STDIO:
        return f"`{shlex.join(server.get('command') or [])}`"
    parts = urlsplit(str(server.get("url", "")))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"at {urlunsplit((parts.scheme, netloc, parts.path, '', ''))}"


def stdio_parameters(server: dict) -> StdioServerParameters:
    command = list(server["command"])
    # The last door before a process starts, whatever path led here.
    for problem in command_errors(command) + loader_env_errors(server.get("env")):
        raise McpUnavailable(problem)
    if command[0] in PYTHON_WORDS:
        command[0] = sys.executable
    return StdioServerParameters(command=command[0], args=command[1:], env=server.get("env"))


# Sessions ----------------------------------------------------------------------------


@asynccontextmanager
async def http_streams(server: dict) -> AsyncIterator[tuple[Any, Any]]:
    # The mcp package takes headers through the HTTP client it is given; it leaves
    # closing a client it did not create to the caller.
    async with (
        httpx2.AsyncClient(
            headers=server.get("headers") or {}, timeout=httpx2.Timeout(30.0, read=300.0)
        ) as client,
        streamable_http_client(server["url"], http_client=client) as streams,
    ):
        yield streams


def transport_open(server: dict, errlog: TextIO) -> AbstractAsyncContextManager:
    if server["transport"] == STDIO:
        return stdio_client(stdio_parameters(server), errlog=errlog)
    return http_streams(server)


@dataclass
class Attempt:
    """How far one session got: ``connect`` (nothing was asked), ``work`` (the request
    was sent, its answer not read) or ``done``; and what it met on the way."""

    phase: str = "connect"
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    stderr: str = field(default="", repr=False)


async def session_run(
    server: dict,
    work: Callable[[ClientSession], Awaitable[Any]],
    *,
    connect_seconds: float,
    work_seconds: float,
) -> Attempt:
    """Open a session with a resolved server config, initialise it, and run ``work``;
    the handshake and the work each have their own deadline. Never raises for the
    server's sake: the Attempt says what happened."""
    attempt = Attempt()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errlog:
        # One scope whose deadline moves from the handshake to the work: a scope of
        # its own around the handshake would close before the transport's task groups.
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + connect_seconds
            try:
                async with AsyncExitStack() as stack:
                    read, write = await stack.enter_async_context(transport_open(server, errlog))
                    session = await stack.enter_async_context(ClientSession(read, write))
                    await session.initialize()
                    attempt.phase = "work"
                    scope.deadline = anyio.current_time() + work_seconds
                    attempt.value = await work(session)
                    attempt.phase = "done"
                    # Closing is bounded by the transport itself (a stdio server is
                    # killed after a grace period); the answer is in hand.
                    scope.deadline = math.inf
            except Exception as error:
                attempt.error = error_leaf(error)
        attempt.timed_out = attempt.phase != "done" and (
            scope.cancel_called or scope.cancelled_caught
        )
        if server["transport"] == STDIO:
            errlog.seek(0)
            attempt.stderr = errlog.read()[-STDERR_TAIL:].strip()
    return attempt


def error_leaf(error: BaseException) -> BaseException:
    """The first real error inside the task groups' exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def error_text(error: BaseException | None) -> str:
    if error is None:
        return "no error was given"
    if isinstance(error, MCPError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unavailable_message(server: dict, attempt: Attempt, connect_seconds: float) -> str:
    """Why a session never got as far as asking the server anything."""
    where = server_describe(server)
    if attempt.timed_out:
        message = (
            f"the MCP server {where} did not finish the handshake within {connect_seconds:g} s"
        )
    elif server.get("transport") == STDIO and isinstance(attempt.error, OSError):
        message = f"could not start the MCP server {where}: {error_text(attempt.error)}"
    elif server.get("transport") == STDIO:
        message = f"the MCP server {where} did not start a session: {error_text(attempt.error)}"
    else:
        message = f"could not reach the MCP server {where}: {error_text(attempt.error)}"
    if attempt.stderr:
        message += f" (its stderr: {' '.join(attempt.stderr.split())})"
    return message


def run_sync(make: Callable[[], Coroutine[Any, Any, Attempt]]) -> Attempt:
    """Run a coroutine to completion from synchronous code. The engine and the
    management command call in without an event loop; if this thread already runs one
    (an async test harness), the session runs in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcp-session") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def tools_list(
    server: dict, *, timeout: float, describe_as: dict | None = None
) -> list[ServerTool]:
    """The tools a server lists, every page. ``server`` is resolved (secrets filled
    in); ``describe_as`` is the stored form used in messages. Raises McpUnavailable."""

    async def listing(session: ClientSession) -> list[Any]:
        tools, cursor = [], None
        while True:
            page = await session.list_tools(
                params=None if cursor is None else PaginatedRequestParams(cursor=cursor)
            )
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                return tools

    attempt = run_sync(
        lambda: session_run(server, listing, connect_seconds=timeout, work_seconds=timeout)
    )
    shown = describe_as or server
    if attempt.phase == "connect":
        raise McpUnavailable(unavailable_message(shown, attempt, timeout))
    if attempt.phase == "work":
        why = f"no answer within {timeout:g} s" if attempt.timed_out else error_text(attempt.error)
        raise McpUnavailable(
            f"the MCP server {server_describe(shown)} did not list its tools: {why}"
        )
    return [
        ServerTool(
            name=tool.name,
            description=tool.description or tool.title or "",
            input_schema=dict(tool.input_schema or {}),
            annotations=(
                tool.annotations.model_dump(mode="json", exclude_none=True)
                if tool.annotations
                else {}
            ),
        )
        for tool in attempt.value
    ]


# The executor ------------------------------------------------------------------------


def content_texts(result: CallToolResult) -> list[str]:
    """The result's content as text: text items as they are, others named."""
    texts = []
    for item in result.content:
        if getattr(item, "type", "") == "text":
            texts.append(item.text)
        elif getattr(item, "type", "") == "resource_link":
            texts.append(f"[resource link: {item.uri}]")
        else:
            mime = getattr(item, "mime_type", None) or ""
            texts.append(
                f"[{getattr(item, 'type', 'unknown')} content{' ' + mime if mime else ''}]"
            )
    return texts


class McpExecutor:
    def config_errors(self, config: dict) -> list[str]:
        return config_errors(config)

    def validate(self, tool: Tool, arguments: dict) -> list[str]:
        errors = arguments_errors(tool.input_schema, arguments)
        problems = config_errors(tool.config)
        if problems:
            errors.append(f"the config of {tool.name} is invalid: " + "; ".join(problems))
        return errors

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        problems = config_errors(tool.config)
        if problems:
            return ToolResult(
                ok=False, error=f"the config of {tool.name} is invalid: " + "; ".join(problems)
            )
        stored = tool.config["server"]
        try:
            server, _ = config_resolve(stored)
        except SecretMissing as error:
            return ToolResult(ok=False, error=f"{tool.name} cannot be called: {error}")
        name = tool.config["tool"]
        meta = {IDEMPOTENCY_META_KEY: context.idempotency_key}

        async def call(session: ClientSession) -> CallToolResult:
            return await session.call_tool(name, arguments, meta=meta)  # type: ignore[arg-type]

        attempt = run_sync(
            lambda: session_run(
                server, call, connect_seconds=CONNECT_SECONDS, work_seconds=tool.timeout_seconds
            )
        )
        if attempt.phase == "connect":
            return ToolResult(
                ok=False,
                error=unavailable_message(stored, attempt, CONNECT_SECONDS)
                + "; nothing was called",
                transient=True,
            )
        if attempt.phase == "work":
            return self.lost(tool, stored, attempt)
        result: CallToolResult = attempt.value
        texts = content_texts(result)
        if result.is_error:
            return ToolResult(
                ok=False, error="\n".join(texts) or f"the MCP tool {name} reported an error"
            )
        return ToolResult(
            ok=True, value={"content": texts, "structured": result.structured_content}
        )

    def lost(self, tool: Tool, stored: dict, attempt: Attempt) -> ToolResult:
        """The request was sent and no result came back."""
        error = attempt.error
        if isinstance(error, MCPError) and error.code not in (CONNECTION_CLOSED, REQUEST_TIMEOUT):
            # The server answered, with a protocol error instead of a result.
            return ToolResult(
                ok=False,
                error=f"the MCP server {server_describe(stored)} refused the call: {error.message}",
            )
        if attempt.timed_out:
            why = f"the MCP server did not answer within {tool.timeout_seconds:g} s"
        else:
            why = f"the connection to the MCP server was lost: {error_text(error)}"
        if tool.idempotent:
            return ToolResult(ok=False, error=f"{why}; the tool is idempotent", transient=True)
        return ToolResult(
            ok=False,
            error=f"{why}; the call may or may not have taken effect, and the tool is not "
            "idempotent, so it was not retried",
        )
