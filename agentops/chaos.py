"""The chaos run's parts (``manage.py chaos``): the effect sink, the worker processes it
kills, the database it restarts, and the tally of what came of it.

The far side is an HTTP service on 127.0.0.1 (``EffectSink``) that records every request
an http tool sends it: the tool, the ``Idempotency-Key`` header (``<run id>:<step
number>``, agentops.runtime.tools.http), the call's number from the body, the time. Its
idempotent side honours the key as a real idempotent API does: the first request makes
the effect, a repeat is answered the first answer again and counted as a re-send. Its
other side makes an effect for every request. From those records and the database, the
tally (``chaos_tally``) counts what must stay zero:

- a **duplicate effect**: one call (a run's call number n) that took effect more than
  once at the far side, under one key or several;
- a **blind re-fire**: a request to the non-idempotent side with a key it had already
  received, i.e. a step's call sent again without a person saying so;
- a **lost run**: see ``RunLost``;
- a **broken chain**: a run's lineage that does not verify against the signed
  checkpoints (lineage.verification);
- a **record that disagrees with the far side**: a call recorded as succeeded that the
  far side never made, or with another answer than the one it gave; an effect whose key
  names no tool step (the call fired before its ``started`` entry was committed).

What is allowed: a call in flight when its worker died, to a non-idempotent tool, ends
``unknown`` and its run waits for a person (guarantee 2); the tally counts them, and how
many of those calls the far side did make.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from django.db.models import Count, Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from agentops.agent_tools import CHAOS_SCRIPT
from agentops.processes import group_stop
from approvals.models import Approval, ApprovalKind, ApprovalStatus
from lineage.models import LineageEvent
from tasks.models import (
    AutonomyLevel,
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Task,
    Tool,
    ToolGrant,
)

IDEMPOTENT_PATH = "/charge"  # the far side of the idempotent tool: honours the key
PLAIN_PATH = "/send"  # the far side of the other: every request is an effect
SIDES = {IDEMPOTENT_PATH: "idempotent", PLAIN_PATH: "plain"}
CALL_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1}},
    "required": ["n"],
    "additionalProperties": False,
}
# The workers are stopped once every run is at rest (or at the time bound, when a stop
# without grace is one more crash the runs recover from): a short grace is enough.
STOP_GRACE_SECONDS = 2.0


# The effect sink ----------------------------------------------------------------------


@dataclass(frozen=True)
class SinkRequest:
    """One request the sink received, as it was recorded on arrival."""

    at: float  # time.time()
    side: str  # "idempotent" or "plain"
    key: str
    n: int | None  # the call's number in its run, from the body
    applied: bool  # it made an effect (False: a re-send answered from the key)
    answer: dict

    @property
    def run_id(self) -> str:
        return self.key.rpartition(":")[0]


class EffectSink:
    """The far side of the chaos run's two http tools, on 127.0.0.1 in a thread of the
    command's process, so that a worker killed mid-call does not take it along. Each
    request is recorded, and its effect made, as it arrives; the answer follows after
    ``latency`` seconds, the time a real API takes, during which a kill leaves a call
    made and its outcome unrecorded."""

    def __init__(self, *, latency: float) -> None:
        self.latency = latency
        self._lock = threading.Lock()
        self._requests: list[SinkRequest] = []
        self._answers: dict[str, dict] = {}  # the idempotent side's first answer per key
        self._effects = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                side = SIDES.get(self.path)
                if side is None:
                    self.answer(404, {"error": f"no route {self.path}"})
                    return
                key = self.headers.get("Idempotency-Key", "")
                if not key:
                    self.answer(400, {"error": "an Idempotency-Key header is required"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as error:
                    self.answer(400, {"error": f"the body is not JSON: {error.msg}"})
                    return
                n = body.get("n") if isinstance(body, dict) else None
                request = sink.record(side, key, n if isinstance(n, int) else None)
                time.sleep(sink.latency)
                self.answer(200, request.answer, replayed=not request.applied)

            def answer(self, status: int, body: dict, *, replayed: bool = False) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if replayed:
                        self.send_header("Idempotent-Replayed", "true")
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller was killed while it waited: the effect stands

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # a hundred runs' calls may arrive at once

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def record(self, side: str, key: str, n: int | None) -> SinkRequest:
        """Make the effect, or, on the idempotent side, answer a known key's first answer."""
        with self._lock:
            known = self._answers.get(key) if side == "idempotent" else None
            if known is None:
                self._effects += 1
                answer = {"effect": self._effects, "side": side, "key": key, "n": n}
                if side == "idempotent":
                    self._answers[key] = answer
            request = SinkRequest(
                at=time.time(),
                side=side,
                key=key,
                n=n,
                applied=known is None,
                answer=known or answer,
            )
            self._requests.append(request)
            return request

    def requests(self) -> list[SinkRequest]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> EffectSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# The task -----------------------------------------------------------------------------


