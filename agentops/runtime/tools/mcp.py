"""Tools served by a Model Context Protocol server, one Tool row per server tool.

A row's config names the server and the server's own name for the tool:

    {"server": {"transport": "stdio", "command": ["python", "-m", "mcp_server_time"],
                "env": {"KEY": "secret:NAME"}},
     "tool": "get_current_time",
     "annotations": {"read_only_hint": true, ...}}   # as listed at import, for the record

or ``{"transport": "http", "url": "https://mcp.example.com/mcp", "headers": {"Authorization":
"Bearer {secret:TOKEN}"}, "allowed_hosts": ["mcp.example.com"], "allow_private": false}``
for a streamable HTTP server, fenced as an http tool is: the url's host must be one of
``allowed_hosts``; every address it resolves to must be public unless ``allow_private``;
the connection goes to the address that was checked (``PinnedBackend``). Rows are made by
``manage.py mcp_import``; each call opens its own session (a stdio server is started for
the call and stopped after it), so a worker keeps no connection between steps.

The mcp client is async: ``execute`` runs a call's session (``session_run``) to its end
on a loop of its own (``run_sync``); ``aexecute`` awaits the same coroutine on the async
worker's loop, so a call in flight holds no thread. The two differ only there and in the
address lookup (``server_addresses`` / ``server_addresses_async``); what a call is
(``call_prepare``) and what its outcome means (``call_judge``) are one code. Nothing in a
session blocks its loop: the stdio server's stderr file and the TLS context (which reads
the trust store) are made and read in a thread.

The limits: what a server sends in a session (a tool's result; a listing, every page;
whatever else it says) may take at most the tool's ``max_response_bytes``, the http
tool's setting with its default and ceiling (``AnswerMeter``): over HTTP the bytes are
counted as they arrive and the reading stops at the limit (``MeteredTransport``); over
stdio each message is counted once the mcp package has read its line
(``MeteredReadStream``). Past it, the call fails saying so (``answer_refused``). Closing
a session (a stdio server's shutdown, an http server's DELETE of its session) is cut
short after ``CLOSE_SECONDS``, and never runs past the call's own deadline: a far side
that does not let go cannot hold up an outcome already in hand.

What a failure means for a retry: a server that cannot be started, reached or
initialised was never asked anything, so that failure is transient. Once the call is
sent, a timeout or a lost connection leaves its effect unknown: transient only for a
tool that is idempotent. A server's error answer goes back to the model.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpcore2
import httpx2
from django.conf import settings
from httpcore2._backends.auto import AutoBackend
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult, PaginatedRequestParams
from pydantic_core import to_json

from agentops.config import EXACT_COMMAND_MARK
from agentops.runtime.secrets import (
    PREFIX,
    SecretMissing,
    config_resolve,
    excerpt_redacted,
    secret_errors,
)
from agentops.runtime.tools.base import ToolContext, ToolError, ToolResult, arguments_errors
from agentops.runtime.tools.http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    MAX_RESPONSE_BYTES_CEILING,
    Deadline,
    addresses_checked,
    addresses_checked_async,
    allowed_hosts_errors,
    max_response_bytes_errors,
)

if TYPE_CHECKING:
    from tasks.models import Tool

STDIO = "stdio"
HTTP = "http"
TRANSPORTS = (STDIO, HTTP)
CONFIG_KEYS = {"server", "tool", "annotations", "max_response_bytes"}
SERVER_KEYS = {
    STDIO: {"transport", "command", "env"},
    HTTP: {"transport", "url", "headers", "allowed_hosts", "allow_private"},
}
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
    # Code loaded by libraries every program links (OpenSSL engines, glibc's iconv
    # modules and locales, its tunables and malloc), where traffic goes and whom TLS
    # trusts, and where programs find their configuration and temporary files.
    "OPENSSL_",
    "SSL_",
    "SSLKEYLOG",
    "GLIBC_",
    "MALLOC_",
    "XDG_",
    "CARGO_",
    "RUSTUP_",
    "DENO_",
    "BUN_",
    "GEM_",
    "BUNDLE_",
)
LOADER_ENV_SUFFIXES = ("_PROXY", "_CA_BUNDLE", "_CA_CERTS")
LOADER_ENV_NAMES = {
    "PATH",
    "HOME",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "PS4",
    "IFS",
    "CLASSPATH",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "TMPDIR",
    "TMP",
    "TEMP",
    "TZDIR",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    "TERMINFO",
    "SHELL",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "BROWSER",
    "NETRC",
    "GOFLAGS",
    "GOPROXY",
    "GOROOT",
    "GOPATH",
    "GOENV",
    "GOTOOLCHAIN",
}
# A stdio server's env names: upper-case letters, digits and underscores. Lower-case
# names (https_proxy, npm_config_*) are how many programs read the same settings.
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# Starting a stdio server (an interpreter and its imports) takes a second or two; one
# that has not finished the handshake in this long is taken as down. Not part of the
# tool's timeout_seconds, which bounds the call itself.
CONNECT_SECONDS = 15.0
# How long closing a session may take once its outcome is in hand (or lost): enough for a
# polite DELETE of an http session; a stdio server's shutdown bounds itself (the mcp
# package stops it after a grace period and a kill).
CLOSE_SECONDS = 5.0
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STDERR_TAIL = 500
STDERR_READ = 65536
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
    problems += max_response_bytes_errors(config)
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
        problems += env_value_errors(server.get("env"))
    else:
        problems += url_errors(server.get("url"))
        problems += string_map_errors(server, "headers")
        problems += address_fence_errors(server)
    return problems


def address_fence_errors(server: dict) -> list[str]:
    """The http tool's fence, with its names: ``allowed_hosts`` (required, the exact host
    names the server may be reached at; the url's host must be one) and
    ``allow_private`` (default false: every address the host resolves to must be
    public, checked when the call connects)."""
    allowed = server.get("allowed_hosts")
    problems = [f"{problem}" for problem in allowed_hosts_errors(allowed)]
    if not isinstance(server.get("allow_private", False), bool):
        problems.append("allow_private must be true or false")
    url = server.get("url")
    if problems or not isinstance(url, str) or url_errors(url):
        return problems
    host = urlsplit(url).hostname
    if host not in {name.lower() for name in allowed}:
        problems.append(f"the url's host {host} is not in allowed_hosts ({', '.join(allowed)})")
    return problems


def command_key(words: list[str]) -> list[str]:
    """A command as it is compared with AGENTOPS_MCP_COMMANDS: a first word that means
    this worker's Python (``stdio_parameters`` runs it as such) compares as ``python``."""
    if words and (words[0] in PYTHON_WORDS or words[0] == sys.executable):
        return ["python", *words[1:]]
    return list(words)


