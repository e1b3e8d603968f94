"""HTTP tools, against a real HTTP service (tests/peers/http_service.py) each test starts on
127.0.0.1: the request the templates make, the SSRF guard, the limits, how failures are
classed for retry, and the redaction of secrets through the engine."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentops.runtime.engine import Outcome
from agentops.runtime.tools import ToolContext, executor_for_kind
from agentops.runtime.tools.http import HttpExecutor, address_refusal, side_effect_errors
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Step, StepStatus, Tool
from tasks.services import run_start
from tests.conftest import require, run_coroutine, run_until_rest
from tests.peers.http_service import HttpService

SECRET = "tok-7f3a9c51e2"
ITEM_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "term": {"type": "string"}},
    "required": ["id"],
    "additionalProperties": False,
}
EXECUTOR = HttpExecutor()


def http_tool(url: str, *, save: bool = False, **fields) -> Tool:
    """An http tool on the local service (so allow_private), with config keys given as
    ``config_<key>`` overriding the defaults."""
    config = {
        "method": "GET",
        "url": url,
        "allowed_hosts": ["127.0.0.1"],
        "allow_private": True,
    }
    for key in [key for key in fields if key.startswith("config_")]:
        config[key.removeprefix("config_")] = fields.pop(key)
    # Only a method that reads may be read-only (side_effect_errors).
    fields.setdefault(
        "side_effect", "read" if config["method"] in ("GET", "HEAD") else "reversible"
    )
    tool = Tool(
        **{
            "name": f"http_{uuid.uuid4().hex[:8]}",
            "kind": Tool.Kind.HTTP,
            "side_effect": "read",
            "input_schema": {"type": "object"},
            "timeout_seconds": 5.0,
            "retry_backoff_seconds": 0.0,  # retries in the tests need not wait
            "config": config,
            **fields,
        }
    )
    if save:
        tool.save()
    return tool


@pytest.fixture(params=["execute", "aexecute"])
def call(request):
    """One call of the executor, made both ways: ``execute`` (blocking) and ``aexecute``
    (awaited on an event loop, as the async worker makes it). Every test that calls
    the tool passes both ways."""

    def make(tool: Tool, arguments: dict | None = None, *, key: str = "run-1:3"):
        context = ToolContext(run_id=uuid.uuid4(), step_number=3, idempotency_key=key)
        if request.param == "execute":
            return EXECUTOR.execute(tool, arguments or {}, context)
        return run_coroutine(EXECUTOR.aexecute(tool, arguments or {}, context))

    return make


@pytest.fixture
def service():
    with HttpService() as running:
        yield running


# The request -------------------------------------------------------------------------


def test_the_http_kind_is_served_by_this_executor():
    assert isinstance(executor_for_kind("http"), HttpExecutor)


def test_a_get_fills_the_url_and_query_and_sends_the_idempotency_key(service, call):
    tool = http_tool(
        service.url + "/items/{id}",
        input_schema=ITEM_SCHEMA,
        config_query={"q": "{term}", "limit": 5},
    )
    result = call(tool, {"id": "inv 7/a", "term": "late & unpaid"}, key="run-9:4")

    assert result.ok, result.error
    assert result.value["status"] == 200
    assert result.value["headers"]["content-type"] == "application/json"
    # The placeholder is quoted whole: a "/" in an argument cannot add a path segment.
    assert result.value["body"]["id"] == "inv%207%2Fa"
    assert result.value["body"]["query"] == {"q": ["late & unpaid"], "limit": ["5"]}
    [received] = service.received()
    assert received.method == "GET" and received.path == "/items/inv%207%2Fa"
    assert received.headers["idempotency-key"] == "run-9:4"
    assert received.headers["host"] == f"127.0.0.1:{service.port}"


def test_a_post_sends_its_body_template_and_the_secret_header(service, monkeypatch, call):
    monkeypatch.setenv("HTTP_TEST_TOKEN", SECRET)
    tool = http_tool(
        service.url + "/items/{id}",
        config_method="POST",
        config_headers={"Authorization": "Bearer {secret:HTTP_TEST_TOKEN}"},
        config_body={
            "id": "{id}",
            "count": "{count}",
            "note": "about {id}",
            "all": "$arguments",
            "fixed": [1, True, None],
        },
    )
    result = call(tool, {"id": "x-1", "count": 2, "tags": ["a"]})

    assert result.ok, result.error
    [received] = service.received()
    assert received.method == "POST"
    assert received.headers["authorization"] == f"Bearer {SECRET}"
    assert received.headers["content-type"] == "application/json"
    assert received.json() == {
        "id": "x-1",
        "count": 2,  # an exact placeholder keeps the argument's JSON type
        "note": "about x-1",
        "all": {"id": "x-1", "count": 2, "tags": ["a"]},
        "fixed": [1, True, None],
    }


def test_an_argument_cannot_name_a_secret_to_be_resolved(service, monkeypatch, call):
    monkeypatch.setenv("HTTP_TEST_TOKEN", SECRET)
    tool = http_tool(
        service.url + "/items/{id}",
        config_method="POST",
        config_query={"q": "{id}"},
        config_body={"note": "see {id}"},
    )
    result = call(tool, {"id": "{secret:HTTP_TEST_TOKEN}"})

    assert result.ok, result.error
    [received] = service.received()
    assert received.json() == {"note": "see {secret:HTTP_TEST_TOKEN}"}
    assert received.query["q"] == ["{secret:HTTP_TEST_TOKEN}"]
    assert SECRET.encode() not in received.body


def test_a_dot_dot_argument_cannot_climb_the_url_path(service, call):
    tool = http_tool(service.url + "/items/{id}/notes")
    result = call(tool, {"id": ".."})
    assert not result.ok and not result.transient
    assert "id: '..' is not allowed in the URL's path" in result.error
    assert service.hits() == 0


def test_config_headers_replace_the_defaults_and_bad_header_values_are_refused(service, call):
    tool = http_tool(
        service.url + "/items/1", config_headers={"accept": "text/plain", "X-Note": "{note}"}
    )
    assert call(tool, {"note": "plain"}).ok
    received = service.received()[0]
    assert received.headers["accept"] == "text/plain" and received.headers["x-note"] == "plain"

    for note, problem in [
        ("a\r\nX-Evil: 1", "a line break"),
        ("☃", "characters a header cannot carry"),
    ]:
        result = call(tool, {"note": note})
        assert not result.ok and not result.transient
        assert f"the header X-Note would hold {problem}" in result.error
    assert service.hits() == 1


def test_a_text_response_is_returned_as_text(service, call):
    result = call(http_tool(service.url + "/text"))
    assert result.ok
    assert result.value["body"] == "héllo"
    assert result.value["headers"]["content-type"] == "text/plain; charset=utf-8"


# Validation and config -------------------------------------------------------------------


def test_validate_names_schema_errors_and_missing_placeholders(service):
    tool = http_tool(
        service.url + "/items/{id}",
        config_method="POST",
        config_query={"q": "{term}"},
        config_body={"amount": "{amount}"},
        input_schema={"type": "object", "properties": {"id": {"type": "string"}}},
    )
    assert EXECUTOR.validate(tool, {"id": "1", "term": "t", "amount": 3}) == []
    errors = EXECUTOR.validate(tool, {"id": 7})
    assert errors == [
        "id: 7 is not of type 'string'",
        "amount: required by the tool's body",
        "term: required by the tool's query",
    ]


def test_validate_reports_a_broken_config(service):
    tool = http_tool(service.url + "/items/1", config_method="FETCH")
    [error] = EXECUTOR.validate(tool, {})
    assert error.startswith("the tool's config is invalid: method must be one of GET")


GOOD_CONFIG = {
    "method": "POST",
    "url": "https://api.example.com/items/{id}?v=2",
    "headers": {"Authorization": "Bearer {secret:API_TOKEN}"},
    "query": {"q": "{term}"},
    "body": {"id": "{id}"},
    "allowed_hosts": ["api.example.com"],
    "allow_private": False,
    "max_response_bytes": 1000,
}


def test_a_good_config_has_no_errors():
    assert EXECUTOR.config_errors(GOOD_CONFIG) == []
    minimal = {
        "method": "GET",
        "url": "http://api.example.com/",
        "allowed_hosts": ["api.example.com"],
    }
    assert EXECUTOR.config_errors(minimal) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"method": "FETCH"},
            "method must be one of GET, HEAD, POST, PUT, PATCH, DELETE, not 'FETCH'",
        ),
        ({"method": None}, "method must be one of GET, HEAD, POST, PUT, PATCH, DELETE, not None"),
        ({"url": "ftp://api.example.com/x"}, "url must start with http:// or https://"),
        ({"url": None}, "url is required"),
        (
            {"url": "https://{tenant}.example.com/x"},
            "the host part may not hold placeholders",
        ),
        ({"url": "https://api.example.com:{port}/x"}, "the host part may not hold placeholders"),
        ({"url": "https://user:pw@api.example.com/x"}, "credentials go in headers"),
        ({"url": "https://api.example.com:99999/x"}, "is not a valid URL"),
        ({"url": "https://other.example.com/x"}, "the url's host other.example.com is not in"),
        ({"allowed_hosts": []}, "allowed_hosts is required"),
        ({"allowed_hosts": None}, "allowed_hosts is required"),
        ({"allowed_hosts": ["https://api.example.com"]}, "is not a host name"),
        ({"max_response_bytes": 0}, "max_response_bytes must be a positive whole number, not 0"),
        ({"max_response_bytes": "1000"}, "max_response_bytes must be a positive whole number"),
        ({"max_response_bytes": True}, "max_response_bytes must be a positive whole number"),
        ({"max_response_bytes": 10**9}, "max_response_bytes may be at most"),
        ({"allow_private": "yes"}, "allow_private must be true or false"),
        ({"headers": {"Host": "internal"}}, "headers: Host is set by the executor"),
        ({"headers": {"Bad Name": "x"}}, "'Bad Name' is not a valid header name"),
        ({"headers": {"X-N": 3}}, "headers 'X-N': the value must be a string"),
        ({"headers": ["x"]}, "headers must be an object"),
        ({"query": {"q": {"a": 1}}}, "query 'q': the value must be a string or a number"),
        ({"method": "GET"}, "a GET request has no body"),
        ({"timeout": 3, "retries": 1}, "unknown config keys: retries, timeout"),
    ],
)
def test_config_errors_name_each_problem(change, expected):
    errors = EXECUTOR.config_errors({**GOOD_CONFIG, **change})
    assert any(expected in error for error in errors), errors


def test_config_errors_name_every_problem_at_once():
    errors = EXECUTOR.config_errors({"method": "FETCH", "url": "ftp://x", "extra": 1})
    assert len(errors) == 4  # unknown key, method, allowed_hosts, url
    assert EXECUTOR.config_errors([]) == ["the config must be a JSON object"]


def test_a_missing_secret_is_an_error_and_nothing_is_sent(service, monkeypatch, call):
    monkeypatch.delenv("HTTP_TEST_MISSING", raising=False)
    tool = http_tool(
        service.url + "/items/1", config_headers={"X-Api-Key": "secret:HTTP_TEST_MISSING"}
    )
    result = call(tool)
    assert not result.ok and not result.transient
    assert result.error == "the secret HTTP_TEST_MISSING is not set in the worker's environment"
    assert service.hits() == 0


# The SSRF guard ------------------------------------------------------------------------


def test_a_host_not_in_allowed_hosts_is_refused(service, call):
    tool = http_tool(service.url + "/items/1", config_allowed_hosts=["api.example.com"])
    result = call(tool)
    assert not result.ok and not result.transient
    assert "the url's host 127.0.0.1 is not in allowed_hosts (api.example.com)" in result.error
    assert service.hits() == 0


def test_loopback_is_refused_without_allow_private(service, call):
    result = call(http_tool(service.url + "/items/1", config_allow_private=False))
    assert not result.ok and not result.transient
    assert result.error.startswith("refused: 127.0.0.1 is a loopback address")
    assert "allow_private" in result.error
    assert service.hits() == 0


def test_a_name_is_judged_by_the_addresses_it_resolves_to(service, call):
    tool = http_tool(
        f"http://localhost:{service.port}/items/1",
        config_allowed_hosts=["localhost"],
        config_allow_private=False,
    )
    result = call(tool)
    assert not result.ok and not result.transient
    assert result.error.startswith("refused: localhost resolves to ")
    assert "127.0.0.1" in result.error or "::1" in result.error
    assert "which is a loopback address" in result.error
    assert service.hits() == 0


def test_the_connection_goes_to_the_address_that_was_checked(service, monkeypatch, call):
    """DNS rebinding: the name is looked up once, checked, and connected to at that
    address. Later lookups of the name here answer 127.0.0.2, where nothing listens; the
    call still reaches the service, and the name was looked up once. (getaddrinfo stands
    in for a resolver that changes its answer between lookups.)"""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host == "localhost":
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    tool = http_tool(f"http://localhost:{service.port}/items/1", config_allowed_hosts=["localhost"])

    result = call(tool)

    assert result.ok, result.error
    assert lookups == ["localhost"]
    assert service.received()[0].headers["host"] == f"localhost:{service.port}"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("192.168.0.10", "a private address"),
        ("172.16.5.4", "a private address"),
        ("fd00::1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata
        ("fe80::1%eth0", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("240.0.0.1", "a private address"),  # reserved, and listed as private too
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "a loopback address"),  # IPv4 in IPv6
        ("64:ff9b::a00:1", "a private address"),  # NAT64 of 10.0.0.1
        ("93.184.215.14", ""),
        ("2606:4700::1111", ""),
    ],
)
def test_address_refusal_names_the_kind_of_address(address, reason):
    assert address_refusal(address) == reason


# Limits ------------------------------------------------------------------------------


def test_a_slow_answer_hits_the_timeout_and_a_get_may_be_retried(service, call):
    tool = http_tool(service.url + "/slow/10", timeout_seconds=0.5)
    started = time.monotonic()
    result = call(tool)
    assert time.monotonic() - started < 2.0
    assert not result.ok and result.transient
    assert "timed out after 0.5 s" in result.error


def test_a_timed_out_post_on_a_tool_without_idempotency_is_not_retried(service, call):
    tool = http_tool(service.url + "/slow/10", timeout_seconds=0.5, config_method="POST")
    started = time.monotonic()
    result = call(tool)
    assert time.monotonic() - started < 2.0
    assert not result.ok and not result.transient
    assert "timed out after 0.5 s" in result.error and "may have had an effect" in result.error


@pytest.mark.parametrize("path", ["/trickle/10", "/drip-headers/10"])
def test_the_timeout_bounds_the_whole_read_not_each_piece(service, path, call):
    # Every byte comes well within the timeout; the whole answer does not.
    tool = http_tool(service.url + path, timeout_seconds=0.5)
    started = time.monotonic()
    result = call(tool)
    assert time.monotonic() - started < 1.5
    assert not result.ok and result.transient
    assert "timed out after 0.5 s" in result.error


@pytest.mark.parametrize("path", ["/big/5000", "/big-stream/5000"])
def test_an_oversized_response_is_cut_off(service, path, call):
    result = call(http_tool(service.url + path, config_max_response_bytes=1000))
    assert not result.ok and not result.transient
    assert result.error.endswith("the response was larger than 1000 bytes; cut off")


def test_a_response_of_exactly_the_limit_is_whole(service, call):
    result = call(http_tool(service.url + "/big-stream/1000", config_max_response_bytes=1000))
    assert result.ok and result.value["body"] == "x" * 1000


def test_a_large_response_within_the_limit_is_whole(service, call):
    # Past SETTLE_ON_LOOP_BYTES, aexecute decodes it in a thread: the same result.
    tool = http_tool(service.url + "/big/600000", config_max_response_bytes=1_000_000)
    result = call(tool)
    assert result.ok and result.value["body"] == "x" * 600_000


def test_a_redirect_is_not_followed(service, call):
    result = call(http_tool(service.url + "/redirect"))
    assert not result.ok and not result.transient
    assert "answered 302 Found, a redirect to /items/moved" in result.error
    assert service.hits("/items/moved") == 0


@contextlib.contextmanager
def redirector(location: str):
    """A server on 127.0.0.1 that answers every request with a 302 to ``location``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_redirect_to_another_private_address_is_not_followed(service, call):
    # The service stands for what a redirect must not reach (an internal address).
    with redirector(f"{service.url}/items/internal") as url:
        result = call(http_tool(url + "/start"))
    assert not result.ok and not result.transient
    assert (
        f"answered 302 Found, a redirect to {service.url}/items/internal; redirects are "
        "not followed"
    ) in result.error
    assert service.hits() == 0