def chaos_task_create(*, sink: EffectSink, calls: int, timeout: float) -> Task:
    """A fresh autonomous task on the chaos script, granted two http tools of its own
    against the sink: one idempotent (a payment API that honours the key), one not (a
    mail relay). Both irreversible: at Autonomous they run without a person."""
    suffix = uuid.uuid4().hex[:8]
    tools = {}
    for path, idempotent in ((IDEMPOTENT_PATH, True), (PLAIN_PATH, False)):
        name = f"chaos_{'charge' if idempotent else 'send'}_{suffix}"
        tools[path] = Tool.objects.create(
            name=name,
            kind=Tool.Kind.HTTP,
            description=(
                "Charge at the chaos sink; a repeat with the same key has no new effect."
                if idempotent
                else "Send through the chaos sink; every request is an effect."
            ),
            input_schema=CALL_SCHEMA,
            side_effect="irreversible",
            idempotency=Tool.Idempotency.KEY if idempotent else Tool.Idempotency.NONE,
            config={
                "method": "POST",
                "url": sink.url + path,
                "body": "$arguments",
                "allowed_hosts": ["127.0.0.1"],
                "allow_private": True,  # the sink is on this machine's loopback
            },
            timeout_seconds=timeout,
        )
    slug = f"chaos-{suffix}"
    task = Task.objects.create(
        slug=slug,
        name=f"Chaos run {slug}",
        objective_template="Make {calls} side-effecting calls, then report.",
        input_schema={
            "type": "object",
            "properties": {
                "calls": {"type": "integer", "minimum": 1},
                "idempotent_tool": {"type": "string"},
                "plain_tool": {"type": "string"},
            },
            "required": ["calls", "idempotent_tool", "plain_tool"],
        },
        model=f"scripted:{CHAOS_SCRIPT}",
        # The plan, a turn and a call per call, the answer, and room for what a recovery
        # adds (a retried call is the same step).
        max_steps=2 * calls + 20,
        autonomy_level=AutonomyLevel.AUTONOMOUS,
        self_check=False,
    )
    for tool in tools.values():
        ToolGrant.objects.create(task=task, tool=tool)
    return task


def chaos_input(task: Task, calls: int) -> dict[str, Any]:
    names = dict(task.grants.values_list("tool__idempotency", "tool__name"))
    return {
        "calls": calls,
        "idempotent_tool": names[Tool.Idempotency.KEY],
        "plain_tool": names[Tool.Idempotency.NONE],
    }


def runs_in_progress(runs: QuerySet[Run]) -> QuerySet[Run]:
    """Runs not at rest: not ended, and not waiting for a person (a waiting run with no
    pending question is waiting for nothing anyone will answer)."""
    pending = Approval.objects.filter(run=OuterRef("pk"), status=ApprovalStatus.PENDING)
    return runs.filter(
        Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
        | (Q(status=RunStatus.WAITING) & ~Exists(pending))
    )


# The worker processes ------------------------------------------------------------------


@dataclass
class WorkerGroup:
    """One queue worker the command started (a ``qcluster``, or a Celery worker with its
    pool), in a process group of its own: its pid is the group's id."""

    number: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True)
class Kill:
    at: float  # seconds since the runs were sent
    kind: str  # "process": one worker process; "group": a whole worker, pool and all
    pid: int
    group: int
    runs_held: int  # runs whose live lease the killed processes held


