"""The listeners: in this process (``Listeners``: the tick, a consumer per queue
trigger, the SMTP listener, all following the triggers as they change) and as
``manage.py triggers`` (consumes, stops on SIGTERM, outlives a broker that is not
there yet)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import amqp.exceptions
import kombu
import pytest
import redis
from django.db import connection
from django.utils import timezone

from tasks.models import Run, Task, Trigger
from tests.conftest import require
from tests.peers.smtp import HOST, free_port
from tests.peers.workers import ROOT, wait_for, worker_env
from tests.triggers.test_queues import (
    AMQP_URL,
    REDIS_URL,
    amqp_problem,
    messages_ready,
    publish,
    redis_problem,
)
from triggers.listeners import STOP_SECONDS, Listeners
from triggers.models import Firing

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stream() -> Iterator[tuple[redis.Redis, str]]:
    problem = redis_problem()
    require(not problem, problem)
    client = redis.Redis.from_url(REDIS_URL)
    name = f"test-listeners-{time.monotonic_ns()}"
    yield client, name
    client.delete(name, f"{name}.dead")
    client.close()


@pytest.fixture
def attachments_tmp(tmp_path, monkeypatch) -> Path:
    from django.conf import settings

    monkeypatch.setattr(settings, "AGENTOPS_ATTACHMENT_DIR", tmp_path / "attachments")
    return tmp_path / "attachments"


def queue_trigger(make_trigger, stream: str, *, url: str = REDIS_URL) -> Trigger:
    return make_trigger(
        Trigger.Kind.QUEUE, config={"transport": "redis", "url": url, "stream": stream}
    )


@contextlib.contextmanager
def listeners_running(**options) -> Iterator[Listeners]:
    """``Listeners`` in a thread, reading the triggers every second, until the block
    ends; stopping must take no longer than its bound."""
    listeners = Listeners(tick_seconds=0.5, reload_seconds=1.0, **options)
    thread = threading.Thread(target=listeners.run, name="test-listeners")
    thread.start()
    try:
        assert listeners.ready.wait(20), "the listeners did not read the triggers"
        yield listeners
    finally:
        listeners.stop.set()
        began = time.monotonic()
        thread.join(STOP_SECONDS + 10)
        assert not thread.is_alive(), "the listeners did not stop"
        assert time.monotonic() - began < STOP_SECONDS + 2


def smtp_answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, port)) == 0


def test_the_listeners_follow_the_triggers_as_they_are_added_changed_and_disabled(
    make_trigger, stream
):
    client, name = stream
    port = free_port()
    with listeners_running(smtp_host=HOST, smtp_port=port) as listeners:
        assert listeners.consumers == {} and listeners.smtp is None

        # A queue trigger added: its consumer starts and consumes.
        trigger = queue_trigger(make_trigger, name)
        wait_for(lambda: trigger.pk in listeners.consumers, what="the consumer to start")
        client.xadd(name, {"payload": json.dumps({"n": 1})})
        wait_for(lambda: Run.objects.filter(trigger=trigger).count() == 1, what="the run")
        first = listeners.consumers[trigger.pk]

        # Changed: a new consumer replaces it.
        trigger.config = {**trigger.config, "group": "another-group"}
        trigger.save()
        wait_for(
            lambda: listeners.consumers.get(trigger.pk, first) is not first,
            what="the consumer to be replaced",
        )
        wait_for(lambda: not first.thread.is_alive(), what="the old consumer to end")

        # An email trigger enabled: the SMTP listener starts; disabled: it stops.
        mail_trigger = make_trigger(
            Trigger.Kind.EMAIL,
            config={"address": "in@agentops.test", "senders": ["@example.com"]},
        )
        wait_for(lambda: smtp_answers(port), what="the SMTP listener")
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = "a@example.com", "in@agentops.test", "hi"
        mail.set_content("hello")
        with smtplib.SMTP(HOST, port, timeout=20) as smtp:
            smtp.send_message(mail)
        assert Run.objects.filter(trigger=mail_trigger).count() == 1
        Trigger.objects.filter(pk=mail_trigger.pk).update(enabled=False)
        wait_for(lambda: not smtp_answers(port), what="the SMTP listener to stop")

        # The queue trigger disabled: its consumer stops, the message waits in the stream.
        consumer = listeners.consumers[trigger.pk]
        Trigger.objects.filter(pk=trigger.pk).update(enabled=False)
        wait_for(lambda: trigger.pk not in listeners.consumers, what="the consumer to stop")
        wait_for(lambda: not consumer.thread.is_alive(), what="its thread to end")
        client.xadd(name, {"payload": json.dumps({"n": 2})})
        time.sleep(1.5)
        assert Run.objects.filter(trigger=trigger).count() == 1
    assert not smtp_answers(port)


def test_the_listeners_tick_the_schedules(make_trigger):
    trigger = make_trigger(Trigger.Kind.CRON, config={"expression": "* * * * *"})
    # As if ticked last two minutes ago: a slot or two are due now.
    Trigger.objects.filter(pk=trigger.pk).update(cursor=timezone.now() - timedelta(seconds=90))
    with listeners_running(smtp_host=""):
        wait_for(lambda: Run.objects.filter(trigger=trigger).exists(), what="a slot's run")
    assert Firing.objects.filter(trigger=trigger, key__startswith="slot:").exists()


def test_a_consumer_whose_broker_is_not_there_keeps_trying_and_the_others_run(
    make_trigger, stream, caplog
):
    client, name = stream
    closed = free_port()  # nothing listens there
    down = queue_trigger(make_trigger, "anything", url=f"redis://127.0.0.1:{closed}/0")
    up = queue_trigger(make_trigger, name)
    with listeners_running(smtp_host="") as listeners:
        wait_for(lambda: "trying again in" in caplog.text, what="the retry to be logged")
        client.xadd(name, {"payload": json.dumps({"n": 1})})
        wait_for(lambda: Run.objects.filter(trigger=up).exists(), what="the other's run")
        assert listeners.consumers[down.pk].thread.is_alive()
    assert "Traceback" not in caplog.text
    assert f"redis://127.0.0.1:{closed}/0" in caplog.text


def test_a_trigger_whose_config_was_written_around_the_checks_is_not_listened_for(
    make_trigger, caplog
):
    broken = make_trigger(
        Trigger.Kind.QUEUE, config={"transport": "redis", "url": "amqp://h//", "stream": "s"}
    )
    with listeners_running(smtp_host="") as listeners:
        time.sleep(1.5)  # a reload more
        assert listeners.consumers == {}
    said = [r.message for r in caplog.records if "is not listened for" in r.message]
    assert len(said) == 1 and "config/url: a redis transport needs" in said[0]
    assert broken.pk == int(said[0].split()[1])


def test_a_queue_url_written_around_the_checks_never_reads_a_tools_secret(monkeypatch):
    """The listener resolves a broker URL's secrets through the trigger's fence, not the
    tools': a tool's secret in a URL saved past the checks is refused, not sent."""
    from agentops.runtime.secrets import SecretRefused
    from triggers.queues import QueueTrigger

    monkeypatch.setenv("TOOL_SECRET_LEDGER", "ledger-password")
    monkeypatch.setenv("TRIGGER_SECRET_MQ", "mq-password")
    config = {"transport": "redis", "stream": "s", "group": "agentops"}
    stolen = QueueTrigger(
        1, "t", {**config, "url": "redis://:{secret:TOOL_SECRET_LEDGER}@h/0"}, None
    )
    with pytest.raises(SecretRefused, match="not one a trigger may read"):
        stolen.url()
    own = QueueTrigger(2, "t", {**config, "url": "redis://:{secret:TRIGGER_SECRET_MQ}@h/0"}, None)
    assert own.url() == "redis://:mq-password@h/0"


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    """A fresh AMQP queue name; it and its dead-letter queue are deleted after."""
    problem = amqp_problem()
    require(not problem, problem)
    name = f"test-listeners-{time.monotonic_ns()}"
    yield name
    with kombu.Connection(AMQP_URL) as conn:
        for queue in (name, f"{name}.dead"):
            channel = conn.channel()
            with contextlib.suppress(amqp.exceptions.NotFound):
                channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                channel.close()


def rabbitmq_ports_of_this_process() -> set[int]:
    """The local ports of this process's connections to RabbitMQ (its sockets in
    /proc/self/fd, their rows in /proc/self/net/tcp): how the broker names them."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                local, remote, inode = row.split()[1], row.split()[2], row.split()[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 5672:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def rabbitmq_close_connections_of_this_process() -> int:
    """Have the broker close this process's connections (CONNECTION_FORCED, what every
    client of a RabbitMQ that restarts is sent); how many it closed."""
    ours = rabbitmq_ports_of_this_process()
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid", "peer_port"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    closed = 0
    for line in listed.splitlines():
        pid, _, port = line.partition("\t")
        if port.strip().isdigit() and int(port) in ours:
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "the test: as a broker restart"],
                capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            closed += 1
    return closed