def command_allowed(command: list[str]) -> bool:
    """Whether the deployment lets workers run ``command``: it starts with one of
    AGENTOPS_MCP_COMMANDS, word for word (later words are the server's arguments), or it
    is one marked exact (first word ``=``), word for word with nothing after."""
    key = command_key(command)
    for allowed in settings.AGENTOPS_MCP_COMMANDS:
        exact = bool(allowed) and allowed[0] == EXACT_COMMAND_MARK
        words = command_key(allowed[1:] if exact else allowed)
        if not words:
            continue
        if key == words if exact else key[: len(words)] == words:
            return True
    return False


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
    """A stdio server's env names: upper case (``ENV_NAME``), and none that steers what
    a program loads or runs, where its traffic goes or whom it trusts. A net under
    ``env_value_errors``, which is the fence: a name's value is always the deployment's."""
    if not isinstance(env, dict):
        return []
    problems = []
    for name in env:
        if not isinstance(name, str):
            continue
        upper = name.upper()
        if (
            upper in LOADER_ENV_NAMES
            or upper.startswith(LOADER_ENV_PREFIXES)
            or upper.endswith(LOADER_ENV_SUFFIXES)
        ):
            problems.append(
                f"env.{name}: a stdio server's environment may not set {name}, which changes "
                "what the program loads or runs, where its traffic goes or what it trusts"
            )
        elif not ENV_NAME.fullmatch(name):
            problems.append(
                f"env.{name}: a stdio server's env names are upper-case letters, digits and "
                "underscores, starting with a letter"
            )
    return problems


