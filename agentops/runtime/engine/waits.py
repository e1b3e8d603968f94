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
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import greenlet
from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from agentops.runtime.engine.context import LeaseLost
from agentops.runtime.models.base import (
    RETRY_AFTER_MAX_SECONDS,
    SCRIPTED_PREFIX,
    ModelError,
    client_for,
)
from agentops.runtime.providers import Provider, Reservation, provider_for, token_count

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


@dataclass(frozen=True)
class StandIn:
    """What answers the engine's I/O in place of the model and the tools: a replay
    (``agentops.runtime.replay``) drives the engine over a run's record with nothing
    fired. ``model`` answers every model turn; ``tool(tool, arguments, context)`` every
    tool call. Under a stand-in nothing waits: no provider's limits, no pause."""

    model: ModelClient
    tool: Callable[[Tool, Any, ToolContext], ToolResult]


stand_in: ContextVar[StandIn | None] = ContextVar("agentops_stand_in", default=None)


def model_client(model_label: str) -> ModelClient:
    """The client that answers the run's model turns: the stand-in's, under one (the
    run's own model may not even be reachable where a replay runs), else the model's."""
    answering = stand_in.get()
    return answering.model if answering is not None else client_for(model_label)


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
    if seconds <= 0 or stand_in.get() is not None:
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
    if stand_in.get() is not None:
        return client.complete(**request)  # a stand-in's answer calls nobody
    provider = None
    if not client.label.startswith(SCRIPTED_PREFIX):
        provider = provider_for(client.label, getattr(client, "base_url", None))
    if provider is None:
        return model_call(client, request)
    reservation = provider_admit(provider, int(request.get("max_tokens") or 0))
    used = None
    try:
        turn = model_call(client, request)
        used = turn_tokens(turn)
        return turn
    except ModelError as error:
        if error.status == 429 and error.retry_after:
            provider.hold(min(error.retry_after, RETRY_AFTER_MAX_SECONDS))
        raise
    finally:
        provider.done(reserved=reservation, used=used)


def turn_tokens(turn: ModelTurn) -> int | None:
    """What the turn used, prompt and answer, where the server said both as counts
    (``token_count``): the answer as it came, before ``turn_storable`` made it storable."""
    counts = (token_count(turn.tokens_in), token_count(turn.tokens_out))
    return None if None in counts else sum(counts)


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
# How long a call waiting for a provider's slot sleeps before it looks again by itself:
# a slot freed wakes a waiter at once; this bounds how late a waiter sees its slice
# spent or its worker stopping.
RELEASE_WAIT_SECONDS = 1.0
# The longest sleep between two looks at a provider's limits on requests and tokens.
LIMIT_WAIT_SECONDS = 5.0
# In the payload of the yield that gives a run back to the queue from a wait on its
# provider's capacity: since when it has waited (ISO 8601, UTC), for the next slice.
CAPACITY_SINCE = "capacity_waiting_since"


class CapacityYielded(LeaseLost):
    """The run went back to the queue from a wait on its provider's capacity: this
    worker no longer holds it, and the slice ends here writing nothing more."""


def provider_admit(provider: Provider, tokens: int) -> Reservation:
    """Wait until ``provider``'s limits let one more call through; its reservation, for
    the caller's ``provider.done`` (in a ``finally``). On the async worker the run holds
    nothing meanwhile; the run's page says what it waits for.

    A wait that has lasted a slice (``AGENTOPS_SLICE_SECONDS``), or on a worker that is
    stopping, gives the run back to the queue (``capacity_yield``), as a slice that is
    spent does: a run never holds a worker's slot for longer waiting on capacity, and a
    draining worker is not held by it."""
    wait = CapacityWait(provider)
    reservation = None
    try:
        reservation = wait.admitted(tokens)
        return reservation
    finally:
        wait.end(reservation)


