"""Redaction never fails on a deep value (finding 12): a tool's answer or a call's
arguments may nest deeper than Python's recursion limit, and the secrets inside must
still be redacted, not raise RecursionError. Directly, and through the http tool and
the engine against a real server on 127.0.0.1 that answers with deeply nested JSON
holding the secret it was sent."""

from __future__ import annotations

import json
import socket
import sys
import uuid

import pytest

from agentops.runtime.engine import Outcome
from agentops.runtime.secrets import redact
from agentops.runtime.tools import ToolContext
from agentops.runtime.tools.http import HttpExecutor
from lineage.models import LineageEvent
from tasks.models import RunStatus, StepStatus, Tool
from tasks.services import run_start
from tests.conftest import run_coroutine, run_until_rest
from tests.runtime.tools.test_http_hostile import HostileServer

SECRET = "tok-deep-5e1f93a7c2"
SECRETS = {"TOOL_SECRET_DEEP": SECRET}


def nested(depth: int, inner: object) -> object:
    """``inner`` inside ``depth`` levels, lists and dicts in turn, each dict's key
    holding the secret too."""
    value = inner
    for level in range(depth):
        value = [value] if level % 2 else {f"key {SECRET}": value}
    return value


def innermost(value: object, depth: int) -> tuple[object, set[str]]:
    """What ``nested`` put inside its ``depth`` levels, and the keys met on the way."""
    keys = set()
    for _ in range(depth):
        if isinstance(value, dict):
            [(key, value)] = value.items()
            keys.add(key)
        else:
            [value] = value
    return value, keys


def test_a_value_far_deeper_than_the_recursion_limit_is_redacted():
    depth = 20_000
    assert depth > sys.getrecursionlimit()

    cleaned = redact(nested(depth, f"Bearer {SECRET}"), SECRETS)

    bottom, keys = innermost(cleaned, depth)
    assert bottom == "Bearer [secret:TOOL_SECRET_DEEP]"
    assert keys == {"key [secret:TOOL_SECRET_DEEP]"}


def test_deep_arguments_with_the_secret_are_redacted():
    arguments = {"filter": nested(5_000, {"token": SECRET, "limit": 3, "exact": True})}

    cleaned = redact(arguments, SECRETS)

    bottom, _ = innermost(cleaned["filter"], 5_000)
    assert bottom == {"token": "[secret:TOOL_SECRET_DEEP]", "limit": 3, "exact": True}


def test_a_part_used_twice_is_redacted_once_and_a_cycle_ends():
    shared = [SECRET]
    looped: list = [SECRET]
    looped.append(looped)

    cleaned = redact({"a": shared, "b": shared, "loop": looped}, SECRETS)

    assert cleaned["a"] == ["[secret:TOOL_SECRET_DEEP]"] and cleaned["a"] is cleaned["b"]
    assert cleaned["loop"][0] == "[secret:TOOL_SECRET_DEEP]"
    assert cleaned["loop"][1] is cleaned["loop"]


# Through the http tool, against a server that answers with deep JSON --------------------


def json_depth() -> int:
    """Deep enough that a redaction which recursed (two frames a level) would run out of
    stack, shallow enough that json.loads (one frame a level) still parses it: the limit
    is 1000, or 2500 once celpy (the rules) is imported, as it is in a worker."""
    return sys.getrecursionlimit() * 3 // 4


def deep_answer(server: HostileServer, conn: socket.socket) -> None:
    """A 200 whose JSON nests ``json_depth()`` levels, the secret at the bottom."""
    body = json.dumps(nested(json_depth(), f"echo: {SECRET}")).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def deep_tool(url: str, **fields) -> Tool:
    return Tool(
        name=f"deep_{uuid.uuid4().hex[:8]}",
        kind=Tool.Kind.HTTP,
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=10.0,
        config={
            "method": "GET",
            "url": url,
            "headers": {"Authorization": "Bearer {secret:TOOL_SECRET_DEEP}"},
            "allowed_hosts": ["127.0.0.1"],
            "allow_private": True,
        },
        **fields,
    )


@pytest.mark.parametrize("path", ["execute", "aexecute"])
def test_a_deep_answer_holding_the_secret_is_redacted_on_both_paths(monkeypatch, path):
    monkeypatch.setenv("TOOL_SECRET_DEEP", SECRET)
    context = ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key="run-1:1")
    with HostileServer(deep_answer) as server:
        tool = deep_tool(server.url)
        if path == "execute":
            result = HttpExecutor().execute(tool, {}, context)
        else:
            result = run_coroutine(HttpExecutor().aexecute(tool, {}, context))

    assert result.ok, result.error
    bottom, keys = innermost(result.value["body"], json_depth())
    assert bottom == "echo: [secret:TOOL_SECRET_DEEP]"
    assert keys == {"key [secret:TOOL_SECRET_DEEP]"}


@pytest.mark.django_db
def test_a_deep_answer_is_recorded_without_the_secret(make_task, operator, monkeypatch):
    monkeypatch.setenv("TOOL_SECRET_DEEP", SECRET)
    with HostileServer(deep_answer) as server:
        tool = deep_tool(server.url, retry_backoff_seconds=0.0)
        tool.save()
        task = make_task(
            [{"content": "call it", "calls": [(tool.name, {})]}, {"content": "done"}],
            tools=[tool.name],
            autonomy_level=3,
        )
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED, step.error
    assert step.result["normalised"]  # parsed whole, then cut to the depth a step stores
    trail = json.dumps(
        list(LineageEvent.objects.filter(run_uuid=run.pk).values_list("payload", flat=True))
    )
    assert SECRET not in trail
    assert SECRET not in json.dumps(list(run.steps.values_list("result", "error", "content")))