class WorkerPool:
    """The worker processes: started, killed with SIGKILL, replaced. A kill never
    reaches a process outside the groups this pool started (each is checked against
    /proc for its process group first)."""

    def __init__(
        self,
        *,
        queue: str,
        processes: int,
        environment: dict[str, str],
        log: Path,
        root: Path,
    ) -> None:
        self.queue = queue
        self.processes = processes
        self.environment = environment
        self.log = log
        self.root = root
        self.groups: list[WorkerGroup] = []
        self.started = 0
        self.stopped_by_themselves: list[tuple[int, int | None]] = []  # (group, status)
        self.host = socket.gethostname()

    def command(self, number: int) -> list[str]:
        if self.queue == "celery":
            command = [sys.executable, "-m", "celery", "-A", "agentops", "worker"]
            command += ["--pool=prefork", f"--concurrency={self.processes}"]
            command += ["--loglevel=WARNING", "--hostname", f"chaos-{os.getpid()}-{number}@%h"]
            command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
            return command
        return [sys.executable, str(self.root / "manage.py"), "qcluster"]

    def group_start(self) -> WorkerGroup:
        self.started += 1
        number = self.started
        with self.log.open("a") as output:
            output.write(f"\n--- chaos: worker {number} starting ---\n")
            output.flush()
            process = subprocess.Popen(
                self.command(number),
                cwd=self.root,
                env=self.environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: its children end with it
            )
        group = WorkerGroup(number=number, process=process)
        self.groups.append(group)
        return group

    def start(self, count: int) -> None:
        for _ in range(count):
            self.group_start()

    def replace_stopped(self) -> None:
        """A worker that stopped by itself (it should not) is replaced, and noted."""
        for group in list(self.groups):
            if group.process.poll() is not None:
                self.stopped_by_themselves.append((group.number, group.process.returncode))
                self.groups.remove(group)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group.pid, signal.SIGKILL)  # what is left of its pool
                self.group_start()

    def group_of(self, pid: int) -> WorkerGroup | None:
        """The pool's group ``pid`` belongs to, read from /proc; None for any other."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        pgrp = int(fields[2])
        return next((g for g in self.groups if g.pid == pgrp and g.process.poll() is None), None)

    def lease_holders(self) -> dict[int, int]:
        """The pool's live processes holding a live lease now: pid -> how many runs."""
        owners = Run.objects.filter(
            status=RunStatus.RUNNING, lease_expires_at__gt=timezone.now()
        ).values_list("lease_owner", flat=True)
        held: Counter[int] = Counter()
        for owner in owners:
            host, _, rest = owner.partition(":")
            pid = rest.partition(":")[0]
            if host == self.host and pid.isdigit() and self.group_of(int(pid)) is not None:
                held[int(pid)] += 1
        return dict(held)

    def kill(self, rng: random.Random, *, mode: str, at: float) -> Kill | None:
        """SIGKILL one worker process holding a run (its queue's master starts another),
        or a whole worker (this pool starts another): ``mode`` "process", "group", or
        "mixed" (either, at random). With no process holding a run, a whole worker is
        killed; it is chosen among those holding a run, where any does. None when there
        is no worker to kill."""
        holders = self.lease_holders()
        kind = mode if mode != "mixed" else rng.choice(["process", "group"])
        if kind == "process" and holders:
            pid = rng.choice(sorted(holders))
            group = self.group_of(pid)
            if group is not None and pid != group.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return Kill(at, "process", pid, group.number, holders[pid])
        # A whole worker: one that holds a run, where any does.
        busy = {self.group_of(pid).number for pid in holders if self.group_of(pid) is not None}
        live = [g for g in self.groups if g.process.poll() is None]
        choices = [g for g in live if g.number in busy] or live
        if not choices:
            return None
        group = rng.choice(choices)
        runs_held = sum(n for pid, n in holders.items() if self.group_of(pid) is group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pid, signal.SIGKILL)
        group.process.wait()
        self.groups.remove(group)
        self.group_start()
        return Kill(at, "group", group.pid, group.number, runs_held)

    def stop(self) -> None:
        """Stop every worker still running, gracefully first, their groups surely."""
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                group.process.terminate()
        for group in self.groups:
            group_stop(group.process, grace=STOP_GRACE_SECONDS)
        self.groups.clear()


# PostgreSQL restarts --------------------------------------------------------------------

LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class PostgresCluster:
    """The PostgreSQL cluster on this machine that serves the chaos run's database, as
    Debian's postgresql-common names it (``pg_lsclusters``), restarted with
    ``pg_ctlcluster``."""

    version: str
    name: str
    port: int

    @classmethod
    def serving(cls, database: dict) -> PostgresCluster:
        """The local cluster on the database's port; ``ValueError`` saying why not."""
        host = str(database.get("HOST") or "")
        if host not in LOCAL_HOSTS and not host.startswith("/"):
            raise ValueError(
                f"the database is on {host}: --restart-db restarts a cluster on this machine only"
            )
        if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
            raise ValueError(
                "--restart-db needs pg_lsclusters and pg_ctlcluster (postgresql-common)"
            )
        port = int(database.get("PORT") or 5432)
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
        )
        for line in listing.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[2] == str(port):
                owner = fields[4]
                if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != owner:
                    raise ValueError(
                        f"--restart-db: restarting PostgreSQL {fields[0]}/{fields[1]} takes "
                        f"root or its owner, {owner}"
                    )
                return cls(version=fields[0], name=fields[1], port=port)
        raise ValueError(f"no PostgreSQL cluster on port {port} in pg_lsclusters")

    def control(self, action: str) -> None:
        command = ["pg_ctlcluster", "--skip-systemctl-redirect"]
        if action in ("restart", "stop"):
            command += ["--mode", "fast"]
        command += [self.version, self.name, action]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
            )

    def online(self) -> bool:
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header", self.version, self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        return "online" in listing.stdout

    def accepts(self, conninfo: dict[str, Any], *, within: float = 60.0) -> bool:
        """Whether the server answers a new connection within ``within`` seconds."""
        import psycopg

        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                psycopg.connect(**conninfo, connect_timeout=2).close()
                return True
            except psycopg.Error:
                time.sleep(0.2)
        return False

    def restart(self, conninfo: dict[str, Any]) -> float:
        """Restart the cluster (a fast shutdown: every connection is ended, as a crash
        or a failover ends them) and wait until it answers again; the seconds it took."""
        started = time.monotonic()
        self.control("restart")
        if not self.accepts(conninfo):
            raise RuntimeError(f"PostgreSQL {self.version}/{self.name} did not come back in 60 s")
        return time.monotonic() - started

    def ensure_running(self) -> None:
        """Left running, whatever happened: started again if a restart was cut short."""
        if not self.online():
            self.control("start")


def conninfo_of(database: dict) -> dict[str, Any]:
    info = {
        "dbname": database["NAME"],
        "user": database.get("USER") or None,
        "password": database.get("PASSWORD") or None,
        "host": database.get("HOST") or None,
        "port": database.get("PORT") or None,
    }
    return {key: value for key, value in info.items() if value}


# The tally ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLost:
    """A run that is not at rest (not ended, not waiting for a person) when the chaos
    run ends, and that nothing has moved for longer than a recovery takes (``stall``:
    a lease, the reaper's wait for a queued run, two reaper passes and a margin). No
    worker holds it, and none will take it up: without a person it stays where it is.
    A run not at rest that did move within ``stall`` is not lost but unfinished: the
    time bound came first."""

    run_id: uuid.UUID
    status: str
    lease_owner: str
    lease_live: bool  # its deadline not yet passed when the chaos run ended
    owner_alive: bool  # its owner's process was running then
    idle_seconds: float
    last_event: str

    def describe(self) -> str:
        if self.lease_owner:
            expiry = "live" if self.lease_live else "expired"
            lease = (
                f"lease of {self.lease_owner} ({expiry}; that process is "
                f"{'alive' if self.owner_alive else 'gone'})"
            )
        else:
            lease = "no lease"
        return (
            f"run {self.run_id}: {self.status}, {lease}, nothing written for "
            f"{self.idle_seconds:.0f} s (last event: {self.last_event or 'none'})"
        )