def env_value_errors(env: Any) -> list[str]:
    """Every value of a stdio server's env is a secret, ``secret:NAME``: a value the
    deployment set in the worker's environment. A plain value would be the tool's author
    telling an allowed server what to do (a root directory, a proxy, a config file), as
    an argument after an exact command would."""
    if not isinstance(env, dict):
        return []
    return [
        f"env.{name}: {value!r} is not a secret: a stdio server's env takes only "
        "secret:NAME values, read from the worker's environment (put a plain setting there "
        "as a TOOL_SECRET_… variable and name it)"
        for name, value in env.items()
        if isinstance(value, str) and not value.startswith(PREFIX)
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
    # The last door before a process starts, whatever path led here. (Its env is
    # resolved by now: the values were checked to be secrets with the stored config.)
    for problem in command_errors(command) + loader_env_errors(server.get("env")):
        raise McpUnavailable(problem)
    if command[0] in PYTHON_WORDS:
        command[0] = sys.executable
    return StdioServerParameters(command=command[0], args=command[1:], env=server.get("env"))


# Sessions ----------------------------------------------------------------------------


class McpRefused(McpUnavailable):
    """The server's address is one the tool may not reach: nothing was sent, and trying
    again would not help."""


Addresses = list[tuple[int, tuple]]


def server_addresses(server: dict, *, seconds: float) -> Addresses:
    """The addresses an http server's host resolves to, each checked as an http tool's
    are (``addresses_checked``): raises McpRefused for one the config does not allow,
    McpUnavailable if the name cannot be looked up."""
    try:
        return addresses_checked(**server_fence(server, seconds=seconds))
    except ToolError as error:
        raise fence_failure(error) from None


async def server_addresses_async(server: dict, *, seconds: float) -> Addresses:
    """``server_addresses``, awaited (the loop's resolver: no thread waits on it)."""
    try:
        return await addresses_checked_async(**server_fence(server, seconds=seconds))
    except ToolError as error:
        raise fence_failure(error) from None


def server_fence(server: dict, *, seconds: float) -> dict[str, Any]:
    """What ``addresses_checked`` is asked about an http server: its host and port, the
    name messages give it, its allow_private, and the lookup's deadline."""
    parts = urlsplit(server["url"])
    return {
        "host": parts.hostname or "",
        "port": parts.port or (443 if parts.scheme == "https" else 80),
        "label": f"the MCP server {server_describe(server)}",
        "allow_private": server.get("allow_private", False),
        "deadline": Deadline(seconds),
    }


def fence_failure(error: ToolError) -> McpUnavailable:
    """A refused address (permanent) is McpRefused; a failed lookup, McpUnavailable."""
    return (McpUnavailable if error.transient else McpRefused)(str(error))


class PinnedBackend(AutoBackend):
    """httpcore's network backend, connecting only to the addresses already checked for
    the server's host, never looking the name up again (a second answer could be a
    private address: DNS rebinding). The Host header and the TLS certificate check still
    use the name: httpcore passes it to ``start_tls`` itself."""

    def __init__(self, host: str, addresses: Addresses) -> None:
        super().__init__()
        self.host = host.lower()
        self.addresses = addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> Any:
        if host.strip("[]").lower() != self.host:
            raise httpcore2.ConnectError(f"refused: {host} is not the server's checked host")
        failure: Exception | None = None
        for _, sockaddr in self.addresses:
            try:
                return await super().connect_tcp(
                    sockaddr[0], port, timeout, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as error:
                failure = error
        raise failure or httpcore2.ConnectError(f"{host}: no address to connect to")


class AnswerTooLarge(Exception):
    """A server sent more than its session may take (``AnswerMeter``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"it sent more than {limit} bytes in answer")
        self.limit = limit


class AnswerMeter:
    """The bytes a server has sent in one session: an http server's response bodies as
    they arrive (``MeteredTransport``), a stdio server's messages (``MeteredReadStream``).
    Past ``limit`` the read in progress fails (``AnswerTooLarge``), so no more is held,
    and ``over`` tells the outcome, whatever the mcp client made of the failed read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.over = False

    def count(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            self.over = True
            raise AnswerTooLarge(self.limit)


class MeteredStream(httpx2.AsyncByteStream):
    """A response body that counts itself on an ``AnswerMeter`` as it is read."""

    def __init__(self, stream: httpx2.AsyncByteStream, meter: AnswerMeter) -> None:
        self.stream = stream
        self.meter = meter

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.meter.count(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class MeteredTransport(httpx2.AsyncHTTPTransport):
    """httpx's transport, every response body metered (``MeteredStream``). The client
    asks for no compression, and a compressed answer is refused: metered as sent, a small
    body could unpack into one far past the limit."""

    def __init__(self, meter: AnswerMeter, **options: Any) -> None:
        super().__init__(**options)
        self.meter = meter

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            await response.aclose()
            raise httpx2.DecodingError(
                f"the server compressed its answer ({encoding}) though it was asked not to; "
                "refused, as it could unpack past max_response_bytes"
            )
        response.stream = MeteredStream(response.stream, self.meter)
        return response


@asynccontextmanager
async def http_streams(
    server: dict, addresses: Addresses, meter: AnswerMeter
) -> AsyncIterator[tuple[Any, Any]]:
    # The mcp package takes headers through the HTTP client it is given; it leaves
    # closing a client it did not create to the caller. No proxy or certificate from the
    # environment (trust_env off: a proxy would make the checked address moot); the
    # system's trust store, as the http tool has it: read in a thread, not on the loop.
    tls = await anyio.to_thread.run_sync(ssl.create_default_context)
    transport = MeteredTransport(meter, verify=tls, trust_env=False)
    # httpx2 takes no network backend; its pool reads this one for every connection
    # (tests/runtime/tools/test_mcp.py proves the pin holds).
    transport._pool._network_backend = PinnedBackend(
        urlsplit(server["url"]).hostname or "", addresses
    )
    # Whatever the config says, no compression (MeteredTransport refuses it).
    headers = {
        name: value
        for name, value in (server.get("headers") or {}).items()
        if name.lower() != "accept-encoding"
    }
    async with (
        httpx2.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            headers={**headers, "Accept-Encoding": "identity"},
            timeout=httpx2.Timeout(30.0, read=300.0),
        ) as client,
        # One event of the stream is at most the answer the meter allows.
        streamable_http_client(
            server["url"], http_client=client, max_sse_event_size=meter.limit
        ) as streams,
    ):
        yield streams


class MeteredReadStream:
    """A stdio transport's stream of the server's messages (the mcp package's
    ``ReadStream``), each counted on an ``AnswerMeter`` as its JSON: past the limit the
    stream ends, as if the server had closed it, so the session's requests fail at once
    and ``over`` says why. The mcp package has read each line whole by then: this bounds
    what a session keeps and hands on, not what it reads."""

    def __init__(self, stream: Any, meter: AnswerMeter) -> None:
        self.stream = stream
        self.meter = meter

    async def receive(self) -> Any:
        item = await self.stream.receive()
        if isinstance(item, SessionMessage):
            try:
                self.meter.count(len(to_json(item.message, by_alias=True, exclude_none=True)))
            except AnswerTooLarge:
                raise anyio.EndOfStream from None
        return item

    async def aclose(self) -> None:
        await self.stream.aclose()

    def __aiter__(self) -> MeteredReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> MeteredReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@asynccontextmanager
async def stdio_streams(
    server: dict, errlog: TextIO, meter: AnswerMeter
) -> AsyncIterator[tuple[Any, Any]]:
    async with stdio_client(stdio_parameters(server), errlog=errlog) as (read, write):
        yield MeteredReadStream(read, meter), write


def transport_open(
    server: dict, errlog: TextIO | None, addresses: Addresses | None, meter: AnswerMeter
) -> AbstractAsyncContextManager:
    if server["transport"] == STDIO:
        if errlog is None:  # session_run gives a stdio server a file for its stderr
            raise McpUnavailable("the MCP server has nowhere to write its stderr")
        return stdio_streams(server, errlog, meter)
    if addresses is None:  # a caller that skipped the check reaches nothing
        raise McpRefused("the MCP server's address was not checked; nothing was sent")
    return http_streams(server, addresses, meter)


@dataclass
class Attempt:
    """How far one session got: ``connect`` (nothing was asked), ``work`` (the request
    was sent, its answer not read) or ``done``; and what it met on the way."""

    phase: str = "connect"
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    stderr: str = field(default="", repr=False)
    stderr_cut: bool = False  # stderr is the end of a longer text


async def session_run(
    server: dict,
    work: Callable[[ClientSession], Awaitable[Any]],
    *,
    connect_seconds: float,
    work_seconds: float,
    max_bytes: int,
    addresses: Addresses | None = None,
) -> Attempt:
    """Open a session with a resolved server config, initialise it, and run ``work``;
    the handshake and the work each have their own deadline, and closing the session
    its own short one (``CLOSE_SECONDS``). Never raises for the server's sake: the
    Attempt says what happened (``AnswerTooLarge`` as its error if the server sent more
    than ``max_bytes``). An http server is reached only at ``addresses``
    (``server_addresses``)."""
    attempt = Attempt()
    meter = AnswerMeter(max_bytes)
    # A stdio server writes its stderr to a file (a pipe it filled would stall it). The
    # file is made and read in a thread: this may run on the async worker's shared loop.
    errlog = (
        await anyio.to_thread.run_sync(stderr_file_open) if server["transport"] == STDIO else None
    )
    try:
        # One scope whose deadline moves from the handshake to the work, then to the
        # close: a scope of its own around the handshake would close before the
        # transport's task groups.
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + connect_seconds
            try:
                async with AsyncExitStack() as stack:
                    try:
                        read, write = await stack.enter_async_context(
                            transport_open(server, errlog, addresses, meter)
                        )
                        session = await stack.enter_async_context(ClientSession(read, write))
                        await session.initialize()
                        attempt.phase = "work"
                        scope.deadline = anyio.current_time() + work_seconds
                        attempt.value = await work(session)
                        attempt.phase = "done"
                    except Exception as error:
                        # Kept now: a close cut short would end its propagation.
                        attempt.error = error_leaf(error)
                    finally:
                        # Judged before the close, which may yet be cut short.
                        attempt.timed_out = attempt.phase != "done" and scope.cancel_called
                        scope.deadline = min(scope.deadline, anyio.current_time() + CLOSE_SECONDS)
            except Exception as error:  # from the transport's own tasks, as it closed
                attempt.error = attempt.error or error_leaf(error)
        if meter.over:  # whatever the mcp client made of the read the meter stopped
            attempt.error = AnswerTooLarge(meter.limit)
    finally:
        if errlog is not None:
            # Shielded: a call cancelled from outside still closes its file.
            with anyio.CancelScope(shield=True):
                attempt.stderr, attempt.stderr_cut = await anyio.to_thread.run_sync(
                    stderr_tail_read, errlog
                )
    return attempt


def stderr_file_open() -> TextIO:
    return tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")


def stderr_tail_read(errlog: TextIO) -> tuple[str, bool]:
    """The end of what a stdio server wrote to ``errlog`` (cut again once redacted, in
    ``unavailable_message``), and whether it is the end of a longer text; the file is
    closed after."""
    with errlog:
        size = errlog.seek(0, 2)
        errlog.seek(max(0, size - STDERR_READ))
        return errlog.read(), size > STDERR_READ


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
    if isinstance(error, AnswerTooLarge):
        return str(error)  # a sentence of ours, not a library's exception
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unavailable_message(
    server: dict, attempt: Attempt, connect_seconds: float, secrets: dict[str, str]
) -> str:
    """Why a session never got as far as asking the server anything, with the end of
    what a stdio server printed, redacted before it is cut (``excerpt_redacted``)."""
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
    stderr = excerpt_redacted(
        attempt.stderr, secrets, limit=STDERR_TAIL, from_end=True, cut=attempt.stderr_cut
    )
    if stderr:
        message += f" (its stderr: {stderr})"
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
    server: dict,
    *,
    timeout: float,
    describe_as: dict | None = None,
    secrets: dict[str, str] | None = None,
) -> list[ServerTool]:
    """The tools a server lists, every page. ``server`` is resolved (secrets filled
    in, their values in ``secrets``); ``describe_as`` is the stored form used in
    messages. Raises McpRefused for an address the config does not allow,
    McpUnavailable for a server that cannot be reached or does not list. A listing is
    read by a person's import, not stored in a step or shown to a model: all its pages
    together may take up to ``MAX_RESPONSE_BYTES_CEILING``, the most any answer may."""

    async def listing(session: ClientSession) -> list[Any]:
        # Every page counts on the session's meter: paging forever is answering too much.
        tools, cursor = [], None
        while True:
            page = await session.list_tools(
                params=None if cursor is None else PaginatedRequestParams(cursor=cursor)
            )
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                return tools

    shown = describe_as or server
    addresses = server_addresses(server, seconds=timeout) if server["transport"] == HTTP else None
    attempt = run_sync(
        lambda: session_run(
            server,
            listing,
            connect_seconds=timeout,
            work_seconds=timeout,
            max_bytes=MAX_RESPONSE_BYTES_CEILING,
            addresses=addresses,
        )
    )
    if attempt.phase == "connect":
        raise McpUnavailable(unavailable_message(shown, attempt, timeout, secrets or {}))
    if attempt.phase == "work" or isinstance(attempt.error, AnswerTooLarge):
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


@dataclass(frozen=True)
class McpCall:
    """One call made ready, the same for ``execute`` and ``aexecute``: the server as
    stored (for messages) and resolved (secrets filled in, their values in ``secrets``),
    the server's name for the tool, the arguments, what goes in the request's _meta, and
    the limits: the call's seconds and its answer's bytes."""

    stored: dict
    server: dict
    secrets: dict[str, str]
    name: str
    arguments: Any
    meta: dict
    work_seconds: float
    max_bytes: int


def call_prepare(tool: Tool, arguments: Any, context: ToolContext) -> McpCall | ToolResult:
    """The call ready to make, or why it cannot be (nothing is started or sent). No I/O."""
    problems = config_errors(tool.config)
    if problems:
        return ToolResult(
            ok=False, error=f"the config of {tool.name} is invalid: " + "; ".join(problems)
        )
    stored = tool.config["server"]
    try:
        server, secrets = config_resolve(stored)
    except SecretMissing as error:
        return ToolResult(ok=False, error=f"{tool.name} cannot be called: {error}")
    return McpCall(
        stored=stored,
        server=server,
        secrets=secrets,
        name=tool.config["tool"],
        arguments=arguments,
        meta={IDEMPOTENCY_META_KEY: context.idempotency_key},
        work_seconds=tool.timeout_seconds,
        max_bytes=tool.config.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
    )


def answer_refused(tool: Tool, stored: dict, error: AnswerTooLarge) -> ToolResult:
    """The server's answer was larger than the tool takes: refused, and final (the same
    call would meet the same answer). The call was sent, so it may have had an effect."""
    effect = "" if tool.idempotent else "; the call may have taken effect"
    return ToolResult(
        ok=False,
        error=f"the MCP server {server_describe(stored)} answered with more than "
        f"{error.limit} bytes (the tool's max_response_bytes); the answer was refused{effect}",
    )


def call_unreachable(error: McpUnavailable) -> ToolResult:
    """The server's address was refused (permanent) or could not be looked up."""
    return ToolResult(
        ok=False,
        error=f"{error}; nothing was called",
        transient=not isinstance(error, McpRefused),
    )


async def call_session(call: McpCall, addresses: Addresses | None) -> Attempt:
    """The session that makes the call: the coroutine both paths run."""

    async def work(session: ClientSession) -> CallToolResult:
        return await session.call_tool(call.name, call.arguments, meta=call.meta)

    return await session_run(
        call.server,
        work,
        connect_seconds=CONNECT_SECONDS,
        work_seconds=call.work_seconds,
        max_bytes=call.max_bytes,
        addresses=addresses,
    )


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
        """Call the server's tool once, in a session of its own (``session_run``, run to
        its end on a loop of this thread's own)."""
        call = call_prepare(tool, arguments, context)
        if isinstance(call, ToolResult):
            return call
        addresses = None
        if call.server["transport"] == HTTP:
            try:
                addresses = server_addresses(call.server, seconds=CONNECT_SECONDS)
            except McpUnavailable as error:
                return call_unreachable(error)
        attempt = run_sync(lambda: call_session(call, addresses))
        return self.call_judge(tool, call, attempt)

    async def aexecute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        """``execute`` on the running event loop: the same session, awaited, so a call in
        flight holds no thread."""
        call = call_prepare(tool, arguments, context)
        if isinstance(call, ToolResult):
            return call
        addresses = None
        if call.server["transport"] == HTTP:
            try:
                addresses = await server_addresses_async(call.server, seconds=CONNECT_SECONDS)
            except McpUnavailable as error:
                return call_unreachable(error)
        attempt = await call_session(call, addresses)
        return self.call_judge(tool, call, attempt)

    def call_judge(self, tool: Tool, call: McpCall, attempt: Attempt) -> ToolResult:
        """What a session's outcome means for the step, and for a retry."""
        if attempt.phase == "connect":
            return ToolResult(
                ok=False,
                error=unavailable_message(call.stored, attempt, CONNECT_SECONDS, call.secrets)
                + "; nothing was called",
                transient=True,
            )
        if isinstance(attempt.error, AnswerTooLarge):
            return answer_refused(tool, call.stored, attempt.error)
        if attempt.phase == "work":
            return self.lost(tool, call.stored, attempt)
        result: CallToolResult = attempt.value
        texts = content_texts(result)
        if result.is_error:
            return ToolResult(
                ok=False, error="\n".join(texts) or f"the MCP tool {call.name} reported an error"
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
