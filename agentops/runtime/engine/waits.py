"""The engine's slow I/O: a model turn, a tool call, a pause between retries.

The engine's code is the same however it is driven. Called by ``advance`` in a queue
worker's own thread (the inline mode, ``AGENTOPS_WORKER_CONCURRENCY=0``), each wait here
blocks that thread, as plain calls do. Called in a run of the async worker
(``agentops.runtime.engine.runner``), each one hands the I/O to the worker's event loop
and suspends the run's greenlet until it is done: the run then holds no thread and no
database connection while it waits, and one worker keeps hundreds of such waits at once.

What makes that safe is the rule every wait checks: no transaction is open across one.
The engine commits a step's record before its I/O (a tool call's ``started`` entry, a
model turn's budget check) and the outcome after it, so the database connection the
worker's runs share is never in the middle of one run's transaction when another's
code runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import greenlet
from django.db import connections

if TYPE_CHECKING:
    from agentops.runtime.engine.runner import Runner
    from agentops.runtime.models.base import ModelClient, ModelTurn
    from agentops.runtime.tools.base import ToolContext, ToolExecutor, ToolResult
    from tasks.models import Tool

T = TypeVar("T")


class RunGreenlet(greenlet.greenlet):
    """The greenlet one run's slice runs in, on the async worker's engine thread."""

    runner: Runner | None = None


def current_runner() -> Runner | None:
    """The async worker driving this code, or None when it runs inline."""
    return getattr(greenlet.getcurrent(), "runner", None)


def wait(make: Callable[[], Awaitable[T]]) -> T:
    """``make()`` awaited on the async worker's loop, this run's greenlet suspended
    meanwhile. The result, or the exception the awaitable raised, comes back here."""
    if current_runner() is None:
        raise RuntimeError("waits.wait() is for a run of the async worker")
    for alias in connections:
        if connections[alias].in_atomic_block:
            raise RuntimeError(
                "the engine waited on I/O inside a transaction: the runs of an async "
                "worker share its database connection, so no transaction may span a wait"
            )
    future = greenlet.getcurrent().parent.switch(make)
    return future.result()


def pause(seconds: float) -> None:
    """Wait ``seconds`` (between retries), holding nothing on the async worker."""
    if seconds <= 0:
        return
    if current_runner() is None:
        time.sleep(seconds)
    else:
        wait(lambda: asyncio.sleep(seconds))


def model_complete(client: ModelClient, **request: Any) -> ModelTurn:
    """One model turn: ``client.acomplete`` on the async worker's loop where the client
    has one (the OpenAI-compatible client does, through ``AsyncOpenAI``), else the
    blocking ``client.complete`` (on the worker's bounded thread pool, async worker)."""
    runner = current_runner()
    if runner is None:
        return client.complete(**request)
    acomplete = getattr(client, "acomplete", None)
    if acomplete is not None:
        return wait(lambda: acomplete(**request))
    return wait(lambda: runner.in_thread(lambda: client.complete(**request)))


def tool_execute(
    executor: ToolExecutor, tool: Tool, arguments: Any, context: ToolContext
) -> ToolResult:
    """One tool call: ``executor.aexecute`` on the async worker's loop where the kind has
    one (I/O-bound kinds), else ``executor.execute`` on the worker's bounded thread pool
    (a python tool that blocks, a driver with no async form), with the tool's own
    timeout kept by the executor."""
    runner = current_runner()
    if runner is None:
        return executor.execute(tool, arguments, context)
    aexecute = getattr(executor, "aexecute", None)
    if aexecute is not None:
        return wait(lambda: aexecute(tool, arguments, context))
    return wait(lambda: runner.in_thread(lambda: executor.execute(tool, arguments, context)))
