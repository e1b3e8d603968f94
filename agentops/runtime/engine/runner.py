"""The async worker: hundreds of runs in flight in one worker process, each waiting on a
model or a tool's I/O holding no process, thread or database connection of its own.

Two threads per worker process, started with its first run:

- the **engine thread** runs each run's slice (``advance``, the same code as inline) in a
  greenlet of its own. The engine's short, durable transitions run there, one at a time,
  on the one database connection the thread keeps;
- the **I/O thread** runs an asyncio event loop. When a slice reaches slow I/O (a model
  turn, a tool call, a pause between retries: ``engine.waits``), its greenlet hands the
  awaitable to the loop and is suspended; the engine thread goes on with other runs; the
  awaitable's result resumes the greenlet.

No transaction spans a wait (``waits.wait`` refuses one), so the runs sharing the engine
thread's connection never see each other's writes half done. Leases are renewed for all
the runs the worker holds in one statement a beat (``Runner.beat``), not by a thread a run.
Calls with no async form run on a bounded thread pool (``AGENTOPS_TOOL_THREADS``).

The queues feed it unchanged: their job (``engine.jobs.run_advance_job``) hands the run
to this process's runner and returns, so a django-q2 or Celery worker process takes the
next message at once, up to ``AGENTOPS_WORKER_CONCURRENCY`` runs in flight; past that, the
job waits for a free slot. When the process stops, its runs go back to the queue at their
next step (``drain``); any still out after ``AGENTOPS_WORKER_DRAIN_SECONDS`` are abandoned
(``abandon``: the engine thread ends, so no beat renews their leases) and recovered by the
reaper when their leases lapse, as after a crash. So are the runs of a worker whose I/O
loop ended; ``runner()`` starts a new worker in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import greenlet
from django.conf import settings
from django.db import DatabaseError, connection

from agentops import telemetry
from agentops.runtime.engine.waits import RunGreenlet

logger = logging.getLogger("agentops.worker")

T = TypeVar("T")

# Threads for the address lookups of the I/O loop's calls (idle ones cost nothing).
LOOKUP_THREADS = 32
# How long a queue job waits for a free slot before it hands the run back to the queue.
SLOT_WAIT_SECONDS = 30.0


class CallInterrupted(RuntimeError):
    """A call raised what is not an ordinary error (SystemExit, KeyboardInterrupt, a
    cancellation: a BaseException). Handed across threads as it is, it would end the I/O
    loop that awaits it, or a run's slice without its error handling; it is this one
    call's error instead, as any other the call could raise."""

    @classmethod
    def of(cls, error: BaseException) -> CallInterrupted:
        said = str(error)
        return cls(f"the call raised {type(error).__name__}" + (f": {said}" if said else ""))


