"""HTTP tools: one REST call per tool, described in its config:

    {
        "method": "POST",
        "url": "https://api.example.com/items/{id}",
        "headers": {"Authorization": "Bearer {secret:API_TOKEN}"},
        "query": {"q": "{term}"},
        "body": {"id": "{id}", "note": "about {term}"},
        "allowed_hosts": ["api.example.com"],
        "allow_private": false,
        "max_response_bytes": 1000000
    }

``{name}`` is filled from the call's arguments (URL-quoted in the URL); in the body, a
string that is exactly one placeholder becomes the argument's value with its JSON type,
and ``"$arguments"`` becomes all of them. Secrets (``secret:NAME``, ``{secret:NAME}``) are
read from the environment at call time and redacted from whatever the call returns.

The guards: the URL's host is fixed in the config (no placeholders) and must be one of
``allowed_hosts``; the name is resolved once and every address it resolves to is checked
(no private, loopback, link-local, multicast, reserved or unspecified address unless
``allow_private``); the connection goes to that checked address, so a second lookup cannot
answer differently (DNS rebinding), while the Host header and the TLS certificate check
still use the name. Redirects are not followed. The response is cut off past
``max_response_bytes``; one that takes far more than that as sent (a body of tiny chunks,
long chunk extensions), or that sends more than ``MAX_INFORMATIONAL`` informational (1xx)
responses before its answer, ends the call (``AnswerReading``); and the whole call
(lookup, connect, send, read) ends at ``tool.timeout_seconds``.

Two paths make the call, and differ only in how they wait: ``execute`` blocks its thread;
``aexecute`` awaits on an event loop, a little at a time, so a call in flight holds no
thread and a far side that floods it cannot hold the loop. Everything else is one code:
the lookup (``Lookups``), the request (its headers as sent, ``request_build``, and its
bytes, ``h11_request``), the fence (``host_admit``, ``addresses_judge``), the reading of
the answer and its limits (``AnswerReading``, h11 for HTTP/1.1), and what each failure
means (``connect_failure``, ``exchange_failure``, ``response_judge``). Each call has its
own connection, closed after it, on either path: a pool shared between calls would let
one tool's call ride a connection opened under another tool's fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

# The HTTP/1.1 state machine under httpcore2 (so installed with httpx2, a dependency).
import h11

from agentops.runtime.secrets import (
    PREFIX,
    SecretMissing,
    config_resolve,
    excerpt_redacted,
    redact,
    secret_errors,
)
from agentops.runtime.tools.base import ToolContext, ToolError, ToolResult, arguments_errors

if TYPE_CHECKING:
    from tasks.models import Tool

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# The methods that only read (RFC 9110's safe methods that carry no body): a tool with any
# other may not be declared read-only, or it would run without a person at every level.
READ_METHODS = ("GET", "HEAD")
# Headers and query parameters that ask a server (or a framework in front of it) to take
# a request as another method: on a GET they can turn a read into a DELETE. Refused on a
# read tool only; on any other tool the gate already treats the call as a change.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
METHOD_OVERRIDE_PARAMETERS = ("_method",)
CONFIG_KEYS = (
    "method",
    "url",
    "headers",
    "query",
    "body",
    "allowed_hosts",
    "allow_private",
    "max_response_bytes",
)
DEFAULT_MAX_RESPONSE_BYTES = 1_000_000
# A response becomes a step's stored result and part of the model's next prompt: past a
# few megabytes it is a mistake in the tool, not data anyone can use.
MAX_RESPONSE_BYTES_CEILING = 10_000_000
ALL_ARGUMENTS = "$arguments"
# {name} is an argument; {secret:NAME} a secret. One pattern, one pass: a value filled in
# is never read again as a template, so an argument cannot name a secret to be resolved.
TEMPLATE = re.compile(r"\{(secret:)?([A-Za-z_][A-Za-z0-9_]*)\}")
ARGUMENT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Set by the executor from the URL, the body and the call; a config that set them could
# send the request to one virtual host while the allowlist checked another.
RESERVED_HEADERS = ("host", "content-length", "transfer-encoding", "connection", "idempotency-key")
KEPT_HEADERS = (
    "content-type",
    "content-length",
    "etag",
    "last-modified",
    "location",
    "retry-after",
)
EXCERPT_CHARS = 300
ERROR_BODY_BYTES = 16384
READ_CHUNK = 65536
# The most the event loop's path takes in before it lets the loop's other calls run: 4 KB
# of the smallest chunks a server can send (6 bytes each) is some 700 parser events, a
# few milliseconds (h11's work per event grows with what it holds: 64 KB took 60 ms).
LOOP_READ_BYTES = 4096
# The most a response's status line and headers may take (http.client's line limit).
MAX_HEAD_BYTES = 65536
# Informational (1xx) responses a server may send before its answer: one 100 Continue or
# a 103 Early Hints or two is usual; a server that goes on is stalling, not answering.
MAX_INFORMATIONAL = 10
# A body up to this size is judged and redacted on the event loop (a millisecond or two);
# a larger one in a thread, so the loop's other calls do not wait behind it.
SETTLE_ON_LOOP_BYTES = 262_144
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# The methods sent with a Content-Length even when there is no body (as http.client does).
BODY_METHODS = ("PATCH", "POST", "PUT")
# Control characters a header value may not hold (a tab may be inside one).
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RequestInvalid(ValueError):
    """The call's arguments cannot make a request from this tool's templates."""


@dataclass
class HttpRequest:
    method: str
    scheme: str
    host: str
    port: int
    path: str  # without the query, for messages
    target: str  # path and query, as sent
    headers: dict[str, str]
    body: bytes | None
    secrets: dict[str, str] = field(default_factory=dict)  # the values used, by name

    @property
    def netloc(self) -> str:
        """The host and, unless it is the scheme's own, the port: the Host header."""
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        if self.port != default:
            netloc += f":{self.port}"
        return netloc

    @property
    def label(self) -> str:
        """The request as messages name it (no query: it may hold arguments or keys)."""
        return f"{self.method} {self.scheme}://{self.netloc}{self.path}"