class CapacityWait:
    """One call's wait on its provider's capacity: when it began (in this slice, and
    since when the run has waited, across its yields), and what the run's page says."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.run = slice_run.get()
        # A wait outside a run's slice (none to give back to the queue) has no end.
        self.ends = math.inf
        if self.run is not None:
            self.ends = time.monotonic() + settings.AGENTOPS_SLICE_SECONDS
        self._since: datetime | None = None
        self.carried = False  # the run has waited since a slice before this one
        self.noted = ""

    def admitted(self, tokens: int) -> Reservation:
        while True:
            admission = self.provider.admission(tokens)
            if admission.reservation is not None:
                return admission.reservation
            delay, why = admission
            if self.over():
                capacity_yield(self, why)
            self.note(why)
            if math.isinf(delay):
                released_wait(self.provider)
            else:
                pause(min(delay, LIMIT_WAIT_SECONDS, self.ends - time.monotonic()))

    def over(self) -> bool:
        """Whether the wait gives the run back to the queue now: it has lasted its slice,
        or the worker is stopping."""
        if self.run is None:
            return False
        runner = current_runner()
        return time.monotonic() >= self.ends or (runner is not None and runner.stopping.is_set())

    def since(self) -> datetime:
        """Since when the run has waited: from its first wait, across its yields."""
        if self._since is None:
            carried = capacity_since_carried(self.run[0]) if self.run else None
            self.carried = carried is not None
            self._since = carried or timezone.now()
        return self._since

    def note(self, why: str) -> None:
        """Say on the run what it waits for; since when, once the wait has outlasted a
        slice (within its first, it is never older than a slice)."""
        if self.run is None:
            return
        since = self.since()
        text = f"{self.provider.key}: {why}"
        if self.carried:
            text += f", since {since:%Y-%m-%d %H:%M:%S} UTC"
        if text != self.noted:
            waiting_note(text)
            self.noted = text

    def end(self, reservation: Reservation | None) -> None:
        """The wait is over. A wait that leaves without a slot lets the next waiter look
        (it may have been woken for the slot it leaves free); the note is taken back,
        and if that fails, the slot it took is given back before the error goes on."""
        if reservation is None:
            self.provider.waiter_left()
        if not self.noted:
            return
        try:
            waiting_note("")
        except BaseException:
            if reservation is not None:
                self.provider.done(reserved=reservation)
            raise


def capacity_since_carried(run_id: uuid.UUID) -> datetime | None:
    """Since when the run has waited on its provider's capacity, if its slice before this
    one gave it back to the queue from that wait (``capacity_yield``) and nothing has
    happened to it since but this slice's claim; else None."""
    from lineage.models import LineageEvent

    last = list(
        LineageEvent.objects.filter(run_uuid=run_id)
        .order_by("-seq")
        .values_list("kind", "payload")[:2]
    )
    if [kind for kind, _ in last] != ["run.running", "run.queued"]:
        return None
    since = last[1][1].get(CAPACITY_SINCE)
    return datetime.fromisoformat(since) if since else None


def capacity_yield(wait: CapacityWait, why: str) -> NoReturn:
    """Give the slice's run back to the queue from its wait on capacity: the commit of
    ``stops.run_yield`` (``running -> queued``, the lease given up, a new queue
    message, under the fence), made from what a wait knows (the run's id and its
    owner), with since when the run has waited, for its next slice's note."""
    from agentops.runtime import dispatch
    from agentops.runtime.engine.leases import fence
    from tasks.models import Run, RunStatus
    from tasks.services import run_transition

    run_id, owner = wait.run
    since = wait.since()
    with transaction.atomic():
        fence(run_id, owner)
        run_transition(
            run=Run.objects.get(pk=run_id),
            to=RunStatus.QUEUED,
            actor="engine",
            reason="",
            lease_owner="",
            lease_expires_at=None,
            waiting_on="",
            payload={
                "why": f"it waited on its provider's capacity ({wait.provider.key}: {why}) "
                "for a slice, or its worker is stopping; the run goes back to the queue",
                CAPACITY_SINCE: since.isoformat(),
            },
        )
        dispatch.enqueue(run_id)
    wait.noted = ""  # the yield took the note back with the lease
    raise CapacityYielded(f"run {run_id} went back to the queue from a wait on capacity")


def released_wait(provider: Provider) -> None:
    """Until one of the provider's calls ends, or ``RELEASE_WAIT_SECONDS``. The wake-up
    is taken back when the wait ends, so a call that ends later wakes a waiter still
    there, not this one gone."""
    if current_runner() is None:
        released = threading.Event()
        wake = released.set
        provider.on_release(wake)
        try:
            released.wait(RELEASE_WAIT_SECONDS)
        finally:
            provider.on_release_cancel(wake)
        return

    async def released() -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

        provider.on_release(wake)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, RELEASE_WAIT_SECONDS)
        finally:
            provider.on_release_cancel(wake)

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
    answering = stand_in.get()
    if answering is not None:
        return answering.tool(tool, arguments, context)
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
