"""MCP tools against real servers: mcp-server-time over stdio, and the tests' own server
(tests/peers/mcp_server.py) over streamable HTTP on 127.0.0.1. Imported with
``manage.py mcp_import``, called through the engine."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agentops.runtime.engine import Outcome
from agentops.runtime.tools import ToolContext, executor_for_kind
from agentops.runtime.tools.mcp import McpExecutor
from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.governance import tool_trail_uuid
from tasks.models import Run, RunStatus, StepStatus, TaskVersion, Tool
from tasks.services import run_start
from tests.conftest import run_coroutine, run_until_rest
from tests.peers.http_service import HttpService
from tests.peers.mcp_server import McpPeer, free_port

pytestmark = pytest.mark.django_db

TIME_COMMAND = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]


@pytest.fixture(scope="module")
def mcp_peer():
    peer = McpPeer().start()
    yield peer
    peer.stop()


def mcp_import(*args: str) -> str:
    out = StringIO()
    call_command("mcp_import", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def events(run: Run) -> list[str]:
    return list(
        LineageEvent.objects.filter(run_uuid=run.pk).order_by("seq").values_list("kind", flat=True)
    )


def run_one_call(make_task, operator, tool: str, arguments: dict) -> Run:
    """A run whose scripted model calls ``tool`` once, then answers."""
    task = make_task(
        [{"calls": [(tool, arguments)]}, {"content": "done"}],
        tools=[tool],
        autonomy_level=3,
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    return run


# mcp-server-time over stdio -------------------------------------------------------------


def test_time_tools_import_as_read_only_when_the_operator_agrees():
    out = mcp_import("time", "--stdio", shlex.join(TIME_COMMAND), "--accept-read-only")

    tool = Tool.objects.get(name="time_get_current_time")
    assert tool.kind == Tool.Kind.MCP
    assert tool.side_effect == "read"
    assert tool.idempotency == "key"
    assert tool.description == "Get current time in a specific timezone"
    assert tool.input_schema["required"] == ["timezone"]
    assert tool.config == {
        "server": {"transport": "stdio", "command": TIME_COMMAND},
        "tool": "get_current_time",
        "annotations": {
            "read_only_hint": True,
            "destructive_hint": False,
            "idempotent_hint": True,
            "open_world_hint": False,
        },
    }
    assert Tool.objects.get(name="time_convert_time").side_effect == "read"
    assert (
        "create time_get_current_time: read (the server marks it read-only and "
        "--accept-read-only was given); idempotency key (the server marks it idempotent)"
    ) in out


def test_without_the_operators_agreement_every_tool_is_irreversible():
    out = mcp_import("time", "--stdio", shlex.join(TIME_COMMAND))

    assert set(Tool.objects.filter(kind="mcp").values_list("name", "side_effect")) == {
        ("time_get_current_time", "irreversible"),
        ("time_convert_time", "irreversible"),
    }
    assert "but --accept-read-only was not given" in out


def test_get_current_time_runs_through_the_engine(make_task, operator):
    mcp_import("time", "--stdio", shlex.join(TIME_COMMAND), "--accept-read-only")

    run = run_one_call(make_task, operator, "time_get_current_time", {"timezone": "Europe/London"})

    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    assert step.result["structured"]["timezone"] == "Europe/London"
    assert step.result["structured"]["day_of_week"]
    assert json.loads(step.result["content"][0])["timezone"] == "Europe/London"
    assert "tool.succeeded" in events(run)


def test_the_time_servers_own_error_is_a_failed_step(make_task, operator):
    mcp_import("time", "--stdio", shlex.join(TIME_COMMAND), "--accept-read-only")

    run = run_one_call(make_task, operator, "time_get_current_time", {"timezone": "Mars/Olympus"})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert "Invalid timezone" in step.error and "Mars/Olympus" in step.error
    assert "tool.retrying" not in events(run)


def test_a_stdio_command_that_does_not_start_fails_the_import(settings):
    settings.AGENTOPS_MCP_COMMANDS = [["/nonexistent/mcp-server"]]
    with pytest.raises(
        CommandError,
        match="could not start the MCP server `/nonexistent/mcp-server --flag`: No such file",
    ):
        mcp_import("gone", "--stdio", "/nonexistent/mcp-server --flag")
    assert not Tool.objects.filter(kind="mcp").exists()


def test_a_stdio_server_that_exits_says_what_it_printed(settings):
    words = [sys.executable, "-c", "import sys; sys.exit('no licence key')"]
    settings.AGENTOPS_MCP_COMMANDS = [words]
    command = shlex.join(words)
    with pytest.raises(CommandError, match=r"did not start a session.*no licence key"):
        mcp_import("gone", "--stdio", command)
    assert not Tool.objects.filter(kind="mcp").exists()


# The tests' server over streamable HTTP -----------------------------------------------


def test_http_tools_import_with_names_made_to_fit(mcp_peer):
    out = mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")

    assert set(Tool.objects.filter(kind="mcp").values_list("name", flat=True)) == {
        "srv_add",
        "srv_fail",
        "srv_slow",
        "srv_whoami",
        "srv_note_save",
    }
    add = Tool.objects.get(name="srv_add")
    assert (add.side_effect, add.idempotency) == ("read", "key")
    assert add.config["server"] == {
        "transport": "http",
        "url": mcp_peer.url,
        "allowed_hosts": ["127.0.0.1"],
        "allow_private": True,
    }
    assert add.config["annotations"] == {"read_only_hint": True, "idempotent_hint": True}
    fail = Tool.objects.get(name="srv_fail")
    assert (fail.side_effect, fail.idempotency) == ("irreversible", "none")
    assert Tool.objects.get(name="srv_note_save").config["tool"] == "note.save"
    assert "create srv_note_save (the server's 'note.save'): irreversible" in out
    assert "srv_fail: irreversible (the server does not mark it read-only)" in out


def test_add_runs_through_the_engine(mcp_peer, make_task, operator):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")

    run = run_one_call(make_task, operator, "srv_add", {"a": 2, "b": 3})

    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED
    assert step.result == {"content": ["5"], "structured": {"result": 5}}


def test_a_tool_error_is_a_failed_step_with_the_servers_text(mcp_peer, make_task, operator):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private")

    run = run_one_call(make_task, operator, "srv_fail", {"reason": "the ledger is closed"})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert "the ledger is closed" in step.error
    assert "tool.retrying" not in events(run)
    assert run.status == RunStatus.SUCCEEDED  # the model saw the error and answered


def test_arguments_are_checked_against_the_imported_schema(mcp_peer, make_task, operator):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")

    run = run_one_call(make_task, operator, "srv_add", {"a": "two"})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert "a: 'two' is not of type 'integer'" in step.error
    assert "'b' is a required property" in step.error


def test_an_unreachable_server_fails_the_import_and_writes_nothing():
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(CommandError, match=rf"could not reach the MCP server at {url}"):
        mcp_import("srv", "--url", url, "--allow-private")
    assert not Tool.objects.filter(kind="mcp").exists()


def test_an_unreachable_server_is_a_transient_failure_retried(mcp_peer, make_task, operator):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")
    tool = Tool.objects.get(name="srv_add")
    tool.config["server"]["url"] = f"http://127.0.0.1:{free_port()}/mcp"
    tool.retry_backoff_seconds = 0.0
    tool.save()

    run = run_one_call(make_task, operator, "srv_add", {"a": 1, "b": 1})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert "could not reach the MCP server" in step.error
    assert "nothing was called" in step.error and "(tried 3 times)" in step.error
    assert events(run).count("tool.retrying") == 2


@pytest.mark.parametrize(
    ("idempotency", "retries", "says"),
    [
        ("none", 0, "may or may not have taken effect"),
        ("key", 2, "the tool is idempotent"),
    ],
)
def test_a_call_that_times_out_is_retried_only_if_the_tool_is_idempotent(
    mcp_peer, make_task, operator, idempotency, retries, says
):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private")
    Tool.objects.filter(name="srv_slow").update(
        timeout_seconds=0.5, idempotency=idempotency, retry_backoff_seconds=0.0
    )

    run = run_one_call(make_task, operator, "srv_slow", {"seconds": 5})

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.FAILED
    assert "did not answer within 0.5 s" in step.error and says in step.error
    assert events(run).count("tool.retrying") == retries


def test_a_secret_header_is_sent_and_kept_out_of_the_record(
    mcp_peer, make_task, operator, monkeypatch
):
    monkeypatch.setenv("MCP_TEST_TOKEN", "tok-5ecret-42")
    mcp_import(
        "srv",
        "--url",
        mcp_peer.url,
        "--allow-private",
        "--header",
        "Authorization=Bearer {secret:MCP_TEST_TOKEN}",
        "--accept-read-only",
    )
    tool = Tool.objects.get(name="srv_whoami")
    assert tool.config["server"]["headers"] == {"Authorization": "Bearer {secret:MCP_TEST_TOKEN}"}

    run = run_one_call(make_task, operator, "srv_whoami", {})

    step = run.steps.get(kind="tool")
    # The server saw the token; the record shows only the secret's name.
    assert step.result["content"] == ["Bearer [secret:MCP_TEST_TOKEN]"]
    trail = json.dumps(list(LineageEvent.objects.filter(run_uuid=run.pk).values("payload")))
    assert "tok-5ecret-42" not in trail and "tok-5ecret-42" not in json.dumps(step.result)


def test_a_missing_secret_stops_the_import(mcp_peer, monkeypatch):
    monkeypatch.delenv("MCP_TEST_TOKEN", raising=False)
    with pytest.raises(CommandError, match="the secret MCP_TEST_TOKEN is not set"):
        mcp_import(
            "srv",
            "--url",
            mcp_peer.url,
            "--allow-private",
            "--header",
            "X-Token=secret:MCP_TEST_TOKEN",
        )
    assert not Tool.objects.filter(kind="mcp").exists()


def test_reimport_keeps_what_the_operator_set(mcp_peer):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")
    Tool.objects.filter(name="srv_add").update(
        side_effect="irreversible",
        always_approve=True,
        description="edited",
        input_schema={},
        available=False,
    )

    out = mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--accept-read-only")

    add = Tool.objects.get(name="srv_add")
    assert (add.side_effect, add.always_approve) == ("irreversible", True)
    assert add.description == "Add two integers." and add.input_schema["required"] == ["a", "b"]
    assert add.available
    assert "update srv_add: schema, description and config from the server" in out
    assert "side effect irreversible kept (the operator's; a new import would choose read" in out
    assert Tool.objects.filter(kind="mcp").count() == 5


def test_an_import_is_recorded_in_each_tools_trail(mcp_peer):
    mcp_import("srv", "--url", mcp_peer.url, "--allow-private")
    add = Tool.objects.get(name="srv_add")
    Tool.objects.filter(pk=add.pk).update(description="edited")

    mcp_import("srv", "--url", mcp_peer.url, "--allow-private")

    trail = list(LineageEvent.objects.filter(run_uuid=tool_trail_uuid(add)).order_by("seq"))
    assert [(event.kind, event.actor) for event in trail] == [
        ("config.created", "command:mcp_import"),
        ("config.changed", "command:mcp_import"),
    ]
    [change] = trail[1].payload["changes"]
    assert (change["field"], change["before"], change["after"]) == (
        "description",
        "edited",
        "Add two integers.",
    )
    assert chain_verify(tool_trail_uuid(add)).intact


def test_a_new_tool_may_not_take_a_name_a_task_version_calls(mcp_peer, make_task):
    task = make_task([])
    TaskVersion.objects.create(
        task=task, number=1, definition={"tools": ["srv_add"]}, digest="0" * 64
    )

    with pytest.raises(CommandError, match=r"srv_add: .* v1 names a tool 'srv_add'"):
        mcp_import("srv", "--url", mcp_peer.url, "--allow-private")
    assert not Tool.objects.filter(kind="mcp").exists()


def test_a_dry_run_writes_nothing(mcp_peer):
    out = mcp_import("srv", "--url", mcp_peer.url, "--allow-private", "--dry-run")

    assert "would create srv_add: irreversible" in out
    assert "Dry run: nothing was written." in out
    assert not Tool.objects.filter(kind="mcp").exists()


def test_a_name_taken_by_another_kind_of_tool_stops_the_import(mcp_peer):
    Tool.objects.create(name="srv_add", kind="python", side_effect="read")
    with pytest.raises(CommandError, match="a python function tool is already named 'srv_add'"):
        mcp_import("srv", "--url", mcp_peer.url, "--allow-private")
    assert not Tool.objects.filter(kind="mcp").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bad prefix!", "--url", "http://127.0.0.1:1/mcp"], "the prefix 'bad prefix!'"),
        (["srv", "--url", "ftp://example.com/mcp"], "--url: 'ftp://example.com/mcp' is not"),
        (["srv", "--stdio", "python -m x", "--header", "A=b"], "--header goes with --url"),
        (["srv", "--url", "http://127.0.0.1:1/mcp", "--env", "A=b"], "--env goes with --stdio"),
        (["srv", "--url", "http://127.0.0.1:1/mcp", "--header", "novalue"], "NAME=VALUE"),
        (["srv", "--stdio", "python 'unclosed"], "--stdio cannot be split"),
    ],
)
def test_bad_options_are_named_and_nothing_is_written(args, says):
    with pytest.raises(CommandError, match=says.replace("?", r"\?")):
        mcp_import(*args)
    assert not Tool.objects.filter(kind="mcp").exists()


# The executor's contract ---------------------------------------------------------------


def test_the_executor_is_registered_for_the_mcp_kind():
    assert isinstance(executor_for_kind("mcp"), McpExecutor)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ([], "the config must be a JSON object"),
        ({"tool": "x"}, "server: missing"),
        (
            {"server": {"transport": "ws"}, "tool": "x"},
            "server: transport must be one of stdio, http",
        ),
        (
            {"server": {"transport": "stdio"}, "tool": "x"},
            "server: command: must be a non-empty list",
        ),
        (
            {"server": {"transport": "stdio", "command": "python -m x"}, "tool": "x"},
            "server: command: must be a non-empty list",
        ),
        (
            {"server": {"transport": "stdio", "command": ["x"], "env": {"K": 1}}, "tool": "x"},
            "server: env.K: must be text, not int",
        ),
        (
            {"server": {"transport": "http", "url": "localhost:8765"}, "tool": "x"},
            "server: url: 'localhost:8765' is not an http:// or https:// URL",
        ),
        ({"server": {"transport": "http"}, "tool": "x"}, "server: url: missing"),
        (
            {
                "server": {"transport": "http", "url": "http://h/mcp", "headers": ["A: b"]},
                "tool": "x",
            },
            "server: headers: must be a JSON object",
        ),
        (
            {"server": {"transport": "http", "url": "http://h/mcp", "headers": {"A": "secret:1x"}}},
            "server: headers.A: 'secret:1x' does not name a secret",
        ),
        (
            {"server": {"transport": "http", "url": "http://h/mcp", "command": ["x"]}, "tool": "x"},
            "server: unknown key 'command' for the http transport",
        ),
        ({"server": {"transport": "http", "url": "http://h/mcp"}}, "tool: missing"),
        (
            {"server": {"transport": "http", "url": "http://h/mcp"}, "tool": "x", "tol": 1},
            "unknown key 'tol'",
        ),
        (
            {"server": {"transport": "http", "url": "http://h/mcp"}, "tool": "x", "annotations": 1},
            "annotations: must be a JSON object",
        ),
    ],
)
def test_config_errors_name_each_problem(config, says):
    assert any(says in problem for problem in McpExecutor().config_errors(config)), (
        McpExecutor().config_errors(config)
    )


def test_good_configs_have_no_errors():
    executor = McpExecutor()
    assert (
        executor.config_errors(
            {
                "server": {
                    "transport": "stdio",
                    "command": ["python", "-m", "mcp_server_time", "--local-timezone", "UTC"],
                    "env": {"K": "secret:K"},
                },
                "tool": "get_current_time",
            }
        )
        == []
    )
    assert (
        executor.config_errors(
            {
                "server": {
                    "transport": "http",
                    "url": "http://127.0.0.1:8765/mcp",
                    "headers": {"Authorization": "Bearer {secret:TOKEN}"},
                    "allowed_hosts": ["127.0.0.1"],
                    "allow_private": True,
                },
                "tool": "add",
                "annotations": {"read_only_hint": True},
            }
        )
        == []
    )


def test_a_tool_with_a_bad_config_fails_without_calling_anything(call_mcp):
    tool = Tool(name="broken", kind="mcp", side_effect="read", config={"tool": "x"})
    result = call_mcp(tool)
    assert not result.ok and not result.transient
    assert "the config of broken is invalid: server: missing" in result.error


def test_a_missing_secret_at_call_time_is_named(monkeypatch, call_mcp):
    monkeypatch.delenv("MCP_ABSENT_TOKEN", raising=False)
    tool = Tool(
        name="needs_token",
        kind="mcp",
        side_effect="read",
        config={
            "server": {
                "transport": "stdio",
                "command": ["python", "-m", "mcp_server_time"],
                "env": {"T": "secret:MCP_ABSENT_TOKEN"},
            },
            "tool": "x",
        },
    )
    result = call_mcp(tool)
    assert not result.ok
    assert "the secret MCP_ABSENT_TOKEN is not set" in result.error


# The http transport's address fence (issue 11 review) ------------------------------------


def http_mcp_tool(url: str, **server) -> Tool:
    return Tool(
        name="m",
        kind="mcp",
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=5,
        config={
            "server": {
                "transport": "http",
                "url": url,
                "allowed_hosts": [url.split("//")[1].split("/")[0].rsplit(":", 1)[0].strip("[]")],
                **server,
            },
            "tool": "add",
        },
    )


@pytest.fixture(params=["execute", "aexecute"])
def call_mcp(request):
    """One call of the executor, made both ways: ``execute`` (blocking) and ``aexecute``
    (awaited on an event loop, as the async worker makes it)."""

    def make(tool: Tool, arguments: dict | None = None):
        context = ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key="k")
        if request.param == "execute":
            return McpExecutor().execute(tool, arguments or {}, context)
        return run_coroutine(McpExecutor().aexecute(tool, arguments or {}, context))

    return make


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://127.0.0.1:5432/", "127.0.0.1 is a loopback address"),
        ("http://[::1]:6379/", "::1 is a loopback address"),
        ("http://10.1.2.3/mcp", "10.1.2.3 is a private address"),
    ],
)
def test_an_http_server_at_a_private_address_is_refused_and_nothing_sent(url, says, call_mcp):
    result = call_mcp(http_mcp_tool(url))
    assert not result.ok and not result.transient
    assert result.error.startswith(f"refused: {says}; this tool may reach only public addresses")
    assert result.error.endswith("nothing was called")


def test_a_name_that_resolves_to_loopback_is_refused_and_the_server_sees_nothing(call_mcp):
    with HttpService() as service:
        result = call_mcp(http_mcp_tool(f"http://localhost:{service.port}/mcp"))
        assert not result.ok and not result.transient
        assert result.error.startswith("refused: localhost resolves to ")
        assert service.hits() == 0


def test_allow_private_lets_the_tool_reach_the_local_server(mcp_peer, call_mcp):
    result = call_mcp(http_mcp_tool(mcp_peer.url, allow_private=True), {"a": 2, "b": 3})
    assert result.ok, result.error
    assert result.value["content"] == ["5"]


def test_the_connection_goes_to_the_address_that_was_checked(mcp_peer, monkeypatch, call_mcp):
    """DNS rebinding: the name is looked up once, checked, and connected to at that
    address. Later lookups of the name here answer 127.0.0.2, where nothing listens; the
    call still succeeds, and the name was looked up once. (A resolver that changes its
    answer between lookups cannot run here, so getaddrinfo stands in for it.)"""
    import socket

    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host == "localhost":
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://localhost:{mcp_peer.port}/mcp"

    result = call_mcp(http_mcp_tool(url, allow_private=True), {"a": 1, "b": 1})

    assert result.ok, result.error
    assert lookups == ["localhost"]


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ({"url": "http://h/mcp"}, "server: allowed_hosts is required"),
        (
            {"url": "http://h/mcp", "allowed_hosts": ["other"]},
            "server: the url's host h is not in allowed_hosts (other)",
        ),
        (
            {"url": "http://h/mcp", "allowed_hosts": ["h"], "allow_private": "yes"},
            "server: allow_private must be true or false",
        ),
    ],
)
def test_the_address_fence_is_checked_when_saved(server, says):
    errors = McpExecutor().config_errors({"server": {"transport": "http", **server}, "tool": "x"})
    assert any(says in error for error in errors), errors


def test_the_import_refuses_a_private_server_without_allow_private(mcp_peer):
    with pytest.raises(CommandError) as refused:
        mcp_import("srv", "--url", mcp_peer.url)
    message = str(refused.value)
    assert message.startswith("refused: 127.0.0.1 is a loopback address")
    assert "pass --allow-private" in message and message.endswith("nothing was imported")
    assert not Tool.objects.filter(kind="mcp").exists()


def test_allow_private_goes_with_url_only():
    with pytest.raises(CommandError, match="--allow-private goes with --url"):
        mcp_import("srv", "--stdio", "python -m mcp_server_time", "--allow-private")


def test_a_stdio_servers_stderr_is_redacted_before_it_is_cut(settings, monkeypatch, call_mcp):
    secret = "s3cr3t-Tok3n-ABCDEFGH-0123456789"
    monkeypatch.setenv("TOOL_SECRET_LICENCE", secret)
    # The secret, then 480 characters: the 500-character tail starts inside it.
    script = "import os, sys; sys.exit(os.environ['LICENCE'] + ' after' * 96)"
    words = [sys.executable, "-c", script]
    settings.AGENTOPS_MCP_COMMANDS = [["=", *words]]
    stored = Tool(
        name="licenced",
        kind="mcp",
        side_effect="read",
        input_schema={"type": "object"},
        config={
            "server": {
                "transport": "stdio",
                "command": words,
                "env": {"LICENCE": "secret:TOOL_SECRET_LICENCE"},
            },
            "tool": "x",
        },
    )

    result = call_mcp(stored)

    assert not result.ok and "did not start a session" in result.error
    assert "after after" in result.error
    for piece in (secret[-8:], secret[12:20]):
        assert piece not in result.error


# Both paths, executor only: execute, and aexecute as the async worker awaits it ----------


def test_a_stdio_server_answers_through_the_executor(call_mcp):
    tool = Tool(
        name="time_now",
        kind="mcp",
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=10,
        config={
            "server": {"transport": "stdio", "command": TIME_COMMAND},
            "tool": "get_current_time",
        },
    )

    result = call_mcp(tool, {"timezone": "Europe/London"})

    assert result.ok, result.error
    assert result.value["structured"]["timezone"] == "Europe/London"


def test_a_servers_error_result_is_a_final_failure(mcp_peer, call_mcp):
    tool = http_mcp_tool(mcp_peer.url, allow_private=True)
    tool.config["tool"] = "fail"

    result = call_mcp(tool, {"reason": "the ledger is closed"})

    assert not result.ok and not result.transient
    assert result.error.endswith("the ledger is closed")


@pytest.mark.parametrize(
    ("idempotency", "transient", "says"),
    [("none", False, "may or may not have taken effect"), ("key", True, "the tool is idempotent")],
)
def test_a_call_that_times_out_is_transient_only_if_the_tool_is_idempotent(
    mcp_peer, call_mcp, idempotency, transient, says
):
    tool = http_mcp_tool(mcp_peer.url, allow_private=True)
    tool.config["tool"] = "slow"
    tool.timeout_seconds = 0.5
    tool.idempotency = idempotency

    result = call_mcp(tool, {"seconds": 5})

    assert not result.ok and result.transient is transient
    assert "the MCP server did not answer within 0.5 s" in result.error and says in result.error


def test_an_unreachable_server_is_transient_and_nothing_was_called(call_mcp):
    tool = http_mcp_tool(f"http://127.0.0.1:{free_port()}/mcp", allow_private=True)

    result = call_mcp(tool, {"a": 1, "b": 1})

    assert not result.ok and result.transient
    assert result.error.startswith("could not reach the MCP server at http://127.0.0.1:")
    assert result.error.endswith("; nothing was called")