@dataclass(frozen=True)
class HttpCall:
    """One call made ready: the request and the limits it is sent under, the same for
    ``execute`` and ``aexecute``. ``repeatable``: sending it twice is harmless (an
    idempotent tool, or a method that only reads), so a failure after it was sent may be
    retried."""

    request: HttpRequest
    allowed_hosts: list[str]
    allow_private: bool
    max_bytes: int
    timeout: float
    repeatable: bool

    def outcome(self, *, value: Any = None, failure: ToolError | None = None) -> ToolResult:
        """The call's result, every secret it used redacted."""
        if failure is not None:
            result = ToolResult(ok=False, error=str(failure), transient=failure.transient)
        else:
            result = ToolResult(ok=True, value=value)
        return secrets_redact(result, self.request.secrets)

    def settle(self, answered: Answered) -> ToolResult:
        """The result of the answer the server gave (``response_judge``), redacted."""
        try:
            value = response_judge(
                self.request, *answered, self.repeatable, max_bytes=self.max_bytes
            )
        except ToolError as failure:
            return self.outcome(failure=failure)
        return self.outcome(value=value)


class Answered(NamedTuple):
    """What an exchange read: the status line and headers, at most the limit of the body,
    and whether the body went on past it."""

    answer: HttpAnswer
    data: bytes
    cut: bool


@dataclass(frozen=True)
class HttpAnswer:
    """A response's status line and headers, however they were read."""

    status: int
    reason: str
    headers: http.client.HTTPMessage

    @property
    def success(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str) -> str | None:
        """The header's value, several joined as http.client's ``getheader`` joins them."""
        values = self.headers.get_all(name)
        return ", ".join(values) if values else None


