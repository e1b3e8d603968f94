"""Waiting holds nothing (issue 12): an http or MCP tool call made through ``aexecute``
holds no thread while it waits, so many wait together on one event loop; and the async
worker makes its runs' calls that way. Against real peers on 127.0.0.1: the tests' HTTP
service (``/slow/<seconds>``) and the tests' MCP server (its ``slow`` tool).

What each path does, call for call, is proved in test_http.py and test_mcp.py, where
every executor test runs through both ``execute`` and ``aexecute``."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from agentops.runtime.tools import ToolContext
from agentops.runtime.tools.base import ToolResult
from agentops.runtime.tools.http import HttpExecutor
from agentops.runtime.tools.mcp import McpExecutor
from tasks.models import Run, RunStatus, Step, StepStatus, Tool
from tasks.services import run_start
from tests.conftest import run_coroutine
from tests.peers import http_service
from tests.peers.http_service import HttpService
from tests.peers.mcp_server import McpPeer

SLOW_SECONDS = 0.3
HTTP_CALLS = 50


@pytest.fixture
def service(monkeypatch):
    # The calls connect all at once: with socketserver's listen backlog of 5, the kernel
    # would drop the connections past it, and the client resends those a second later.
    monkeypatch.setattr(http_service.QuietServer, "request_queue_size", 128)
    with HttpService() as running:
        yield running


def slow_http_tool(url: str, **fields) -> Tool:
    return Tool(
        name=f"slow_{uuid.uuid4().hex[:8]}",
        kind=Tool.Kind.HTTP,
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=10.0,
        retry_backoff_seconds=0.0,
        config={
            "method": "GET",
            "url": url,
            "allowed_hosts": ["127.0.0.1"],
            "allow_private": True,
        },
        **fields,
    )


async def calls_at_once(
    executor: HttpExecutor | McpExecutor, tool: Tool, arguments: dict, count: int
) -> list[ToolResult]:
    """``count`` calls of ``tool`` awaited together on this loop. The loop has one helper
    thread (where its resolver and TLS contexts run): a call that held a thread while it
    waited could not overlap another."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    contexts = [
        ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key=f"run-{n}:1")
        for n in range(count)
    ]
    return await asyncio.gather(
        *(executor.aexecute(tool, arguments, context) for context in contexts)
    )


def test_fifty_slow_http_calls_wait_together_on_one_thread(service):
    tool = slow_http_tool(f"{service.url}/slow/{SLOW_SECONDS}")

    started = time.monotonic()
    results = run_coroutine(calls_at_once(HttpExecutor(), tool, {}, HTTP_CALLS))
    elapsed = time.monotonic() - started

    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    assert service.hits() == HTTP_CALLS
    # One after another: 50 x 0.3 = 15 s. Together: about one answer's time.
    assert elapsed < 3.0, f"{HTTP_CALLS} calls of {SLOW_SECONDS} s took {elapsed:.2f} s"


@pytest.fixture(scope="module")
def mcp_peer():
    peer = McpPeer().start()
    yield peer
    peer.stop()


def test_slow_mcp_calls_wait_together_on_one_thread(mcp_peer):
    tool = Tool(
        name="srv_slow",
        kind=Tool.Kind.MCP,
        side_effect="read",
        input_schema={"type": "object"},
        timeout_seconds=10.0,
        config={
            "server": {
                "transport": "http",
                "url": mcp_peer.url,
                "allowed_hosts": ["127.0.0.1"],
                "allow_private": True,
            },
            "tool": "slow",
        },
    )
    calls, seconds = 10, 0.5

    started = time.monotonic()
    results = run_coroutine(calls_at_once(McpExecutor(), tool, {"seconds": seconds}, calls))
    elapsed = time.monotonic() - started

    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    assert {result.value["content"][0] for result in results} == {f"slept {seconds}"}
    # One after another: 10 x 0.5 = 5 s (and more for the sessions' handshakes).
    assert elapsed < 3.0, f"{calls} calls of {seconds} s took {elapsed:.2f} s"


# Through the async worker ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_async_worker_awaits_http_calls_instead_of_lending_them_threads(
    make_task, operator, settings, service, request
):
    """Twenty runs each call an http tool that answers after a second. The worker's
    thread pool (for calls with no async form) has two threads: had the calls been made
    there, they would take ten seconds; awaited on the worker's loop, they overlap."""
    settings.AGENTOPS_TOOL_THREADS = 2
    runner = request.getfixturevalue("runner")
    tool = slow_http_tool(f"{service.url}/slow/1")
    tool.save()
    task = make_task(
        [{"content": "call it", "calls": [(tool.name, {})]}, {"content": "done"}],
        tools=[tool.name],
        autonomy_level=3,
    )
    runs = [run_start(task=task, run_input={}, user=operator) for _ in range(20)]

    started = time.monotonic()
    for run in runs:
        assert runner.submit(run.pk)
    ids = [run.pk for run in runs]
    busy = [RunStatus.QUEUED, RunStatus.RUNNING]
    while Run.objects.filter(pk__in=ids, status__in=busy).exists():
        assert time.monotonic() - started < 30, "the runs did not finish"
        time.sleep(0.05)
    elapsed = time.monotonic() - started

    assert set(Run.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        RunStatus.SUCCEEDED
    }
    steps = Step.objects.filter(run__in=ids, kind="tool")
    assert [step.status for step in steps] == [StepStatus.SUCCEEDED] * 20, [s.error for s in steps][
        :3
    ]
    assert service.hits("/slow/1") == 20
    assert elapsed < 7.0, f"20 calls of 1 s on the async worker took {elapsed:.2f} s"
