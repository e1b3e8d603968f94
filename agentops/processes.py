"""Child processes that must end with the process that started them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(Exception):
    """A second Ctrl-C or SIGTERM while a child was being stopped gracefully."""


def group_stop(process: subprocess.Popen, *, grace: float) -> None:
    """End ``process``, started with ``start_new_session=True``, and every process it
    started: SIGTERM to it first, its own graceful stop (a django-q2 cluster lets its
    workers finish the job in hand), then SIGKILL to its whole process group after
    ``grace`` seconds, or at once when this process is sent Ctrl-C or SIGTERM meanwhile.
    Killing the group, not the process alone, is what keeps a cluster's sentinel and
    workers from living on as orphans. For a worker, being killed mid-step is a crash,
    which the engine recovers from: its lease expires and the next worker resumes."""
    handlers = {}
    main = threading.current_thread() is threading.main_thread()

    def signals_ignore() -> None:
        if main:
            for number in STOP_SIGNALS:
                signal.signal(number, signal.SIG_IGN)

    if main:

        def now(signum: int, frame: object) -> None:
            signals_ignore()  # one StopNow only: what follows must run to the end
            raise StopNow

        handlers = {number: signal.signal(number, now) for number in STOP_SIGNALS}
    try:
        try:
            process.terminate()
            process.wait(timeout=grace)
        except (subprocess.TimeoutExpired, StopNow):
            pass
        signals_ignore()
        # The group outlives its first process while any member does: this ends them,
        # whether the first process stopped by itself or not.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