class HttpExecutor:
    def config_errors(self, config: dict) -> list[str]:
        """Every problem with an http tool's config, each named."""
        if not isinstance(config, dict):
            return ["the config must be a JSON object"]
        errors = []
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            errors.append(
                f"unknown config keys: {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})"
            )
        method = config.get("method")
        if method not in METHODS:
            errors.append(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        allowed = config.get("allowed_hosts")
        errors += allowed_hosts_errors(allowed)
        errors += url_errors(config.get("url"), allowed if isinstance(allowed, list) else [])
        errors += headers_errors(config.get("headers", {}))
        query = config.get("query", {})
        if not isinstance(query, dict):
            errors.append("query must be an object of parameter names to values")
        else:
            for name, value in query.items():
                if not isinstance(value, str | int | float | bool):
                    errors.append(f"query {name!r}: the value must be a string or a number")
        if method in READ_METHODS and config.get("body") is not None:
            errors.append(f"a {method} request has no body: remove body or use another method")
        if not isinstance(config.get("allow_private", False), bool):
            errors.append("allow_private must be true or false")
        errors += max_response_bytes_errors(config)
        errors += secret_errors(config)
        return errors

    def validate(self, tool: Tool, arguments: dict) -> list[str]:
        errors = arguments_errors(tool.input_schema, arguments)
        problems = self.config_errors(tool.config) + side_effect_errors(
            tool.config, tool.side_effect
        )
        if problems:
            errors.append("the tool's config is invalid: " + "; ".join(problems))
            return errors
        if not isinstance(arguments, dict):
            return errors or ["the arguments must be a JSON object"]
        for name, places in sorted(placeholders(tool.config).items()):
            if name not in arguments:
                errors.append(f"{name}: required by the tool's {' and '.join(sorted(places))}")
        return errors

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        """Make the call once. ``transient`` only where the far side cannot have acted (no
        request sent) or acting twice is harmless (an idempotent tool, or a GET)."""
        call = self.call_prepare(tool, arguments, context)
        if isinstance(call, ToolResult):
            return call
        try:
            answered = request_send(call)
        except ToolError as failure:
            return call.outcome(failure=failure)
        return call.settle(answered)

    async def aexecute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        """``execute`` on an event loop: the same call, fence, limits and result; only the
        waiting differs (``request_send_async``), so a call in flight holds no thread."""
        call = self.call_prepare(tool, arguments, context)
        if isinstance(call, ToolResult):
            return call
        try:
            answered = await request_send_async(call)
        except ToolError as failure:
            return call.outcome(failure=failure)
        if len(answered.data) <= SETTLE_ON_LOOP_BYTES:
            return call.settle(answered)
        # Decoding and redacting a large body is CPU work the loop's other calls would
        # wait behind: a thread does it, and the loop goes on meanwhile.
        return await asyncio.to_thread(call.settle, answered)

    def call_prepare(
        self, tool: Tool, arguments: dict, context: ToolContext
    ) -> HttpCall | ToolResult:
        """The call ready to send, or why it cannot be (nothing is sent). No I/O."""
        config = tool.config
        # Checked here too, not only at the doors: a call must never fire on the strength
        # of a read-only class its method belies, whoever called the executor.
        problems = self.config_errors(config) + side_effect_errors(config, tool.side_effect)
        if problems:
            return ToolResult(
                ok=False, error="the tool's config is invalid: " + "; ".join(problems)
            )
        try:
            request = request_build(config, arguments, context.idempotency_key)
        except (SecretMissing, RequestInvalid) as error:
            return ToolResult(ok=False, error=str(error))
        return HttpCall(
            request=request,
            allowed_hosts=config["allowed_hosts"],
            allow_private=config.get("allow_private", False),
            max_bytes=config.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
            timeout=tool.timeout_seconds,
            repeatable=tool.idempotent or request.method in READ_METHODS,
        )


# The config ----------------------------------------------------------------------------


def side_effect_errors(config: Any, side_effect: str) -> list[str]:
    """A tool declared read-only runs without a person at every autonomy level, so only
    a request that reads may be: a method other than GET or HEAD, or a header or query
    parameter that asks the server to take the request as another method, is refused
    when saved and when called."""
    if side_effect != "read" or not isinstance(config, dict):
        return []
    method = config.get("method")
    if method not in READ_METHODS and method in METHODS:
        return [
            f"a {method} request can change what it is sent to, so the tool cannot be "
            f"read-only (only {' or '.join(READ_METHODS)} can be): declare it reversible or "
            "irreversible"
        ]
    errors = []
    headers = config.get("headers")
    for name in headers if isinstance(headers, dict) else ():
        if isinstance(name, str) and name.lower() in METHOD_OVERRIDE_HEADERS:
            errors.append(
                f"the header {name} asks the server to take the request as another method "
                "(such as DELETE), so a read-only tool may not send it: remove it, or "
                "declare the tool reversible or irreversible"
            )
    query = config.get("query")
    names = list(query) if isinstance(query, dict) else []
    url = config.get("url")
    if isinstance(url, str):
        with contextlib.suppress(ValueError):
            names += [name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    for name in dict.fromkeys(names):
        if isinstance(name, str) and name.lower() in METHOD_OVERRIDE_PARAMETERS:
            errors.append(
                f"the query parameter {name} asks the server to take the request as another "
                "method, so a read-only tool may not send it: remove it, or declare the tool "
                "reversible or irreversible"
            )
    return errors


def max_response_bytes_errors(config: dict) -> list[str]:
    """What is wrong with a config's ``max_response_bytes`` (absent: the default), the
    largest answer the tool takes. Shared by the http and MCP tools."""
    size = config.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return [f"max_response_bytes must be a positive whole number, not {size!r}"]
    if size > MAX_RESPONSE_BYTES_CEILING:
        return [f"max_response_bytes may be at most {MAX_RESPONSE_BYTES_CEILING}, not {size}"]
    return []


def allowed_hosts_errors(allowed: Any) -> list[str]:
    if not isinstance(allowed, list) or not allowed:
        return ["allowed_hosts is required: a list of the exact host names the tool may call"]
    errors = []
    for host in allowed:
        if not isinstance(host, str) or not host:
            errors.append(f"allowed_hosts: {host!r} is not a host name")
        elif any(mark in host for mark in "/@{}?#") or any(c.isspace() for c in host):
            errors.append(f"allowed_hosts: {host!r} is not a host name (no scheme, path or port)")
    return errors


def url_errors(url: Any, allowed: list) -> list[str]:
    if not isinstance(url, str) or not url:
        return ["url is required, e.g. https://api.example.com/items/{id}"]
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        return [f"url {url!r}: percent-encode spaces and other characters outside ASCII"]
    try:
        parts = urlsplit(url)
    except ValueError as error:
        return [f"url {url!r} is not a valid URL: {error}"]
    if parts.scheme not in ("http", "https"):
        return [f"url must start with http:// or https://, not {url!r}"]
    if "{" in parts.netloc or "}" in parts.netloc:
        return [
            f"url {url!r}: the host part may not hold placeholders; the host is fixed so "
            "that allowed_hosts means what it says"
        ]
    try:
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as error:
        return [f"url {url!r} is not a valid URL: {error}"]
    if "@" in parts.netloc:
        return [f"url {url!r}: credentials go in headers as secrets, not in the URL"]
    if not parts.hostname:
        return [f"url {url!r} names no host"]
    hosts = {host.lower() for host in allowed if isinstance(host, str)}
    if hosts and parts.hostname not in hosts:
        return [f"the url's host {parts.hostname} is not in allowed_hosts ({', '.join(allowed)})"]
    return []


def headers_errors(headers: Any) -> list[str]:
    if not isinstance(headers, dict):
        return ["headers must be an object of header names to string values"]
    errors = []
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            errors.append(f"headers: {name!r} is not a valid header name")
        elif name.lower() in RESERVED_HEADERS:
            errors.append(f"headers: {name} is set by the executor, not the config")
        if not isinstance(value, str):
            errors.append(f"headers {name!r}: the value must be a string")
    return errors


def placeholders(config: dict) -> dict[str, set[str]]:
    """Each argument the config's templates name, and where (url, query, headers, body)."""
    found: dict[str, set[str]] = {}

    def scan(value: Any, place: str) -> None:
        if isinstance(value, str):
            for name in ARGUMENT.findall(value):
                found.setdefault(name, set()).add(place)
        elif isinstance(value, dict):
            for item in value.values():
                scan(item, place)
        elif isinstance(value, list):
            for item in value:
                scan(item, place)

    for place in ("url", "query", "headers", "body"):
        scan(config.get(place), place)
    return found


# The request ---------------------------------------------------------------------------


def request_build(config: dict, arguments: Any, idempotency_key: str) -> HttpRequest:
    """The request the templates make from the arguments, secrets resolved. Raises
    ``SecretMissing`` or ``RequestInvalid``."""
    if not isinstance(arguments, dict):
        raise RequestInvalid("the arguments must be a JSON object")
    filler = TemplateFiller(arguments)
    parts = urlsplit(config["url"])
    path = filler.fill(parts.path or "/", quoted=True, path=True)
    query = [filler.fill(parts.query, quoted=True)] if parts.query else []
    extra = {name: filler.text(value) for name, value in config.get("query", {}).items()}
    if extra:
        query.append(urlencode(extra))
    target = path + ("?" + "&".join(query) if query else "")

    headers = {}
    for name, template in config.get("headers", {}).items():
        headers[name] = header_value(name, filler.fill(template))
    body = None
    defaults = {"Accept": "application/json", "User-Agent": "agentops-http-tool"}
    if config.get("body") is not None:
        body = json.dumps(filler.value(config["body"])).encode()
        defaults["Content-Type"] = "application/json"
    named = {name.lower() for name in headers}
    headers.update({name: value for name, value in defaults.items() if name.lower() not in named})
    headers["Idempotency-Key"] = idempotency_key
    request = HttpRequest(
        method=config["method"],
        scheme=parts.scheme,
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path=path,
        target=target,
        headers=headers,
        body=body,
        secrets=filler.secrets,
    )
    # What an HTTP client adds by itself (http.client does), named here so that the
    # request's headers are what is sent: none is added where the config set it.
    request.headers = {"Host": request.netloc, **headers}
    if "accept-encoding" not in named:
        request.headers["Accept-Encoding"] = "identity"
    if body is not None or request.method in BODY_METHODS:
        request.headers["Content-Length"] = str(len(body or b""))
    return request


def header_value(name: str, value: str) -> str:
    """A filled header value as it may be sent, or ``RequestInvalid``: no line break or
    other control character, only characters a header carries (Latin-1), and no space
    around it (not part of a value, RFC 9110 5.5; h11 refuses it, and servers drop it)."""
    if any(mark in value for mark in "\r\n\0"):
        raise RequestInvalid(f"the header {name} would hold a line break; refused")
    if CONTROL.search(value):
        raise RequestInvalid(f"the header {name} would hold a control character; refused")
    try:
        value.encode("latin-1")  # what a header value is sent as
    except UnicodeEncodeError:
        raise RequestInvalid(
            f"the header {name} would hold characters a header cannot carry"
        ) from None
    return value.strip(" \t")


class TemplateFiller:
    """Fills templates from one call's arguments, and remembers the secrets it used."""

    def __init__(self, arguments: dict) -> None:
        self.arguments = arguments
        self.secrets: dict[str, str] = {}

    def argument(self, name: str) -> Any:
        if name not in self.arguments:
            raise RequestInvalid(f"{name}: the tool's templates need this argument")
        return self.arguments[name]

    def secret(self, reference: str) -> str:
        value, used = config_resolve(reference)
        self.secrets.update(used)
        return value

    def fill(self, template: str, *, quoted: bool = False, path: bool = False) -> str:
        if template.startswith(PREFIX):
            return self.secret(template)

        def one(match: re.Match) -> str:
            if match.group(1):
                text = self.secret(match.group(0))
            else:
                text = plain_text(self.argument(match.group(2)))
                if path and text in (".", ".."):
                    raise RequestInvalid(
                        f"{match.group(2)}: {text!r} is not allowed in the URL's path"
                    )
            return quote(text, safe="") if quoted else text

        return TEMPLATE.sub(one, template)

    def text(self, template: Any) -> str:
        return self.fill(template) if isinstance(template, str) else plain_text(template)

    def value(self, template: Any) -> Any:
        """A body template filled: exact placeholders keep the argument's JSON type."""
        if isinstance(template, str):
            if template == ALL_ARGUMENTS:
                return dict(self.arguments)
            exact = ARGUMENT.fullmatch(template)
            if exact:
                return self.argument(exact.group(1))
            return self.fill(template)
        if isinstance(template, dict):
            return {key: self.value(item) for key, item in template.items()}
        if isinstance(template, list):
            return [self.value(item) for item in template]
        return template


def plain_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# The call: what both paths share (the fence, the limits, what a failure means) --------


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never 0 (a 0 timeout would make a socket non-blocking)."""
        return max(0.001, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


def host_admit(request: HttpRequest, allowed_hosts: list[str]) -> None:
    """The fence's first check, before any I/O: the host must be an allowed one."""
    if request.host not in {host.lower() for host in allowed_hosts}:
        raise ToolError(f"refused: {request.host} is not in the tool's allowed_hosts")


def addresses_judge(
    host: str, addresses: list[tuple[int, tuple]], *, allow_private: bool
) -> list[tuple[int, tuple]]:
    """``addresses`` (what ``host`` resolved to), each one checked: unless
    ``allow_private``, a host that resolves to any address that is not public is refused
    (``ToolError``, permanent). The caller connects only to these addresses, so a second
    lookup cannot answer differently (DNS rebinding)."""
    if not allow_private:
        for _, (address, *_) in addresses:
            reason = address_refusal(address)
            if reason:
                subject = host if address == host else f"{host} resolves to {address}, which"
                raise ToolError(
                    f"refused: {subject} is {reason}; this tool may reach only public "
                    "addresses (its allow_private is off)"
                )
    return addresses


def addresses_distinct(answer: list[tuple]) -> list[tuple[int, tuple]]:
    """(family, socket address) of each address in a ``getaddrinfo`` answer, once each."""
    seen, addresses = set(), []
    for family, _, _, _, sockaddr in answer:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            addresses.append((family, sockaddr))
    return addresses


def lookup_failure(
    label: str, host: str, deadline: Deadline, error: BaseException | None
) -> ToolError:
    """A lookup that failed (``error``) or did not answer in time (None). Nothing was
    sent, so trying again cannot repeat an effect."""
    if error is None:
        return ToolError(
            f"{label}: looking up {host} took longer than the {deadline.seconds:g} s allowed",
            transient=True,
        )
    return ToolError(f"{label}: could not look up {host}: {error}", transient=True)


def address_refusal(address: str) -> str:
    """Why a tool that may reach only public addresses must not reach ``address`` (a
    phrase such as "a loopback address"), or "" if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address carried in IPv6 reaches the IPv4 host: judge that one.
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    return next((reason for refused, reason in checks if refused), "")


def connect_failure(request: HttpRequest, sockaddr: tuple, error: OSError) -> str:
    """What connecting to one checked address met, as the final message lists it. A
    certificate or TLS failure ends the call (``ToolError``, permanent): the next address
    of the same name would present the same certificate."""
    if isinstance(error, ssl.SSLCertVerificationError):
        raise ToolError(
            f"{request.label}: the server's TLS certificate was refused: "
            f"{error.verify_message or error}"
        ) from None
    if isinstance(error, ssl.SSLError):
        raise ToolError(f"{request.label}: the TLS handshake failed: {error}") from None
    if isinstance(error, TimeoutError):
        return f"{sockaddr[0]}: no answer"
    # By the error number: asyncio's connect puts the address in place of strerror.
    return f"{sockaddr[0]}: {os.strerror(error.errno) if error.errno else error}"


def connect_refused(request: HttpRequest, failures: list[str]) -> ToolError:
    """No checked address answered. Nothing was sent, so this is safe to retry."""
    return ToolError(
        f"{request.label}: could not connect ({'; '.join(failures)}); nothing was sent",
        transient=True,
    )


def exchange_failure(
    request: HttpRequest, error: BaseException, deadline: Deadline, repeatable: bool
) -> ToolError:
    """The exchange broke off (``error``: the socket's, or the HTTP parser's). Once
    anything is sent the far side may have acted, so it is transient only if the call is
    ``repeatable``."""
    effect = "" if repeatable else "; it may have had an effect"
    if deadline.passed or isinstance(error, TimeoutError):
        return ToolError(
            f"{request.label} timed out after {deadline.seconds:g} s (the tool's "
            f"timeout_seconds){effect}",
            transient=repeatable,
        )
    return ToolError(
        f"{request.label}: the connection failed after the request was sent "
        f"({type(error).__name__}: {error}){effect}",
        transient=repeatable,
    )


def body_limit(answer: HttpAnswer, max_bytes: int) -> int:
    """How much of the body to read. Of an answer that is not a success only an excerpt
    is kept: a large error page is not a reason to lose the status (and with it, a retry)."""
    return max_bytes if answer.success else min(max_bytes, ERROR_BODY_BYTES)


def response_judge(
    request: HttpRequest,
    answer: HttpAnswer,
    data: bytes,
    cut: bool,
    repeatable: bool,
    *,
    max_bytes: int,
) -> dict:
    """``{status, headers, body}`` for a 2xx answer read whole; ``ToolError`` for any
    other. ``cut``: the body was longer than the ``body_limit`` read."""
    status = answer.status
    if cut and answer.success:
        raise ToolError(f"{request.label}: the response was larger than {max_bytes} bytes; cut off")
    headers = {
        name: answer.header(name) for name in KEPT_HEADERS if answer.header(name) is not None
    }
    body = body_decode(answer, data)
    if answer.success:
        return {"status": status, "headers": headers, "body": body}
    said = f"{request.label} answered {status} {answer.reason}".rstrip()
    if 300 <= status < 400:
        raise ToolError(
            f"{said}, a redirect to {headers.get('location', '(no Location)')}; redirects are "
            "not followed, so a call cannot leave the allowed hosts"
        )
    # Redacted before it is cut: a secret straddling the cut would otherwise be stored
    # half shown. ``cut``: the body itself was cut at ERROR_BODY_BYTES.
    excerpt = excerpt_redacted(
        body if isinstance(body, str) else json.dumps(body, ensure_ascii=False),
        request.secrets,
        limit=EXCERPT_CHARS,
        cut=cut,
    )
    message = f"{said}: {excerpt}" if excerpt else said
    if status == 429 or status >= 500:
        if not repeatable and status >= 500:
            message += " (not retried: the call may have had an effect)"
        raise ToolError(message, transient=repeatable)
    raise ToolError(message)


def body_decode(answer: HttpAnswer, data: bytes) -> Any:
    """JSON as its value, text as a string, anything else described, not shown."""
    mime = answer.headers.get_content_type()
    textual = (
        mime.startswith("text/")
        or mime.endswith(("+json", "+xml", "/json", "/xml", "/javascript"))
        or mime == "application/x-www-form-urlencoded"
    )
    if not textual:
        return f"[{len(data)} bytes of {mime}, not shown]"
    charset = answer.headers.get_content_charset() or "utf-8"
    try:
        text = data.decode(charset, errors="replace")
    except LookupError:
        text = data.decode("utf-8", errors="replace")
    if mime.endswith(("/json", "+json")):
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text  # labelled JSON but not: the text still tells the model something
    return text


# Address lookups: both paths' ------------------------------------------------------------


class Lookups:
    """The address lookups of both paths. The system resolver has no timeout we can set,
    so each lookup runs on a thread of its own that a call can stop waiting for; and the
    lookups of one host and port in flight at once are one lookup, whose answer each call
    waits for up to its own deadline. A resolver that never answers (a blackholed DNS
    server) then holds one thread per name it is asked, however many calls ask, until
    the system resolver gives up (its own timeouts and attempts); and there is no pool
    for hung lookups to fill, so other names' lookups start at once. (Not the loop's
    ``getaddrinfo``: it runs in the loop's default executor, a pool shared with
    ``asyncio.to_thread``, which as many hung lookups as it has threads would fill,
    leaving every other call's lookup queued past its timeout.) Nothing is cached: the
    next call after an answer looks up afresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight: dict[tuple[str, int], Future] = {}

    def start(self, host: str, port: int) -> Future:
        """The lookup of ``host`` and ``port`` in flight, or a new one."""
        key = (host, port)
        with self.lock:
            lookup = self.in_flight.get(key)
            if lookup is None:
                lookup = self.in_flight[key] = Future()
                # Running: a waiter that gives up (an asyncio wrapper cancelled at its
                # deadline) cannot cancel the lookup the other waiters share.
                lookup.set_running_or_notify_cancel()
                threading.Thread(
                    target=self.run, args=(key, lookup), daemon=True, name="http-tool-resolve"
                ).start()
        return lookup

    def run(self, key: tuple[str, int], lookup: Future) -> None:
        try:
            lookup.set_result(socket.getaddrinfo(*key, type=socket.SOCK_STREAM))
        except Exception as error:  # each waiting call judges it (lookup_judge)
            lookup.set_exception(error)
        finally:
            with self.lock:
                del self.in_flight[key]


LOOKUPS = Lookups()


def addresses_checked(
    host: str, port: int, *, label: str, allow_private: bool, deadline: Deadline
) -> list[tuple[int, tuple]]:
    """Every (family, socket address) ``host`` resolves to, each one checked
    (``addresses_judge``). ``label`` names the call in messages. Shared by the http tool
    and the MCP http transport."""
    addresses = host_resolve(host, port, label=label, deadline=deadline)
    return addresses_judge(host, addresses, allow_private=allow_private)


def host_resolve(
    host: str, port: int, *, label: str, deadline: Deadline
) -> list[tuple[int, tuple]]:
    """Every (family, socket address) the host resolves to, within the deadline
    (``Lookups``), blocking this thread."""
    lookup = LOOKUPS.start(host, port)
    futures.wait([lookup], timeout=deadline.remaining())
    return lookup_judge(lookup, host, label=label, deadline=deadline)


async def addresses_checked_async(
    host: str, port: int, *, label: str, allow_private: bool, deadline: Deadline
) -> list[tuple[int, tuple]]:
    """``addresses_checked``, awaited. Shared by the http tool and the MCP http transport."""
    addresses = await host_resolve_async(host, port, label=label, deadline=deadline)
    return addresses_judge(host, addresses, allow_private=allow_private)


async def host_resolve_async(
    host: str, port: int, *, label: str, deadline: Deadline
) -> list[tuple[int, tuple]]:
    """``host_resolve``, awaited: the loop waits, no thread of its own does."""
    lookup = LOOKUPS.start(host, port)
    # Judged below, as on the other path (TimeoutError is an OSError); the wrapper is this
    # call's own, so cancelling it at the deadline leaves the lookup to the other calls.
    with contextlib.suppress(OSError, UnicodeError):
        async with asyncio.timeout(deadline.remaining()):
            await asyncio.wrap_future(lookup)
    return lookup_judge(lookup, host, label=label, deadline=deadline)


def lookup_judge(
    lookup: Future, host: str, *, label: str, deadline: Deadline
) -> list[tuple[int, tuple]]:
    """The addresses a lookup found, or ``ToolError``: it failed, or it has not answered
    by the deadline."""
    if not lookup.done():
        raise lookup_failure(label, host, deadline, None)
    try:
        return addresses_distinct(lookup.result())
    except (OSError, UnicodeError) as error:
        raise lookup_failure(label, host, deadline, error) from None


# Reading the answer: both paths', whichever receives the bytes ----------------------------


class AnswerReading:
    """One response, read from the bytes the server sends as either path receives them:
    h11 parses them and this keeps the limits, so both paths cut off the same answers with
    the same words. Past the body's limit, reading stops (``Answered.cut``). Past
    ``wire_limit`` bytes as sent (tiny chunks, long chunk extensions, headers and
    trailers all count) or ``MAX_INFORMATIONAL`` informational responses, the call ends
    (``ToolError``): a server that sends those is stalling, not answering. ``feed``
    raises ``h11.RemoteProtocolError`` for what is not HTTP."""

    def __init__(self, call: HttpCall, protocol: h11.Connection) -> None:
        self.call = call
        self.protocol = protocol
        self.wire_limit = wire_limit(call.max_bytes)
        self.received = 0
        self.informational = 0
        self.answer: HttpAnswer | None = None
        self.limit = 0  # of the body, once the status is known (body_limit)
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        """Take what one read returned (b"": the server closed the connection), and every
        event it completes."""
        self.received += len(data)
        if self.received > self.wire_limit:
            raise self.refusal(
                f"the response took more than {self.wire_limit} bytes as sent (status lines, "
                "headers and chunk framing count)"
            )
        self.protocol.receive_data(data)
        while not self.done:
            event = self.protocol.next_event()
            if event is h11.NEED_DATA:
                return
            self.event_take(event)

    def event_take(self, event: Any) -> None:
        if isinstance(event, h11.InformationalResponse):  # 100 Continue, 103 Early Hints
            self.informational += 1
            if self.informational > MAX_INFORMATIONAL:
                raise self.refusal(
                    f"the server sent more than {MAX_INFORMATIONAL} informational (1xx) "
                    "responses and no answer"
                )
        elif isinstance(event, h11.Response):
            self.answer = answer_of(event)
            self.limit = body_limit(self.answer, self.call.max_bytes)
        elif isinstance(event, h11.Data):
            self.chunks.append(event.data)
            self.size += len(event.data)
            self.done = self.size > self.limit
        elif isinstance(event, h11.EndOfMessage):
            self.done = True
        else:
            raise h11.RemoteProtocolError(f"expected a response, not {event!r}")

    def refusal(self, why: str) -> ToolError:
        """A limit passed: permanent, as the same server would do it again; the request
        was sent, so unless the call is repeatable it may have had an effect."""
        effect = "" if self.call.repeatable else "; it may have had an effect"
        return ToolError(f"{self.call.request.label}: {why}; cut off{effect}")

    def answered(self) -> Answered:
        """What was read: the answer, at most the body's limit, and whether it went on."""
        data = b"".join(self.chunks)[: self.limit]
        return Answered(self.answer, data, self.size > self.limit)


def wire_limit(max_bytes: int) -> int:
    """The most bytes a response may take as sent: twice the body's limit (an honest
    server's chunk framing adds a few bytes a chunk), and a head's worth
    (``MAX_HEAD_BYTES``) for each informational response, the answer's own and its
    trailers."""
    return 2 * max_bytes + (MAX_INFORMATIONAL + 2) * MAX_HEAD_BYTES


def answer_of(event: h11.Response) -> HttpAnswer:
    """The status line and headers h11 read."""
    headers = http.client.HTTPMessage()
    for name, value in event.headers:
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return HttpAnswer(
        status=event.status_code, reason=event.reason.decode("latin-1"), headers=headers
    )


def h11_request(request: HttpRequest) -> tuple[h11.Connection, bytes]:
    """The request as h11 writes it (with the client state to read the answer), made
    before anything is connected: both paths send these bytes. ``request_build`` has made
    every header sendable; should h11 still refuse one, nothing has been sent."""
    protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        head = protocol.send(
            h11.Request(
                method=request.method,
                target=request.target.encode("ascii"),
                headers=[
                    (name.encode("latin-1"), value.encode("latin-1"))
                    for name, value in request.headers.items()
                ],
            )
        )
        if request.body:
            head += protocol.send(h11.Data(data=request.body))
        head += protocol.send(h11.EndOfMessage())
    except h11.LocalProtocolError as error:
        raise ToolError(f"{request.label}: the request cannot be sent: {error}") from None
    return protocol, head


# Blocking I/O: execute's, on the calling thread -----------------------------------------


def request_send(call: HttpCall) -> Answered:
    """Make the request within ``call.timeout`` seconds and return what the server
    answered (``HttpCall.settle`` judges it); raise ``ToolError`` if it did not answer."""
    request = call.request
    host_admit(request, call.allowed_hosts)
    deadline = Deadline(call.timeout)
    addresses = addresses_checked(
        request.host,
        request.port,
        label=request.label,
        allow_private=call.allow_private,
        deadline=deadline,
    )
    protocol, head = h11_request(request)
    sock = connection_open(request, addresses, deadline)
    try:
        with Watchdog(sock, deadline):
            return exchange(sock, AnswerReading(call, protocol), head, deadline)
    except (OSError, h11.ProtocolError) as error:
        raise exchange_failure(request, error, deadline, call.repeatable) from None
    finally:
        sock.close()


def connection_open(
    request: HttpRequest, addresses: list[tuple[int, tuple]], deadline: Deadline
) -> socket.socket:
    """A socket connected to the first checked address that answers, so the name is not
    looked up again between the check and the connect; under TLS, the certificate check
    uses the host name. Nothing is sent yet, so every failure here but a bad certificate
    is safe to retry."""
    tls = ssl.create_default_context() if request.scheme == "https" else None
    failures = []
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is None:
                return sock
            return tls.wrap_socket(sock, server_hostname=request.host)
        except OSError as error:
            sock.close()
            failures.append(connect_failure(request, sockaddr, error))
        except BaseException:
            sock.close()
            raise
        if deadline.passed:
            break
    raise connect_refused(request, failures)


class Watchdog:
    """Ends the exchange at the deadline: a socket timeout bounds each read, not the sum
    of them, so a server that trickles its answer could otherwise hold the call."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self.sock = sock
        self.timer = threading.Timer(deadline.remaining(), self.expire)
        self.timer.daemon = True

    def expire(self) -> None:
        # The plain socket's shutdown, also under TLS: it wakes a blocked read without
        # touching the TLS object the reading thread is using.
        with contextlib.suppress(OSError):  # already closed
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def exchange(
    sock: socket.socket, reading: AnswerReading, head: bytes, deadline: Deadline
) -> Answered:
    """Send the request and read the answer (``AnswerReading``)."""
    sock.settimeout(deadline.remaining())
    sock.sendall(head)
    while not reading.done:
        sock.settimeout(deadline.remaining())
        data = sock.recv(READ_CHUNK)
        if deadline.passed:
            # The watchdog shut the socket (an end of the stream that is not the server's),
            # or the server is still sending: either way the call is out of time.
            raise TimeoutError
        reading.feed(data)
    return reading.answered()


# On the event loop: aexecute's I/O, which holds no thread while it waits ---------------
#
# The same steps as above, each awaited: the lookup (``Lookups``), a socket connected to
# the checked address with ``sock_connect`` and wrapped in a stream (TLS with the host's
# name), the same bytes sent and the same reading of the answer. One ``asyncio.timeout``
# bounds the exchange as the Watchdog does above.


async def request_send_async(call: HttpCall) -> Answered:
    """``request_send``, awaited on the running loop."""
    request = call.request
    host_admit(request, call.allowed_hosts)
    deadline = Deadline(call.timeout)
    addresses = await addresses_checked_async(
        request.host,
        request.port,
        label=request.label,
        allow_private=call.allow_private,
        deadline=deadline,
    )
    protocol, head = h11_request(request)
    reader, writer = await connection_open_async(request, addresses, deadline)
    try:
        async with asyncio.timeout(deadline.remaining()):
            return await exchange_async(reader, writer, AnswerReading(call, protocol), head)
    except (OSError, h11.ProtocolError) as error:
        raise exchange_failure(request, error, deadline, call.repeatable) from None
    finally:
        writer.transport.abort()  # nothing more to say to it, as close() on the other path


async def connection_open_async(
    request: HttpRequest, addresses: list[tuple[int, tuple]], deadline: Deadline
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``connection_open``, awaited: the same addresses in the same order, the same
    failures."""
    # Making a TLS context reads the system's trust store: a thread's work, not the loop's.
    tls = await asyncio.to_thread(ssl.create_default_context) if request.scheme == "https" else None
    loop = asyncio.get_running_loop()
    failures = []
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(deadline.remaining()):
                await loop.sock_connect(sock, sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return await asyncio.open_connection(
                    sock=sock,
                    ssl=tls,
                    server_hostname=request.host if tls is not None else None,
                    limit=READ_CHUNK,
                )
        except OSError as error:
            sock.close()
            failures.append(connect_failure(request, sockaddr, error))
        except BaseException:
            sock.close()
            raise
        if deadline.passed:
            break
    raise connect_refused(request, failures)


async def exchange_async(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    reading: AnswerReading,
    head: bytes,
) -> Answered:
    """``exchange``, awaited, a little at a time."""
    writer.write(head)
    await writer.drain()
    while not reading.done:
        reading.feed(await reader.read(LOOP_READ_BYTES))
        # A read the stream's buffer can serve returns without waiting: without this, a
        # server that keeps the buffer full (a flood of tiny chunks) would hold the loop,
        # and every other call on it, for as long as it went on sending.
        await asyncio.sleep(0)
    return reading.answered()


def secrets_redact(result: ToolResult, secrets: dict[str, str]) -> ToolResult:
    """The result with every secret the call used, in any of its usual encodings,
    replaced by ``[secret:NAME]``. The engine redacts results too, but it records a
    transient error in its retry notes before that."""
    return ToolResult(
        ok=result.ok,
        value=redact(result.value, secrets),
        error=redact(result.error, secrets),
        transient=result.transient,
    )
