"""``manage.py bench_triggers``: signed webhook deliveries against the running server."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from django.db import connections

from agentops.agent_tools import CHAOS_SCRIPT
from agentops.bench import load_average
from agentops.commands import ParagraphsCommand
from agentops.config import database_from_url
from agentops.management.commands.bench_engine import (
    REEXEC_MARKER,
    command_in_child,
    database_described,
    migrations_check,
    positive_int,
    same_database,
)
from agentops.processes import group_stop
from lineage.models import LineageEvent
from tasks.models import AutonomyLevel, Run, Task, Trigger
from triggers.models import Firing
from triggers.services import trigger_secret_rotate
from triggers.webhooks import webhook_sign

# A scratch file of its own: the engine bench's may be in use at the same time.
SCRATCH_FILE = "bench_triggers.sqlite3"
SERVER_START_SECONDS = 90.0
REQUEST_SECONDS = 60.0
# Every delivery together may take this long before the bench gives up on the rest.
BURST_SECONDS = 1800.0

HELP = """\
Post signed webhook deliveries (Standard Webhooks) to the running server from several
client threads on loopback, each on a connection of its own, and print: deliveries
accepted per second, the p50 and p99 time from a delivery to its queued run (the time to
the 202: the run is queued in the request's own transaction), and the share of
duplicates refused (deliveries that repeat a webhook-id sent before, each answered 200
with the first run and starting nothing).

The bench makes a scratch task and a webhook trigger on it, then starts the server
itself (manage.py runserver on a free loopback port, on the bench's database) unless
--url points it at one already running, which must be on the database the bench writes
to. --duplicates is the share of the deliveries that repeat an id sent earlier, as a
sender's retries do; each duplicate goes after the delivery it repeats in the order
sent, and may race it.

Where it writes: the task, the trigger, its firings, one queued run per distinct id and
their lineage. With no --database-url and no DATABASE_URL it uses the scratch SQLite
file var/bench_triggers.sqlite3 (in AGENTOPS_VAR_DIR), which it migrates itself; otherwise the
database named, already migrated: point it at a scratch database such as
postgres://postgres@127.0.0.1:5432/agentops_bench, not a live one. The runs stay queued
(the task's scripted model plans and answers, with no tool): --cleanup deletes them, the
firings, the trigger and the task at the end (their lineage stays: the trail is
append-only by design).
"""


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share from 0 up to (not) 1")
    return value


def loopback_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// URL")
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") and not parts.hostname.startswith(
        "127."
    ):
        raise argparse.ArgumentTypeError(
            f"{parts.hostname} is not a loopback address: the bench only sends on loopback"
        )
    return f"http://{parts.netloc}"


@dataclass(frozen=True)
class Answer:
    msg_id: str
    status: int
    seconds: float
    run: str
    duplicate: bool
    error: str


class Command(ParagraphsCommand):
    help = HELP

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--deliveries", type=positive_int(1_000_000), default=2000, help="(default 2000)"
        )
        parser.add_argument(
            "--clients", type=positive_int(256), default=8, help="client threads (default 8)"
        )
        parser.add_argument(
            "--duplicates",
            type=share,
            default=0.1,
            help="share of the deliveries that repeat an earlier webhook-id (default 0.1)",
        )
        parser.add_argument(
            "--url",
            type=loopback_url,
            default=None,
            help="a server already running, on the bench's database (default: start one)",
        )
        parser.add_argument(
            "--database-url",
            default="",
            help=f"the database to bench (default: DATABASE_URL, else var/{SCRATCH_FILE})",
        )
        parser.add_argument("--seed", type=int, default=13, help="for the order sent (13)")
        parser.add_argument(
            "--cleanup",
            action="store_true",
            help="delete the runs, firings, trigger and task at the end (lineage stays)",
        )

    def handle(self, *args, **options) -> None:
        scratch_url = f"sqlite:///{settings.VAR_DIR / SCRATCH_FILE}"
        url = options["database_url"] or os.environ.get("DATABASE_URL", "").strip() or scratch_url
        try:
            target = database_from_url("--database-url", url, base_dir=settings.BASE_DIR)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        connection = connections["default"]
        if not same_database(target, connection.settings_dict):
            self.rerun_on(url, options)
            return
        scratch_database = database_from_url("scratch", scratch_url, base_dir=settings.BASE_DIR)
        scratch = same_database(scratch_database, connection.settings_dict)
        if scratch:
            call_command("migrate", interactive=False, verbosity=0)
        else:
            migrations_check(connection)
        self.bench(options, database_url=url, scratch=scratch)

    def rerun_on(self, url: str, options: dict) -> None:
        """Run this command again in a child process whose Django is configured for
        ``url`` (the settings fix the database when they load), passing its output on."""
        if os.environ.get(REEXEC_MARKER):
            raise CommandError(
                f"the bench was started on {url} but Django is configured for "
                f"{database_described(connections['default'].settings_dict)}: "
                f"does {settings.SETTINGS_MODULE} read DATABASE_URL?"
            )
        arguments = ["--database-url", url, "--seed", str(options["seed"])]
        for name in ("deliveries", "clients", "duplicates"):
            arguments += [f"--{name}", str(options[name])]
        if options["url"]:
            arguments += ["--url", options["url"]]
        if options["cleanup"]:
            arguments.append("--cleanup")
        command_in_child(self, "bench_triggers", arguments, database_url=url)

    # The bench ---------------------------------------------------------------------

    def bench(self, options: dict, *, database_url: str, scratch: bool) -> None:
        database = connections["default"].settings_dict
        self.say(
            f"database: {database_described(database)}"
            + (" (a scratch file the bench migrates)" if scratch else "")
        )
        task = bench_task_create()
        trigger = Trigger.objects.create(
            task=task, kind=Trigger.Kind.WEBHOOK, name="bench webhook", input_mapping="data"
        )
        secret = trigger_secret_rotate(trigger=trigger)
        trigger.refresh_from_db()
        try:
            problems = self.measure(options, database_url, trigger, secret)
        finally:
            if options["cleanup"]:
                self.cleanup(task, trigger)
            elif scratch:
                self.say(f"note: the runs are in the scratch file {database['NAME']}")
        if problems:
            raise CommandError("; ".join(problems))

    def measure(self, options: dict, database_url: str, trigger: Trigger, secret: str) -> list[str]:
        """Send the deliveries, print the figures; what disagrees, said."""
        deliveries, clients = options["deliveries"], options["clients"]
        database = connections["default"].settings_dict
        with self.server(options["url"], database_url) as base_url:
            sender = Sender(f"{base_url}/hooks/{trigger.public_id}/", secret)
            warm_ups = self.warm_up(sender, clients, database)
            plan = deliveries_planned(deliveries, options["duplicates"], options["seed"])
            distinct = len(set(plan))
            self.say(
                f"deliveries: {deliveries} from {clients} client threads, a connection each  "
                f"duplicates: {deliveries - distinct} ({(deliveries - distinct) / deliveries:.0%})"
                f" of {distinct} distinct webhook-ids"
            )
            self.say(f"load average before: {load_average() or 'unknown'}")
            answers, seconds = burst(sender, plan, clients=clients)
            self.say(f"load average after: {load_average() or 'unknown'}")

        self.report(answers, seconds, deliveries=deliveries, distinct=distinct)
        runs = Run.objects.filter(trigger=trigger).count()
        accepted = sum(1 for answer in answers if answer.status == 202)
        self.say(
            f"runs queued by the bench trigger: {runs} ({accepted} from the deliveries, "
            f"{warm_ups} from the warm-up)"
        )
        self.say(f"bench task: {trigger.task.slug}  trigger: {trigger.pk}")
        problems = []
        unexpected = Counter(a.status for a in answers if a.status not in (200, 202))
        if unexpected:
            first = next(a for a in answers if a.status not in (200, 202))
            problems.append(
                f"{sum(unexpected.values())} deliveries were not answered 202 or 200 "
                f"({', '.join(f'{s} x{n}' for s, n in sorted(unexpected.items()))}); the first: "
                f"{first.status} {first.error}"
            )
        if runs != accepted + warm_ups:
            problems.append(f"{runs} runs in the database, but {accepted + warm_ups} accepted")
        if accepted != distinct:
            problems.append(f"{accepted} deliveries accepted, but {distinct} distinct ids sent")
        return problems

    def report(self, answers: list[Answer], seconds: float, *, deliveries: int, distinct: int):
        accepted = [a for a in answers if a.status == 202]
        duplicates = [a for a in answers if a.status == 200 and a.duplicate]
        self.say(
            f"deliveries answered: {len(answers)} in {seconds:.3f} s "
            f"({len(answers) / seconds:.1f} per second)"
        )
        self.say(
            f"deliveries accepted per second: {len(accepted) / seconds:.1f} "
            f"({len(accepted)} runs queued)"
        )
        if accepted:
            p50, p99 = percentiles([a.seconds * 1000 for a in accepted])
            self.say(f"delivery to queued run (202), ms: p50 {p50:.1f}  p99 {p99:.1f}")
        sent_again = deliveries - distinct
        if sent_again:
            p50, p99 = percentiles([a.seconds * 1000 for a in duplicates] or [0.0])
            self.say(
                f"duplicates refused: {len(duplicates)} of {sent_again} "
                f"({len(duplicates) / sent_again:.1%}), each answered 200 with its first run "
                f"(ms: p50 {p50:.1f}  p99 {p99:.1f})"
            )
        else:
            self.say("duplicates refused: none sent")
        statuses = Counter(a.status for a in answers)
        self.say("answers: " + ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())))

    def warm_up(self, sender: Sender, clients: int, database: dict) -> int:
        """One delivery per client, outside the figures: the server's first requests pay
        for its imports, and an answer other than 202 says the server is not the bench's
        (another database, another version) before the burst starts."""
        for number in range(clients):
            msg_id = f"warm-up-{number}-{uuid.uuid4().hex}"
            answer = sender.send(msg_id, delivery_data(msg_id))
            if answer.status != 202:
                raise CommandError(
                    f"a warm-up delivery to {sender.url} was answered {answer.status}: "
                    f"{answer.error or 'no JSON answer'}"
                    + (
                        f". Is that server on the bench's database "
                        f"({database_described(database)})?"
                        if answer.status == 404
                        else ""
                    )
                )
        return clients

    @contextlib.contextmanager
    def server(self, url: str, database_url: str) -> Iterator[str]:
        """The server's base URL: ``url``, or a ``manage.py runserver`` started on a
        free loopback port on the bench's database, stopped when the block ends."""
        if url:
            self.say(f"server: {url} (given)")
            yield url
            return
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        environment = {
            **os.environ,
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
            "PYTHONUNBUFFERED": "1",
        }
        with tempfile.TemporaryDirectory(prefix="agentops-bench-triggers-") as directory:
            log_path = Path(directory) / "server.log"
            with log_path.open("w") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        str(settings.BASE_DIR / "manage.py"),
                        "runserver",
                        f"127.0.0.1:{port}",
                        "--noreload",
                    ],
                    cwd=settings.BASE_DIR,
                    env=environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                server_wait(process, base_url, log_path)
                self.say(
                    f"server: {base_url} (manage.py runserver, started by the bench, "
                    f"pid {process.pid}; queue: {settings.AGENTOPS_QUEUE})"
                )
                yield base_url
            finally:
                group_stop(process, grace=10)

    def cleanup(self, task: Task, trigger: Trigger) -> None:
        run_ids = list(Run.objects.filter(task=task).values_list("pk", flat=True))
        events = LineageEvent.objects.filter(run_uuid__in=run_ids).count()
        firings, _ = Firing.objects.filter(trigger=trigger).delete()
        Run.objects.filter(pk__in=run_ids).delete()
        trigger.delete()
        task.delete()
        self.say(
            f"cleanup: deleted {len(run_ids)} runs, {firings} firings, the trigger and the "
            f"task; their {events} lineage events stay: the trail is append-only by design"
        )

    def say(self, line: str) -> None:
        self.stdout.write(line)


# Helpers -----------------------------------------------------------------------------


class Sender:
    """A Standard Webhooks sender: signs each delivery as it sends it."""

    def __init__(self, url: str, secret: str) -> None:
        parts = urlsplit(url)
        self.url, self.secret = url, secret
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path

    def send(self, msg_id: str, data: dict[str, Any]) -> Answer:
        """One delivery on a new connection, timed from the request to the last byte of
        the answer. A connection each, as many senders do: Django's runserver writes an
        answer's headers and body apart, so on a kept-alive connection each answer
        waits out the client's delayed ACK (40 ms), which would be measured instead."""
        body = json.dumps({"type": "bench.delivery", "data": data}).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Connection": "close",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": webhook_sign(
                secret=self.secret, msg_id=msg_id, timestamp=timestamp, body=body
            ),
        }
        connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_SECONDS)
        started = time.perf_counter()
        try:
            connection.request("POST", self.path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            seconds = time.perf_counter() - started
        except OSError as error:
            return Answer(msg_id, 0, time.perf_counter() - started, "", False, str(error))
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": raw[:200].decode(errors="replace")}
        return Answer(
            msg_id,
            response.status,
            seconds,
            str(answer.get("run", "")),
            bool(answer.get("duplicate")),
            str(answer.get("error", "")),
        )


def bench_task_create() -> Task:
    """A scratch task whose runs the server can queue: its model is the chaos command's
    script (agentops.agent_tools), which every process registers at start-up, so a
    server the bench did not start knows it too; with ``calls`` 0 a run only plans and
    answers, and no tool is granted."""
    slug = f"bench-triggers-{uuid.uuid4().hex[:12]}"
    return Task.objects.create(
        slug=slug,
        name=f"Trigger bench {slug}",
        objective_template="Answer webhook delivery {delivery}.",
        input_schema={
            "type": "object",
            "properties": {
                "calls": {"type": "integer", "minimum": 0, "maximum": 0},
                "idempotent_tool": {"type": "string"},
                "plain_tool": {"type": "string"},
                "delivery": {"type": "string"},
            },
            "required": ["calls", "idempotent_tool", "plain_tool", "delivery"],
        },
        model=f"scripted:{CHAOS_SCRIPT}",
        max_steps=10,
        autonomy_level=AutonomyLevel.SUPERVISED,
        self_check=False,
    )


def delivery_data(msg_id: str) -> dict[str, Any]:
    return {"calls": 0, "idempotent_tool": "none", "plain_tool": "none", "delivery": msg_id}


def deliveries_planned(count: int, duplicates: float, seed: int) -> list[str]:
    """The webhook-ids in the order sent: ``duplicates`` of them repeat an id sent
    earlier in the order (never the first), the others are new."""
    rng = random.Random(seed)
    again = (
        set(rng.sample(range(1, count), round((count - 1) * duplicates))) if count > 1 else set()
    )
    prefix = uuid.uuid4().hex[:8]
    order: list[str] = []
    for position in range(count):
        if position in again:
            order.append(rng.choice(order))
        else:
            order.append(f"msg_{prefix}_{position:07d}")
    return order


def burst(sender: Sender, plan: list[str], *, clients: int) -> tuple[list[Answer], float]:
    """Send ``plan`` from ``clients`` threads, each taking the next delivery as it is
    free; the answers and the wall time from the first request to the last answer."""
    pending = iter(plan)
    lock = threading.Lock()
    answers: list[Answer] = []
    deadline = time.monotonic() + BURST_SECONDS

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                msg_id = next(pending, None)
            if msg_id is None:
                return
            answer = sender.send(msg_id, delivery_data(msg_id))
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=client, name=f"bench-client-{n}") for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=BURST_SECONDS + REQUEST_SECONDS)
    seconds = time.perf_counter() - started
    if len(answers) != len(plan):
        raise CommandError(
            f"{len(answers)} of {len(plan)} deliveries answered in {BURST_SECONDS:.0f} s"
        )
    return answers, seconds


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (inclusive: at most the largest value)."""
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_wait(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    """Until the server answers (any HTTP answer), or fail with the end of its log."""
    parts = urlsplit(base_url)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CommandError(
                f"the server stopped (exit status {process.returncode}):\n"
                + log_path.read_text()[-3000:]
            )
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        try:
            connection.request("GET", "/hooks/ready/")
            connection.getresponse().read()
            return
        except OSError:
            time.sleep(0.2)
        finally:
            connection.close()
    raise CommandError(
        f"the server did not answer within {SERVER_START_SECONDS:.0f} s:\n"
        + log_path.read_text()[-3000:]
    )