class Runner:
    """One worker process's async worker (``runner()`` makes it, once a process)."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.slots = threading.BoundedSemaphore(concurrency)
        self.events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.loop = asyncio.new_event_loop()
        self.threads = ThreadPoolExecutor(
            max_workers=settings.AGENTOPS_TOOL_THREADS, thread_name_prefix="agentops-tool"
        )
        # The leases this worker holds now: owner -> the run's greenlet (the engine
        # thread's alone).
        self.leases: dict[str, RunGreenlet] = {}
        self.stopping = threading.Event()
        self.stopped = threading.Event()  # the engine thread has ended
        # The runs still out are given up (a drain past its time, the I/O loop ended).
        self.abandoned = threading.Event()
        # Figures, for the benchmark and the logs (written by the engine thread only).
        self.in_flight = 0  # runs adopted and not yet done
        self.waiting = 0  # of those, suspended on I/O now
        self.waiting_peak = 0
        # Both daemons: an abandoned worker's threads never hold the process at its exit.
        self._io = threading.Thread(target=self._io_run, name="agentops-io", daemon=True)
        self._engine = threading.Thread(
            target=self._engine_run, name="agentops-engine", daemon=True
        )

    def start(self) -> Runner:
        self._io.start()
        self._engine.start()
        logger.info(
            "async worker started: up to %d runs in flight, %d tool threads",
            self.concurrency, settings.AGENTOPS_TOOL_THREADS,
        )  # fmt: skip
        return self

    # The queues' side ------------------------------------------------------------------

    def submit(
        self, run_id: uuid.UUID, claim_failures: int = 0, *, timeout: float = SLOT_WAIT_SECONDS
    ) -> bool:
        """Adopt the run: True once it is the engine thread's to work, False if no slot
        came free within ``timeout`` or the worker is stopping (the caller hands the run
        back to the queue)."""
        if self.stopping.is_set() or not self.slots.acquire(timeout=timeout):
            return False
        if self.stopping.is_set():
            self.slots.release()
            return False
        self.events.put(("start", run_id, claim_failures))
        return True

    def taking_runs(self) -> bool:
        """Whether a run handed over now will be worked: not stopping, both threads up."""
        return not self.stopping.is_set() and self._io.is_alive() and self._engine.is_alive()

    def drain(self, seconds: float | None = None) -> bool:
        """Stop taking runs, let the runs in flight go back to the queue at their next
        step, and wait up to ``seconds`` for them. True if all went back; else the rest
        are abandoned (``abandon``), and the process may exit."""
        seconds = settings.AGENTOPS_WORKER_DRAIN_SECONDS if seconds is None else seconds
        self.stopping.set()
        self.events.put(("stop",))
        if not self.stopped.wait(seconds):
            self.abandon(f"still out after the drain's {seconds:g} s")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.threads.shutdown(wait=False, cancel_futures=True)
        telemetry.flush()  # the spans of the slices this worker worked, before it goes
        return not self.abandoned.is_set()

    def abandon(self, why: str) -> None:
        """Give up the runs still out: the engine thread ends at its next event, so no
        beat renews their leases; they lapse, and the reaper hands the runs on, as after
        a crash. Their slices stay suspended where they are, writing nothing more."""
        if self.abandoned.is_set():
            return
        self.abandoned.set()
        self.stopping.set()
        self.events.put(("stop",))
        logger.warning(
            "async worker: %d runs %s are given up; their leases will lapse and the reaper "
            "hands them on",
            self.in_flight, why,
        )  # fmt: skip

    # The engine's side (waits.py) -------------------------------------------------------

    def in_thread(self, call: Callable[[], T]) -> Awaitable[T]:
        """``call()`` on the bounded pool, as an awaitable for the loop. What the call
        raises that is no ordinary error comes back as one (``CallInterrupted``): as it
        is, awaited on the loop, a SystemExit or a KeyboardInterrupt would end the loop."""
        return asyncio.get_running_loop().run_in_executor(self.threads, contained, call)

    def lease_hold(self, run_id: uuid.UUID, owner: str) -> None:
        self.leases[owner] = greenlet.getcurrent()

    def lease_release(self, owner: str) -> None:
        self.leases.pop(owner, None)

    # The threads --------------------------------------------------------------------------

    def _io_run(self) -> None:
        """The I/O loop, until ``drain`` stops it. Should it end before (whatever ended
        it), the runs waiting on it would wait for ever, and the runs handed over after
        would too: the worker stops taking runs, and abandons those it has."""
        asyncio.set_event_loop(self.loop)
        # The loop's own executor does its address lookups (getaddrinfo blocks): sized
        # for many calls at once, not for the CPUs (the default), so that a slow DNS
        # server does not make lookups wait their turn past their timeout.
        self.loop.set_default_executor(
            ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="agentops-dns")
        )
        try:
            self.loop.run_forever()
        except BaseException:
            logger.exception("async worker: the I/O loop failed")
        finally:
            if not self.stopped.is_set():
                self.abandon("waiting on an I/O loop that ended")

    def _engine_run(self) -> None:
        interval = settings.AGENTOPS_LEASE_SECONDS / 3
        next_beat = time.monotonic() + interval
        try:
            while not (self.stopping.is_set() and self.in_flight == 0):
                try:
                    event = self.events.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    event = None
                if self.abandoned.is_set():
                    break
                if time.monotonic() >= next_beat:
                    # After a failed beat, sooner: the leases run out while the database is away.
                    next_beat = time.monotonic() + (interval if self.beat() else min(interval, 1.0))
                if event is None or event[0] == "stop":
                    continue
                if event[0] == "start":
                    self.in_flight += 1
                    work = RunGreenlet(self._slice)
                    work.runner, work.run_id = self, event[1]
                    self._resume(work, event[1], event[2])
                else:  # "resume": an awaitable the run waited on is done
                    self.waiting -= 1
                    event[1].waiting_since = None
                    self._resume(event[1], event[2])
        finally:
            self.stopping.set()  # whatever ended it: no run is handed to it any more
            try:
                connection.close()
            except DatabaseError:
                logger.debug("closing the engine thread's connection failed", exc_info=True)
            self.stopped.set()

    def _slice(self, run_id: uuid.UUID, claim_failures: int) -> None:
        from agentops import background
        from agentops.runtime.engine.jobs import advance_job

        # What follows a commit (notices, the trail's seal) goes to the pool, not here.
        background.offload.set(self.threads.submit)
        try:
            advance_job(str(run_id), claim_failures)
        except Exception:
            # The job handles the engine's errors; what is left (a claim that could not
            # reach the database, even after it was handed back to the queue) is logged:
            # the run's lease lapses, if it had one, and the reaper hands it on.
            logger.exception("run %s: the async worker's slice failed", run_id)

    def _resume(self, work: RunGreenlet, *value: Any) -> None:
        """Run ``work`` until it waits on I/O again, or ends."""
        try:
            make = work.switch(*value)
        except BaseException:  # the slice catches its own errors: this is a bug here
            logger.exception("async worker: a run's greenlet failed")
        if work.dead:
            self.in_flight -= 1
            self.slots.release()
            return
        self.waiting += 1
        self.waiting_peak = max(self.waiting_peak, self.waiting)
        work.waiting_since = time.monotonic()
        future: Future = asyncio.run_coroutine_threadsafe(_awaited(make), self.loop)
        future.add_done_callback(lambda done: self.events.put(("resume", work, done)))

    def beat(self) -> bool:
        """Renew every lease this worker holds, in one statement. A lease that moved on
        (the run was cancelled, or taken over) is not taken back: the renewal names this
        worker as its owner. A failure (a database restart) drops the connection, so the
        next statement reconnects; it only shortens the leases, the fence decides."""
        from agentops.runtime.engine.leases import connection_drop, lease_deadline
        from tasks.models import Run, RunStatus

        if not self.leases:
            return True
        # A wait that outlasts a queue job's time limit is a call that hangs (whatever
        # the cause): its lease is left to lapse, as a job ended at its limit leaves it,
        # and the reaper hands the run on. The worker goes on with its other runs.
        stuck_since = time.monotonic() - settings.AGENTOPS_JOB_TIME_LIMIT
        owners = []
        for owner, work in self.leases.items():
            if work.waiting_since is not None and work.waiting_since < stuck_since:
                if not work.stuck_said:
                    logger.warning(
                        "async worker: run %s has waited on one call for more than %d s; "
                        "its lease is left to lapse",
                        work.run_id, settings.AGENTOPS_JOB_TIME_LIMIT,
                    )  # fmt: skip
                    work.stuck_said = True
                continue
            owners.append(owner)
        try:
            Run.objects.filter(status=RunStatus.RUNNING, lease_owner__in=owners).update(
                lease_expires_at=lease_deadline()
            )
        except Exception as error:
            logger.warning(
                "async worker: renewing %d leases failed (%s: %s); it reconnects at the next beat",
                len(self.leases), type(error).__name__, str(error).strip(),
            )  # fmt: skip
            connection_drop()
            return False
        return True


@contextlib.contextmanager
def interruptions_contained() -> Iterator[None]:
    """What the block raises that is not an ``Exception`` goes on as ``CallInterrupted``."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, Exception):
            raise
        raise CallInterrupted.of(error) from error


