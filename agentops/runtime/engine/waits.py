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
import contextlib
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import greenlet
from django.db import connections

from agentops.runtime.models.base import (
    RETRY_AFTER_MAX_SECONDS,
    SCRIPTED_PREFIX,
    ModelError,
)
from agentops.runtime.providers import Provider, provider_for

if TYPE_CHECKING:
    from agentops.runtime.engine.runner import Runner
    from agentops.runtime.models.base import ModelClient, ModelTurn
    from agentops.runtime.tools.base import ToolContext, ToolExecutor, ToolResult
    from tasks.models import Tool

T = TypeVar("T")


class RunGreenlet(greenlet.greenlet):
    """The greenlet one run's slice runs in, on the async worker's engine thread."""

    runner: Runner | None = None
    run_id: uuid.UUID | None = None
    # Since when it waits on I/O (time.monotonic()), None while it works.
    waiting_since: float | None = None
    stuck_said = False  # the runner logged that its wait outlasted the job time limit


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
    """One model turn, within its provider's limits (``provider_admit``):
    ``client.acomplete`` on the async worker's loop where the client has one (the
    OpenAI-compatible client does, through ``AsyncOpenAI``), else the blocking
    ``client.complete`` (on the async worker, on its bounded thread pool)."""
    provider = None
    if not client.label.startswith(SCRIPTED_PREFIX):
        provider = provider_for(client.label, getattr(client, "base_url", None))
    reserved = int(request.get("max_tokens") or 0)
    if provider is not None:
        provider_admit(provider, reserved)
    used = None
    try:
        turn = model_call(client, request)
        used = turn.tokens_in + turn.tokens_out
        return turn
    except ModelError as error:
        if provider is not None and error.status == 429 and error.retry_after:
            provider.hold(min(error.retry_after, RETRY_AFTER_MAX_SECONDS))
        raise
    finally:
        if provider is not None:
            provider.done(reserved=reserved, used=used)


def model_call(client: ModelClient, request: dict[str, Any]) -> ModelTurn:
    runner = current_runner()
    if runner is None:
        return client.complete(**request)
    acomplete = getattr(client, "acomplete", None)
    if acomplete is not None:
        return wait(lambda: acomplete(**request))
    return wait(lambda: runner.in_thread(lambda: client.complete(**request)))


# The run whose slice this code works, for what it notes on the run while it waits
# (``loop.advance`` sets it): (run id, the worker's lease owner name).
slice_run: ContextVar[tuple[uuid.UUID, str] | None] = ContextVar("agentops_slice_run", default=None)
# How long a call waiting for a provider's slot sleeps before it looks again by itself
# (a slot freed is signalled at once; this covers a signal meant for a waiter gone).
RELEASE_WAIT_SECONDS = 1.0


def provider_admit(provider: Provider, tokens: int) -> None:
    """Wait until ``provider``'s limits let one more call through. On the async worker
    the run holds nothing meanwhile; the run's page says what it waits for."""
    noted = ""
    try:
        while True:
            delay, why = provider.admission(tokens)
            if not delay:
                return
            if why != noted:
                waiting_note(f"{provider.key}: {why}")
                noted = why
            if math.isinf(delay):
                released_wait(provider)
            else:
                pause(min(delay, 5.0))
    finally:
        if noted:
            waiting_note("")


def released_wait(provider: Provider) -> None:
    """Until one of the provider's calls ends, or ``RELEASE_WAIT_SECONDS``."""
    if current_runner() is None:
        released = threading.Event()
        provider.on_release(released.set)
        released.wait(RELEASE_WAIT_SECONDS)
        return

    async def released() -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

        provider.on_release(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, RELEASE_WAIT_SECONDS)

    wait(released)


def waiting_note(text: str) -> None:
    """Say on the run what its worker waits for ("" once it does not), while it holds
    the lease: a plain write of its own, outside the trail (it is no step of the run)."""
    from tasks.models import Run

    current = slice_run.get()
    if current is not None:
        run_id, owner = current
        Run.objects.filter(pk=run_id, lease_owner=owner).update(waiting_on=text[:200])


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
    return wait(
        lambda: in_thread_timed(runner, tool, lambda: executor.execute(tool, arguments, context))
    )


async def in_thread_timed(runner: Runner, tool: Tool, call: Callable[[], ToolResult]) -> ToolResult:
    """``call()`` on the async worker's bounded pool, within the tool's timeout once a
    thread has taken it. A call past it is reported failed, saying it may still take
    effect: its thread cannot be stopped, and goes on to the end; the run does not wait
    for it. (Inline, where the call holds the worker process, the queue's job time limit
    ends a call that hangs.)"""
    from agentops.runtime.tools.base import ToolResult

    loop = asyncio.get_running_loop()
    started = loop.create_future()

    def timed() -> ToolResult:
        loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))
        return call()

    done = runner.in_thread(timed)
    # The timeout counts from when a thread takes the call, not while it waits its turn
    # for one (a call queued behind others has not begun; the job time limit bounds that).
    await asyncio.wait([started, done], return_when=asyncio.FIRST_COMPLETED)
    try:
        return await asyncio.wait_for(asyncio.shield(done), tool.timeout_seconds)
    except TimeoutError:
        return ToolResult(
            ok=False,
            error=f"the {tool.kind} tool did not finish within its timeout of "
            f"{tool.timeout_seconds:g} s; it may still take effect",
        )
