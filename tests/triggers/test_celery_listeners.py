"""``celery -A agentops worker --triggers``: the triggers' listeners started by a real
Celery worker's main process (agentops/celery_triggers.py), firing triggers, stopped with
the worker, started again when they die, and ending by themselves when the worker is
killed outright."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
from django.db import connection

from tasks.models import Run, Trigger
from tests.conftest import require
from tests.peers.smtp import HOST, free_port
from tests.peers.workers import ROOT, wait_for, worker_env
from tests.runtime.test_celery import BROKER_URL, QUEUE, queue_clear
from tests.runtime.test_celery import redis_problem as broker_problem
from tests.test_serve import alive
from tests.triggers.test_listeners import process_task, smtp_answers, stream_trigger
from tests.triggers.test_queues import REDIS_URL, redis_problem
from triggers.listeners import STOP_SECONDS
from triggers.management.commands.triggers import PARENT_CHECK_SECONDS

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

# What the listeners take at most to see their parent gone and stop; a margin for a
# busy machine on top.
PARENT_GONE_BOUND = PARENT_CHECK_SECONDS + STOP_SECONDS + 10


@pytest.fixture
def stream() -> Iterator[tuple[redis.Redis, str]]:
    """A fresh Redis stream for a queue trigger (deleted after) on the triggers tests'
    Redis database; the Celery broker must be reachable too."""
    for problem in (redis_problem(), broker_problem()):
        require(not problem, problem)
    client = redis.Redis.from_url(REDIS_URL)
    name = f"test-celery-listeners-{time.monotonic_ns()}"
    yield client, name
    client.delete(name, f"{name}.dead")
    client.close()


def listeners_of(worker: int) -> list[int]:
    """The live ``manage.py triggers`` processes started by the worker whose main
    process is ``worker``, found by the parent they were told to watch (so found
    still once that parent is gone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode()
        except OSError:
            continue
        if (
            "\0manage.py\0triggers\0" in command
            and f"\0--exit-with-parent\0{worker}\0" in command
            and alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def one_listeners_process(worker: subprocess.Popen, log: Path) -> int:
    """Wait for the worker's listeners' process, check it is the only one, and return
    its pid."""

    def started() -> bool:
        assert worker.poll() is None, f"the worker exited:\n{log.read_text()}"
        return bool(listeners_of(worker.pid))

    wait_for(started, timeout=60, what="the worker to start its listeners")
    [pid] = listeners_of(worker.pid)
    return pid


def fired_runs_forget(runs: list[str]) -> None:
    """Take the fired runs' messages off the broker's default queue, which no test
    worker serves (each serves a queue of its own): the runs here only prove a firing."""
    client = redis.Redis.from_url(BROKER_URL)
    for key in client.scan_iter(match="celery*"):
        if client.type(key) != b"list":
            continue
        for message in client.lrange(key, 0, -1):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                names = json.loads(message)["headers"]["argsrepr"]
                if any(run in names for run in runs):
                    client.lrem(key, 1, message)
    client.close()


@contextlib.contextmanager
def celery_worker(
    log: Path, *, triggers: bool = True, pool: str = "solo", **env: str
) -> Iterator[subprocess.Popen]:
    """``celery -A agentops worker [--triggers]`` on the test database, its broker on
    Redis (``tests/runtime/test_celery.py``) and a queue of this test process's own;
    everything it started is ended afterwards, whatever the test did to it."""
    queue_clear()
    command = [sys.executable, "-m", "celery", "-A", "agentops", "worker"]
    command += [f"--pool={pool}", "--concurrency=2", "--loglevel=INFO", "-Q", QUEUE]
    command += ["--hostname", f"{QUEUE}-listeners@%h"]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    command += ["--triggers"] if triggers else []
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=worker_env(
                AGENTOPS_QUEUE="celery",
                REDIS_URL=BROKER_URL,
                AGENTOPS_TRIGGER_RELOAD_SECONDS="1",
                **env,
            ),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        left = listeners_of(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        for pid in {*left, *listeners_of(process.pid)}:  # only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        fired_runs_forget([str(pk) for pk in Run.objects.values_list("pk", flat=True)])
        queue_clear()
        connection.close()


def test_a_worker_with_triggers_runs_the_listeners_in_its_main_process_and_stops_them(
    make_task, make_trigger, stream, tmp_path
):
    """The prefork pool's two children start nothing: one listeners' process, the main
    process's child, with the worker's environment (its SMTP port), taking mail; a
    SIGTERM to the worker stops it cleanly before the worker exits."""
    port = free_port()
    trigger = make_trigger(
        Trigger.Kind.EMAIL,
        task=process_task(make_task),
        config={"address": "in@agentops.test", "senders": ["@example.com"]},
    )
    log = tmp_path / "worker.log"
    with celery_worker(
        log, pool="prefork", AGENTOPS_SMTP_LISTEN_HOST=HOST, AGENTOPS_SMTP_LISTEN_PORT=str(port)
    ) as worker:
        listeners = one_listeners_process(worker, log)
        assert parent_of(listeners) == worker.pid
        wait_for(lambda: smtp_answers(port), timeout=60, what="the SMTP listener")
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "a@example.com", "in@agentops.test", "hi"
        mail.set_content("hello")
        with smtplib.SMTP(HOST, port, timeout=20) as smtp:
            smtp.send_message(mail)
        assert Run.objects.filter(trigger=trigger).count() == 1
        wait_for(lambda: "ready." in log.read_text(), what="the worker to be ready")
        assert listeners_of(worker.pid) == [listeners]  # still one, the pool's children none

        worker.send_signal(signal.SIGTERM)  # the main process only: it stops them
        assert worker.wait(timeout=60) == 0, log.read_text()
        assert not alive(listeners)
        assert not smtp_answers(port)
    text = log.read_text()
    assert f"agentops triggers (pid {listeners})" in text
    assert "agentops triggers: stopped" in text and "Traceback" not in text


def test_listeners_that_die_while_the_worker_runs_are_started_again(
    make_task, make_trigger, stream, tmp_path
):
    client, name = stream
    trigger = stream_trigger(make_task, make_trigger, name)
    log = tmp_path / "worker.log"
    with celery_worker(log, AGENTOPS_SMTP_LISTEN_HOST="") as worker:
        first = one_listeners_process(worker, log)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: listeners_of(worker.pid) not in ([], [first]), what="new listeners")
        [second] = listeners_of(worker.pid)
        assert parent_of(second) == worker.pid
        client.xadd(name, {"payload": json.dumps({"n": 1})})
        wait_for(lambda: Run.objects.filter(trigger=trigger).exists(), what="the run")

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
        assert listeners_of(worker.pid) == []
    text = log.read_text()
    assert f"the triggers' listeners (pid {first}) exited with -9; starting them again" in text
    assert f"the triggers' listeners started (pid {second})" in text
    assert Run.objects.get(trigger=trigger).input == {"n": 1}


def test_listeners_whose_worker_is_killed_outright_end_by_themselves(
    make_task, make_trigger, stream, tmp_path
):
    client, name = stream
    trigger = stream_trigger(make_task, make_trigger, name)
    log = tmp_path / "worker.log"
    with celery_worker(log, AGENTOPS_SMTP_LISTEN_HOST="") as worker:
        listeners = one_listeners_process(worker, log)
        wait_for(lambda: "consuming as" in log.read_text(), timeout=60, what="the consumer")

        os.kill(worker.pid, signal.SIGKILL)  # its stop never runs
        worker.wait(timeout=10)
        began = time.monotonic()
        wait_for(
            lambda: not alive(listeners),
            timeout=PARENT_GONE_BOUND,
            what="the listeners to end by themselves",
        )
        assert time.monotonic() - began < PARENT_GONE_BOUND
        # Nothing consumes now: a message sent after waits in its stream.
        client.xadd(name, {"payload": json.dumps({"n": 1})})
        time.sleep(2)
        assert not Run.objects.filter(trigger=trigger).exists()
    text = log.read_text()
    assert f"(pid {worker.pid}) is gone: they stop" in text
    assert "agentops triggers: stopped" in text and "Traceback" not in text


def test_a_worker_without_triggers_starts_no_listeners(stream, tmp_path):
    log = tmp_path / "worker.log"
    with celery_worker(log, triggers=False, AGENTOPS_SMTP_LISTEN_HOST="") as worker:
        wait_for(lambda: "ready." in log.read_text(), timeout=60, what="the worker")
        time.sleep(2)  # past the moment a listeners' process would have appeared
        assert listeners_of(worker.pid) == []
    assert "agentops triggers" not in log.read_text()