def contained(call: Callable[[], T]) -> T:
    """``call()`` on a pool thread, for the loop to await (``Runner.in_thread``)."""
    with interruptions_contained():
        return call()


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    """``make()`` awaited on the loop for a run's greenlet, its interruptions contained:
    a SystemExit or KeyboardInterrupt out of a task ends the loop, and a cancellation
    would end the run's slice past its error handling."""
    with interruptions_contained():
        return await make()


_runner: Runner | None = None
_runner_lock = threading.Lock()


def runner() -> Runner | None:
    """This process's async worker, started with its first run; None in the inline mode
    (``AGENTOPS_WORKER_CONCURRENCY=0``)."""
    global _runner
    if settings.AGENTOPS_WORKER_CONCURRENCY <= 0:
        return None
    with _runner_lock:
        # A worker stopping, or whose thread ended (its I/O loop failed), takes no run:
        # a new one does.
        if _runner is None or not _runner.taking_runs():
            _runner = Runner(settings.AGENTOPS_WORKER_CONCURRENCY).start()
            # When the process ends (a django-q2 worker recycled or stopped, a Celery
            # child shut down), its runs go back to the queue first.
            threading._register_atexit(_runner.drain)
        return _runner


def runner_drain() -> None:
    """Drain this process's async worker, if it has one (a process about to stop)."""
    if _runner is not None:
        _runner.drain()