# Failures and retry ----------------------------------------------------------------------


def test_a_client_error_names_the_status_and_the_body_and_is_final(service, call):
    result = call(http_tool(service.url + "/nowhere"))
    assert not result.ok and not result.transient
    assert f"GET {service.url}/nowhere answered 404 Not Found" in result.error
    assert '"no route /nowhere"' in result.error


@pytest.mark.parametrize(
    ("method", "idempotency", "transient"),
    [("GET", "none", True), ("POST", "key", True), ("POST", "none", False)],
)
@pytest.mark.parametrize("status", [429, 503])
def test_busy_and_server_errors_are_transient_only_when_a_repeat_is_harmless(
    service, method, idempotency, transient, status, call
):
    tool = http_tool(
        service.url + f"/status/{status}", config_method=method, idempotency=idempotency
    )
    result = call(tool)
    assert not result.ok and result.transient is transient
    assert f"answered {status}" in result.error


def test_a_large_error_page_keeps_its_status_and_its_retry(service, call):
    tool = http_tool(service.url + "/status/503?pad=50000", config_max_response_bytes=1000)
    result = call(tool)
    assert not result.ok and result.transient
    assert "answered 503 Service Unavailable" in result.error and "cut off" not in result.error


def test_a_refused_connection_is_transient_because_nothing_was_sent(call):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tool = http_tool(f"http://127.0.0.1:{port}/items/1", config_method="POST")
    result = call(tool)
    assert not result.ok and result.transient
    assert "could not connect" in result.error and "nothing was sent" in result.error