@pytest.mark.parametrize("drop", ["the queue deleted", "the connection closed by the broker"])
def test_a_rabbitmq_that_drops_its_consumer_is_said_in_one_line_and_consumed_again(
    make_trigger, amqp_queue, caplog, drop
):
    """A broker that cancels the consumer (its queue deleted) or closes the connection
    (as RabbitMQ does to every client when it restarts): a warning line, no traceback,
    and the consumer back on the queue, which starts the next message's run."""
    if drop == "the connection closed by the broker":
        require(shutil.which("rabbitmqctl") is not None, "rabbitmqctl is not installed")
    trigger = make_trigger(
        Trigger.Kind.QUEUE,
        config={"transport": "amqp", "url": AMQP_URL, "queue": amqp_queue},
    )
    with listeners_running(smtp_host=""):
        wait_for(lambda: "consuming" in caplog.text, what="the consumer to start")
        publish(amqp_queue, json.dumps({"n": 1}), message_id="before")
        wait_for(lambda: Run.objects.filter(trigger=trigger).count() == 1, what="run 1")

        caplog.clear()
        if drop == "the queue deleted":
            with kombu.Connection(AMQP_URL) as conn:
                conn.channel().queue_delete(amqp_queue)
        else:
            assert rabbitmq_close_connections_of_this_process() >= 1
        wait_for(lambda: "trying again in" in caplog.text, what="the drop to be logged")
        wait_for(lambda: "consuming" in caplog.text, what="the consumer to be back")
        wait_for(lambda: messages_ready(amqp_queue) == 0, what="the queue to be there")
        publish(amqp_queue, json.dumps({"n": 2}), message_id="after")
        wait_for(lambda: Run.objects.filter(trigger=trigger).count() == 2, what="run 2")
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert sorted(Run.objects.values_list("input__n", flat=True)) == [1, 2]