@dataclass
class ChaosTally:
    runs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    waiting_unknown: int = 0  # runs waiting for a person on an unknown outcome
    waiting_other: dict[str, int] = field(default_factory=dict)  # other questions, by kind
    reasons: dict[str, int] = field(default_factory=dict)  # failed/halted reasons
    tool_steps: dict[str, int] = field(default_factory=dict)  # by status
    unknown_steps: int = 0
    unknown_made: int = 0  # of those, calls the far side did make
    requests: int = 0
    effects: dict[str, int] = field(default_factory=dict)  # by side
    resends: int = 0  # idempotent re-sends answered from the key
    duplicate_effects: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    blind_refires: int = 0
    refire_examples: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    lost: list[RunLost] = field(default_factory=list)
    unfinished: list[RunLost] = field(default_factory=list)
    chains: int = 0
    chains_broken: list[str] = field(default_factory=list)
    recoveries: int = 0  # run.recovered events
    retried: int = 0  # tool.retried events

    @property
    def zeros_hold(self) -> bool:
        return not (self.duplicate_effects or self.blind_refires or self.lost)

    @property
    def passed(self) -> bool:
        return (
            self.zeros_hold
            and not self.chains_broken
            and not self.disagreements
            and not self.unfinished
        )


EXAMPLES_KEPT = 5


def sink_tally(tally: ChaosTally, requests: list[SinkRequest]) -> dict[str, list[SinkRequest]]:
    """The far side's counts; returns its requests by key."""
    by_key: dict[str, list[SinkRequest]] = defaultdict(list)
    by_call: dict[tuple[str, int | None], list[SinkRequest]] = defaultdict(list)
    effects: Counter[str] = Counter()
    for request in requests:
        by_key[request.key].append(request)
        if request.applied:
            effects[request.side] += 1
            by_call[(request.run_id, request.n)].append(request)
        else:
            tally.resends += 1
    tally.requests = len(requests)
    tally.effects = dict(effects)
    for (run_id, n), made in sorted(by_call.items(), key=lambda item: str(item[0])):
        if len(made) > 1:
            tally.duplicate_effects += len(made) - 1
            if len(tally.duplicate_examples) < EXAMPLES_KEPT:
                keys = ", ".join(f"{r.side} {r.key}" for r in made)
                tally.duplicate_examples.append(
                    f"run {run_id} call {n} took effect {len(made)} times ({keys})"
                )
    for key, received in by_key.items():
        plain = [r for r in received if r.side == "plain"]
        if len(plain) > 1:
            tally.blind_refires += len(plain) - 1
            if len(tally.refire_examples) < EXAMPLES_KEPT:
                tally.refire_examples.append(
                    f"{key} sent {len(plain)} times to the non-idempotent side"
                )
    return by_key


def ledger_tally(
    tally: ChaosTally, steps: list[dict[str, Any]], by_key: dict[str, list[SinkRequest]]
) -> None:
    """The tool steps against the far side's records."""
    statuses: Counter[str] = Counter()
    keys = set()
    for step in steps:
        statuses[step["status"]] += 1
        key = step["idempotency_key"]
        keys.add(key)
        made = [r for r in by_key.get(key, []) if r.applied]
        if step["status"] == StepStatus.UNKNOWN:
            tally.unknown_steps += 1
            tally.unknown_made += bool(made)
        elif step["status"] == StepStatus.SUCCEEDED:
            result = step["result"] if isinstance(step["result"], dict) else {}
            if not made:
                tally.disagreements.append(
                    f"step {key} ({step['tool_name']}) is recorded as succeeded, but the far "
                    "side never made that call"
                )
            elif result.get("body") not in [r.answer for r in by_key[key]]:
                tally.disagreements.append(
                    f"step {key} ({step['tool_name']}) recorded {result.get('body')!r}; the "
                    f"far side answered {by_key[key][0].answer!r}"
                )
    for key, received in by_key.items():
        if key not in keys:
            tally.disagreements.append(
                f"the far side made a call with key {key} ({received[0].side}), which no "
                "tool step of the chaos runs carries"
            )
    tally.tool_steps = dict(statuses)


def lease_owners_alive(runs: QuerySet[Run]) -> set[str]:
    """The lease owners of ``runs`` whose process runs on this machine now, read from
    /proc (a lease owner is ``host:pid:nonce``, agentops.runtime.engine.context)."""
    host = socket.gethostname()
    alive = set()
    for owner in runs.exclude(lease_owner="").values_list("lease_owner", flat=True):
        owner_host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if owner_host == host and pid.isdigit() and Path(f"/proc/{pid}").exists():
            alive.add(owner)
    return alive