# Through the engine ------------------------------------------------------------------


def http_run(make_task, operator, tool: Tool, arguments: dict) -> Run:
    task = make_task(
        [{"content": "call it", "calls": [(tool.name, arguments)]}, {"content": "done"}],
        tools=[tool.name],
        autonomy_level=3,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    return run


def payloads(run: Run) -> str:
    return json.dumps(
        list(LineageEvent.objects.filter(run_uuid=run.pk).values_list("payload", flat=True))
    )


@pytest.mark.django_db
def test_an_echoed_secret_is_redacted_from_the_step_and_the_trail(
    make_task, operator, service, monkeypatch
):
    monkeypatch.setenv("HTTP_TEST_TOKEN", SECRET)
    tool = http_tool(
        service.url + "/echo-headers",
        save=True,
        config_headers={"Authorization": "Bearer {secret:HTTP_TEST_TOKEN}"},
    )
    run = http_run(make_task, operator, tool, {})

    assert run.status == RunStatus.SUCCEEDED
    step: Step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    # The service did get the secret; the record only names it.
    assert service.received()[0].headers["authorization"] == f"Bearer {SECRET}"
    assert step.result["body"] == {
        "authorization": "Bearer [secret:HTTP_TEST_TOKEN]",
        "idempotency_key": step.idempotency_key,
    }
    succeeded = LineageEvent.objects.get(run_uuid=run.pk, kind="tool.succeeded")
    assert succeeded.payload["result"]["body"]["authorization"] == "Bearer [secret:HTTP_TEST_TOKEN]"
    assert SECRET not in payloads(run)
    assert SECRET not in json.dumps(list(run.steps.values_list("result", "error", "content")))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "idempotency", "attempts"),
    [("POST", "key", 3), ("GET", "none", 3), ("POST", "none", 1)],
)
def test_a_server_error_is_retried_with_the_same_key_only_when_a_repeat_is_harmless(
    make_task, operator, service, monkeypatch, method, idempotency, attempts
):
    monkeypatch.setenv("HTTP_TEST_TOKEN", SECRET)
    tool = http_tool(
        service.url + "/status/500",  # which echoes the Authorization header back
        save=True,
        side_effect="read" if method == "GET" else "irreversible",
        idempotency=idempotency,
        retry_max_attempts=3,
        config_method=method,
        config_headers={"Authorization": "Bearer {secret:HTTP_TEST_TOKEN}"},
    )
    run = http_run(make_task, operator, tool, {})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert "answered 500 Internal Server Error" in step.error
    received = service.received("/status/500")
    assert len(received) == attempts
    assert {r.headers["idempotency-key"] for r in received} == {step.idempotency_key}
    if attempts > 1:
        assert f"(tried {attempts} times)" in step.error
    else:
        assert "not retried: the call may have had an effect" in step.error
    retries = LineageEvent.objects.filter(run_uuid=run.pk, kind="tool.retrying").count()
    assert retries == attempts - 1
    # The retry notes carry the error, echoed secret and all, before the engine redacts.
    assert SECRET not in payloads(run) and SECRET not in step.error


# TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localhost_certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for the name localhost (not for 127.0.0.1)."""
    openssl = shutil.which("openssl")
    require(openssl is not None, "the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_service(localhost_certificate):
    cert, key = localhost_certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with HttpService(tls=context) as running:
        yield running


def test_https_connects_to_the_checked_address_and_verifies_the_name(
    tls_service, localhost_certificate, monkeypatch, call
):
    monkeypatch.setenv("SSL_CERT_FILE", str(localhost_certificate[0]))  # trust it, here only
    tool = http_tool(
        f"https://localhost:{tls_service.port}/items/{{id}}", config_allowed_hosts=["localhost"]
    )
    result = call(tool, {"id": "42"})
    assert result.ok, result.error
    assert result.value["body"]["id"] == "42"
    assert tls_service.received()[0].headers["host"] == f"localhost:{tls_service.port}"


def test_https_refuses_a_certificate_for_another_name(
    tls_service, localhost_certificate, monkeypatch, call
):
    monkeypatch.setenv("SSL_CERT_FILE", str(localhost_certificate[0]))
    result = call(http_tool(tls_service.url + "/items/1"))  # https://127.0.0.1:port
    assert not result.ok and not result.transient
    assert "the server's TLS certificate was refused" in result.error
    assert (
        "127.0.0.1" in result.error
    )  # OpenSSL: "IP address mismatch, certificate is not valid for '127.0.0.1'"
    assert tls_service.hits() == 0


def test_https_refuses_an_untrusted_certificate(tls_service, monkeypatch, tmp_path, call):
    empty = tmp_path / "no-authorities.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    tool = http_tool(
        f"https://localhost:{tls_service.port}/items/1", config_allowed_hosts=["localhost"]
    )
    result = call(tool)
    assert not result.ok and not result.transient
    assert "the server's TLS certificate was refused" in result.error
    assert tls_service.hits() == 0