# manage.py triggers ----------------------------------------------------------------------


def process_task(make_task) -> Task:
    """A task a process other than this one can start runs of: its scripted model is
    one the tests app installs everywhere (tests/crash_tools.py)."""
    task = make_task([])
    Task.objects.filter(pk=task.pk).update(model="scripted:crash-agent")
    task.refresh_from_db()
    return task


@contextlib.contextmanager
def triggers_process(log: Path, **env: str) -> Iterator[subprocess.Popen]:
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "triggers"],
            cwd=ROOT,
            env={
                **worker_env(
                    AGENTOPS_TRIGGER_RELOAD_SECONDS="1",
                    AGENTOPS_SMTP_LISTEN_HOST=HOST,
                    AGENTOPS_SMTP_LISTEN_PORT=str(free_port()),
                ),
                **env,
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        process.wait(timeout=10)
        connection.close()


def stream_trigger(make_task, make_trigger, name: str) -> Trigger:
    """A queue trigger on the tests' Redis stream ``name``, starting runs of a task that
    ends at once."""
    return make_trigger(
        Trigger.Kind.QUEUE,
        task=process_task(make_task),
        config={"transport": "redis", "url": REDIS_URL, "stream": name},
    )


def test_manage_py_triggers_consumes_and_stops_on_sigterm(
    make_task, make_trigger, stream, tmp_path
):
    client, name = stream
    trigger = stream_trigger(make_task, make_trigger, name)
    log = tmp_path / "triggers.log"
    with triggers_process(log) as process:
        wait_for(lambda: "consuming as" in log.read_text(), what="the consumer to start")
        client.xadd(name, {"payload": json.dumps({"from": "the process"})})
        wait_for(lambda: Run.objects.filter(trigger=trigger).exists(), what="the run")
        # Acknowledged once the run is committed: a moment after it is visible.
        wait_for(lambda: client.xpending(name, "agentops")["pending"] == 0, what="the ack")

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_SECONDS + 5) == 0, log.read_text()
    text = log.read_text()
    assert f"agentops triggers (pid {process.pid})" in text
    assert "agentops triggers: stopped" in text and "Traceback" not in text
    assert Run.objects.get(trigger=trigger).input == {"from": "the process"}