def runs_tally(
    tally: ChaosTally,
    runs: QuerySet[Run],
    *,
    stall: float,
    ended_at: datetime,
    owners_alive: set[str],
) -> None:
    """Runs by status, what the waiting ones wait for, and the runs not at rest when the
    chaos run ended (``ended_at``, when ``owners_alive`` were the lease owners alive)."""
    tally.runs = runs.count()
    tally.by_status = dict(runs.values("status").annotate(n=Count("pk")).values_list("status", "n"))
    pending = Approval.objects.filter(run__in=runs, status=ApprovalStatus.PENDING)
    kinds = Counter(
        dict(
            pending.values("kind").annotate(n=Count("run", distinct=True)).values_list("kind", "n")
        )
    )
    tally.waiting_unknown = kinds.pop(ApprovalKind.UNKNOWN_OUTCOME, 0)
    tally.waiting_other = dict(kinds)
    ended_badly = runs.filter(status__in=[RunStatus.FAILED, RunStatus.HALTED, RunStatus.CANCELLED])
    tally.reasons = dict(
        Counter(
            f"{status}: {' '.join(reason.split())[:160]}"
            for status, reason in ended_badly.values_list("status", "reason")
        )
    )
    for run in runs_in_progress(runs):
        last = (
            LineageEvent.objects.filter(run_uuid=run.pk)
            .order_by("-seq")
            .values("kind", "at")
            .first()
        )
        # An event written after the end (a job let finish as its worker stopped) is 0.
        idle = max(0.0, (ended_at - last["at"]).total_seconds()) if last else float("inf")
        record = RunLost(
            run_id=run.pk,
            status=run.status,
            lease_owner=run.lease_owner,
            lease_live=run.lease_expires_at is not None and run.lease_expires_at > ended_at,
            owner_alive=run.lease_owner in owners_alive,
            idle_seconds=idle,
            last_event=last["kind"] if last else "",
        )
        (tally.lost if idle > stall else tally.unfinished).append(record)


def events_tally(tally: ChaosTally, run_ids: list[uuid.UUID]) -> None:
    kinds = Counter(
        dict(
            LineageEvent.objects.filter(
                run_uuid__in=run_ids, kind__in=["run.recovered", "tool.retried"]
            )
            .values("kind")
            .annotate(n=Count("pk"))
            .values_list("kind", "n")
        )
    )
    tally.recoveries = kinds["run.recovered"]
    tally.retried = kinds["tool.retried"]


def chains_tally(tally: ChaosTally, run_ids: list[uuid.UUID]) -> None:
    """Every run's lineage recomputed and held against the signed checkpoints that the
    workers wrote as the runs ended (lineage.verification)."""
    from lineage.anchoring import ledger_load
    from lineage.verification import run_verify

    ledger = ledger_load()
    tally.chains_broken += [f"the checkpoint log: {problem}" for problem in ledger.problems]
    for run_id in run_ids:
        report = run_verify(run_uuid=run_id, ledger=ledger)
        tally.chains += 1
        if not report.intact:
            tally.chains_broken.append(f"run {run_id}: {report.problem}")


def chaos_tally(
    task: Task, sink: EffectSink, *, stall: float, ended_at: datetime, owners_alive: set[str]
) -> ChaosTally:
    """What came of the chaos run, from the database and the far side's records. Read
    once the workers are stopped, so that nothing moves while it is counted; what only
    the moment the chaos ended can say is given (``runs_tally``)."""
    tally = ChaosTally()
    runs = Run.objects.filter(task=task)
    run_ids = list(runs.values_list("pk", flat=True))
    by_key = sink_tally(tally, sink.requests())
    steps = list(
        Step.objects.filter(run__in=run_ids, kind=StepKind.TOOL).values(
            "idempotency_key", "tool_name", "status", "result"
        )
    )
    ledger_tally(tally, steps, by_key)
    runs_tally(tally, runs, stall=stall, ended_at=ended_at, owners_alive=owners_alive)
    events_tally(tally, run_ids)
    chains_tally(tally, run_ids)
    return tally