# Redaction before the cut (issue 11 review) ----------------------------------------------

CUT_SECRET = "s3cr3t-Tok3n-ABCDEFGH-0123456789"


@pytest.mark.parametrize(
    ("path", "description"),
    [
        ("/fail-echo/290", "the token straddles the 300-character excerpt's cut"),
        (
            f"/fail-echo/{16384 - 14}?fill=space",
            "the token straddles the 16,384-byte cut of the error body, and the spaces "
            "before it collapse, bringing its first part into the excerpt",
        ),
    ],
)
def test_an_error_excerpt_is_redacted_before_it_is_cut(
    service, monkeypatch, path, description, call
):
    monkeypatch.setenv("TOOL_SECRET_CUT", CUT_SECRET)
    tool = http_tool(
        service.url + path, config_headers={"Authorization": "Bearer {secret:TOOL_SECRET_CUT}"}
    )

    result = call(tool)

    assert not result.ok and "answered 400" in result.error
    for piece in (CUT_SECRET[:6], CUT_SECRET[-6:]):
        assert piece not in result.error, description
    assert service.received()[0].headers["authorization"] == f"Bearer {CUT_SECRET}"


# Method overrides on a read tool (issue 11 review) ---------------------------------------


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "x-http-method", "X-METHOD-OVERRIDE"])
def test_a_read_tool_may_not_send_a_method_override_header(header):
    config = {
        "method": "GET",
        "url": "https://api.example.com/items/{id}",
        "allowed_hosts": ["api.example.com"],
        "headers": {header: "DELETE"},
    }
    [error] = side_effect_errors(config, "read")
    assert error.startswith(f"the header {header} asks the server to take the request as")
    # Any other side effect already puts a person at the gate: the header is the tool's.
    assert side_effect_errors(config, "reversible") == []


@pytest.mark.parametrize(
    "where",
    [
        {"url": "https://api.example.com/items?_method=DELETE"},
        {"url": "https://api.example.com/items", "query": {"_METHOD": "{verb}"}},
    ],
)
def test_a_read_tool_may_not_send_a_method_override_parameter(where):
    config = {"method": "GET", "allowed_hosts": ["api.example.com"], **where}
    [error] = side_effect_errors(config, "read")
    assert "asks the server to take the request as another method" in error


def test_a_read_tool_saved_with_an_override_header_is_refused_at_the_call(service, call):
    tool = http_tool(
        service.url + "/items/{id}",
        config_headers={"X-HTTP-Method-Override": "{verb}"},
        side_effect="read",
    )

    result = call(tool, {"id": "7", "verb": "DELETE"})

    assert not result.ok and not result.transient
    assert "X-HTTP-Method-Override asks the server" in result.error
    assert service.hits() == 0