def test_manage_py_triggers_outlives_a_redis_that_is_not_there_yet(
    make_task, make_trigger, tmp_path
):
    """Started while its trigger's Redis is down, it logs and retries; once a Redis
    server listens there, it consumes."""
    server = shutil.which("redis-server")
    require(server is not None, "redis-server is not installed")
    port = free_port()
    trigger = make_trigger(
        Trigger.Kind.QUEUE,
        task=process_task(make_task),
        config={"transport": "redis", "url": f"redis://127.0.0.1:{port}/0", "stream": "late"},
    )
    log = tmp_path / "triggers.log"
    redis_server = None
    try:
        with triggers_process(log) as process:
            wait_for(lambda: "trying again in" in log.read_text(), what="a retry to be logged")
            assert process.poll() is None
            redis_server = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            late = redis.Redis(host="127.0.0.1", port=port)
            wait_for(lambda: _pings(late), what="the Redis server to start")
            late.xadd("late", {"payload": json.dumps({"n": 1})})
            wait_for(
                lambda: Run.objects.filter(trigger=trigger).exists(),
                timeout=90,
                what="the run once Redis is there",
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_SECONDS + 5) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_serve_starts_the_listeners_beside_the_worker_and_stops_them_with_it(tmp_path):
    from tests.test_serve import alive, group_members

    log = tmp_path / "serve.log"
    with log.open("w") as output:
        serve = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(free_port())],
            cwd=ROOT,
            env=worker_env(AGENTOPS_SMTP_LISTEN_PORT=str(free_port())),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    listeners = None
    try:
        wait_for(lambda: "agentops triggers (pid" in log.read_text(), what="the listeners")
        text = log.read_text()
        listeners = int(text.split("the triggers' listeners (pid ")[1].split(")")[0])
        assert f"agentops triggers (pid {listeners})" in text
        assert group_members(listeners) == [listeners]  # a process group of its own

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, log.read_text()
        wait_for(lambda: not alive(listeners), timeout=10, what="the listeners to end")
        text = log.read_text()
        assert "agentops triggers: stopped" in text and "Traceback" not in text
    finally:
        for group in (serve.pid, listeners):
            if group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        serve.wait(timeout=10)


class TcpRelay:
    """A TCP relay on 127.0.0.1 to PostgreSQL, which the test cuts (every connection
    through it dropped, none accepted) and restores: the database going away and
    coming back, as the listeners see it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.server: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            # shutdown() first: on Linux, close() alone leaves a blocked accept() taking
            # connections.
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self.lock:
            for end in self.open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self.open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.open += [client, upstream]
            for one, other in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(one, other), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def test_manage_py_triggers_outlives_the_database_going_away_and_consumes_once_it_is_back(
    make_task, make_trigger, stream, tmp_path
):
    if connection.vendor != "postgresql":
        pytest.skip("the database is a file on SQLite; the PostgreSQL pass cuts its connection")
    client, name = stream
    trigger = stream_trigger(make_task, make_trigger, name)
    settings = connection.settings_dict
    relay = TcpRelay((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432)))
    relay.up()
    user = settings["USER"] + (f":{settings['PASSWORD']}" if settings["PASSWORD"] else "")
    through = f"postgres://{user}@127.0.0.1:{relay.port}/{settings['NAME']}"
    log = tmp_path / "triggers.log"
    try:
        with triggers_process(log, DATABASE_URL=through) as process:
            wait_for(lambda: "consuming as" in log.read_text(), what="the consumer to start")
            client.xadd(name, {"payload": json.dumps({"n": 1})})
            wait_for(lambda: Run.objects.filter(trigger=trigger).count() == 1, what="run 1")

            relay.down()
            client.xadd(name, {"payload": json.dumps({"n": 2})})
            wait_for(lambda: "trying again in" in log.read_text(), what="the failure logged")
            time.sleep(2)
            assert process.poll() is None and Run.objects.filter(trigger=trigger).count() == 1

            relay.up()
            wait_for(
                lambda: Run.objects.filter(trigger=trigger).count() == 2,
                timeout=90,
                what="run 2 once the database is back",
            )
            wait_for(lambda: client.xpending(name, "agentops")["pending"] == 0, what="the ack")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_SECONDS + 5) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
        assert sorted(Run.objects.values_list("input__n", flat=True)) == [1, 2]
    finally:
        relay.down()
