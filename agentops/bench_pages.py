"""The operator's pages at scale (``manage.py bench_pages``): the volume seeded, and the
pages timed.

Seeding writes what the engine would have written over a month of work, straight into
the tables with PostgreSQL's COPY (psycopg 3): tasks, tools and grants made through the
ORM (a few rows), then runs, their steps, approvals and each run's lineage trail. The
trail's events are real: each one's canonical text and hash are made as
``lineage.services`` makes them, chained from the genesis hash, so the lineage page
verifies them as it would a worker's.

The pages are only requested, by URL, through Django's test client as a superuser:
nothing here depends on how a page reads its data, so the pages can change under it.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection, models, reset_queries, transaction
from django.utils import timezone

from lineage.models import GENESIS_HASH, HASH_CANONICAL, LineageEvent
from lineage.services import COLUMNS as EVENT_COLUMNS
from lineage.services import event_document, event_hash, json_canonical

# The volume of the issue: 100,000 runs, about 1,000,000 steps and as many events.
DEFAULT_RUNS = 100_000
DEFAULT_STEPS_PER_RUN = 10
# The run the single-run pages are timed on: this many steps, and as many events.
LONG_RUN_STEPS = 500
LONG_RUN_ID = uuid.uuid5(uuid.NAMESPACE_URL, "agentops:bench_pages:long-run")
TASK_PREFIX = "bench-pages-"
ADMIN_USERNAME = "bench-pages-admin"
APPROVER_GROUP = "bench-pages-approvers"
# Runs are spread over this many days before the seeding.
DAYS = 30
SEED = 14
# Every DECIDED_EVERY-th ended run had one call approved or rejected by a person.
DECIDED_EVERY = 12
# Live runs: few, and recent (a month's runs have long ended).
QUEUED_RUNS = 40
RUNNING_RUNS = 25
WAITING_SHARE = 0.002  # of the runs: each waits on a person, with a pending approval
ENDED_SHARES = (("succeeded", 0.88), ("failed", 0.07), ("halted", 0.025), ("cancelled", 0.025))

TASKS = (
    ("invoices", "Reconcile an invoice batch", "gpt-4o-mini"),
    ("support-triage", "Triage the support queue", "gpt-4.1"),
    ("refunds", "Approve and issue refunds", "gpt-4.1"),
    ("vendor-onboarding", "Onboard a vendor", "gpt-4o-mini"),
    ("churn-report", "Write the weekly churn report", "gpt-4o"),
    ("access-reviews", "Review dormant accounts", "gpt-4o-mini"),
)
# name, side effect
TOOLS = (
    ("ledger_lookup", "read"),
    ("invoice_fetch", "read"),
    ("crm_search", "read"),
    ("sql_report", "read"),
    ("ticket_update", "reversible"),
    ("account_disable", "reversible"),
    ("refund_issue", "irreversible"),
    ("notice_send", "irreversible"),
)
TOOLS_PER_TASK = 4
PRICE_IN, PRICE_OUT = Decimal("0.0000025"), Decimal("0.00001")  # per token


# The volume ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """What a seeded database holds: ``runs`` runs, one of them the long run of
    ``LONG_RUN_STEPS`` steps, the others ``steps_per_run`` steps each; each run has as
    many lineage events as steps."""

    runs: int
    steps_per_run: int

    @property
    def steps(self) -> int:
        return (self.runs - 1) * self.steps_per_run + LONG_RUN_STEPS

    @property
    def events(self) -> int:
        return self.steps


@dataclass(frozen=True)
class Held:
    """What the database holds now (the bench's figures are checked against it)."""

    runs: int
    steps: int
    events: int
    approvals: int
    pending: int


def held_now() -> Held:
    from approvals.models import Approval, ApprovalStatus
    from tasks.models import Run, Step

    return Held(
        runs=Run.objects.count(),
        steps=Step.objects.count(),
        events=LineageEvent.objects.count(),
        approvals=Approval.objects.count(),
        pending=Approval.objects.filter(status=ApprovalStatus.PENDING).count(),
    )


def holds_volume(held: Held, volume: Volume) -> bool:
    return (held.runs, held.steps, held.events) == (volume.runs, volume.steps, volume.events)


# Seeding -------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    id: uuid.UUID
    task: int  # index into the seeded tasks
    status: str
    created_at: datetime
    steps: int


@dataclass
class Seeded:
    """The rows made through the ORM, which the COPYs refer to."""

    admin_id: int
    group_id: int
    task_ids: list[int] = field(default_factory=list)
    task_slugs: list[str] = field(default_factory=list)
    version_ids: list[int] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    # Per task: its granted tools as (id, name, side effect).
    grants: list[list[tuple[int, str, str]]] = field(default_factory=list)


def seed(volume: Volume, *, now: datetime | None = None) -> float:
    """Fill an empty, migrated database with ``volume``; returns the seconds it took.
    One transaction: a seeding that fails leaves the database empty."""
    started = time.perf_counter()
    now = now or timezone.now()
    rng = random.Random(SEED)
    with transaction.atomic():
        seeded = definitions_create()
        runs = runs_planned(volume, seeded, now, rng)
        with connection.cursor() as cursor:
            copy_rows(cursor, "tasks.Run", RUN_COLUMNS, run_rows(runs, seeded, now, rng))
            step_ids = steps_copy(cursor, runs, seeded, rng)
            copy_rows(
                cursor,
                "approvals.Approval",
                APPROVAL_COLUMNS,
                approval_rows(runs, seeded, step_ids, now, rng),
            )
            copy_rows(cursor, "lineage.LineageEvent", EVENT_COLUMNS, event_rows(runs, seeded))
    with connection.cursor() as cursor:
        # Outside the transaction (VACUUM cannot run in one): the statistics the planner
        # needs, and the visibility map an index-only scan needs, as autovacuum would
        # have made them on a database that grew over a month.
        for model in ("tasks.Run", "tasks.Step", "approvals.Approval", "lineage.LineageEvent"):
            cursor.execute(f"VACUUM ANALYZE {table_of(model)}")
    return time.perf_counter() - started


def definitions_create() -> Seeded:
    """The superuser, an approver group, the tools, the tasks with their grants and
    their first versions: through the ORM and the task service, as an admin makes them."""
    from django.contrib.auth.models import Group, User

    from tasks.models import Task, Tool, ToolGrant
    from tasks.services import task_version_current

    admin = User.objects.filter(username=ADMIN_USERNAME).first()
    if admin is None:
        admin = User.objects.create_superuser(ADMIN_USERNAME, "bench@localhost", None)
    group, _ = Group.objects.get_or_create(name=APPROVER_GROUP)
    tools = [
        Tool.objects.create(
            name=name,
            description=f"The bench's {name.replace('_', ' ')}.",
            input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
            side_effect=side_effect,
        )
        for name, side_effect in TOOLS
    ]
    seeded = Seeded(admin_id=admin.pk, group_id=group.pk)
    for number, (slug, name, model) in enumerate(TASKS):
        task = Task.objects.create(
            slug=TASK_PREFIX + slug,
            name=name,
            objective_template=name + " for {reference}.",
            input_schema={
                "type": "object",
                "properties": {"reference": {"type": "string"}, "amount": {"type": "number"}},
                "required": ["reference"],
            },
            example_input={"reference": "REF-0001", "amount": 120.5},
            model=model,
            max_spend=Decimal("2.00"),
            approver_group=group if number % 2 else None,
        )
        granted = [tools[(number + k) % len(tools)] for k in range(TOOLS_PER_TASK)]
        for tool in granted:
            ToolGrant.objects.create(task=task, tool=tool)
        version = task_version_current(task=task, user=admin)
        seeded.task_ids.append(task.pk)
        seeded.task_slugs.append(task.slug)
        seeded.version_ids.append(version.pk)
        seeded.models.append(model)
        seeded.grants.append([(tool.pk, tool.name, tool.side_effect) for tool in granted])
    return seeded


def runs_planned(volume: Volume, seeded: Seeded, now: datetime, rng: random.Random) -> list:
    """Every run's id, task, status, creation time and number of steps, oldest first.
    Live runs are the latest ones (queued and running in the last minutes, waiting in
    the last days); the rest ended, spread over ``DAYS`` days."""
    tasks = len(seeded.task_ids)
    others = volume.runs - 1
    waiting = min(others, max(1, round(others * WAITING_SHARE)))
    running = min(others - waiting, RUNNING_RUNS)
    queued = min(others - waiting - running, QUEUED_RUNS)
    ended = others - waiting - running - queued
    statuses = [status for status, _ in ENDED_SHARES]
    weights = [share for _, share in ENDED_SHARES]
    runs = []
    span = DAYS * 86400
    for number in range(ended):
        created = now - timedelta(seconds=span * (1 - (number + rng.random()) / ended) + 3600)
        status = rng.choices(statuses, weights)[0]
        runs.append(PlannedRun(uuid.uuid4(), number % tasks, status, created, 0))
    for count, status, latest, window in (
        (waiting, "waiting", 600, 3 * 86400),
        (running, "running", 5, 300),
        (queued, "queued", 1, 120),
    ):
        for number in range(count):
            created = now - timedelta(seconds=latest + window * rng.random())
            runs.append(PlannedRun(uuid.uuid4(), number % tasks, status, created, 0))
    runs.sort(key=lambda run: run.created_at)
    for run in runs:
        run.steps = volume.steps_per_run
    # The long run: the first task's, ended an hour ago.
    runs.append(PlannedRun(LONG_RUN_ID, 0, "succeeded", now - timedelta(hours=3), LONG_RUN_STEPS))
    return runs


def step_plan(run: PlannedRun, grants: list[tuple[int, str, str]]) -> Iterator[tuple]:
    """A run's steps as (number, kind, status, tool or None): a plan, then model turns
    each followed by the call it asked for, the last turn the answer. A failed run's
    last call failed; a waiting run's last call is held for a person."""
    last = run.steps
    for number in range(1, last + 1):
        if number == 1:
            yield number, "plan", "succeeded", None
        elif number % 2 == 0 or number == last:
            yield number, "model", "succeeded", None
        else:
            tool = grants[(number // 2) % len(grants)]
            status = "succeeded"
            if number >= last - 2:
                if run.status == "failed":
                    status = "failed"
                elif run.status == "waiting":
                    status = "proposed"
                elif run.status == "running":
                    status = "started"
            yield number, "tool", status, tool


# The COPY columns, per model: every other column takes the field's default.
RUN_COLUMNS = (
    "id",
    "task_id",
    "task_version_id",
    "trigger_kind",
    "started_by_id",
    "input",
    "objective",
    "model_label",
    "status",
    "outcome",
    "reason",
    "steps_used",
    "tokens_in",
    "tokens_out",
    "spend",
    "seconds_used",
    "confidence",
    "queued_at",
    "lease_owner",
    "lease_expires_at",
    "created_at",
    "started_at",
    "finished_at",
)
STEP_COLUMNS = (
    "id",
    "run_id",
    "number",
    "kind",
    "status",
    "content",
    "tool_calls",
    "tool_id",
    "tool_name",
    "tool_call_id",
    "arguments",
    "idempotency_key",
    "result",
    "error",
    "tokens_in",
    "tokens_out",
    "duration_ms",
    "created_at",
    "finished_at",
)
APPROVAL_COLUMNS = (
    "run_id",
    "step_id",
    "kind",
    "status",
    "tool_name",
    "arguments",
    "call_digest",
    "side_effect",
    "gate",
    "reasoning",
    "group_id",
    "expires_at",
    "created_at",
    "decided_at",
    "decided_by_id",
    "decision_reason",
    "confidence",
    "context",
)
TRIGGER_KINDS = ("manual", "manual", "cron", "webhook")
STEP_SECONDS = 2.0


def step_at(run: PlannedRun, number: int) -> datetime:
    return run.created_at + timedelta(seconds=STEP_SECONDS * number)


def run_usage(run: PlannedRun) -> tuple[int, int, Decimal]:
    """Tokens in, out and the spend of a run's model turns, derived from its id so
    that the steps and the run agree without keeping them."""
    turns = run.steps // 2 + 1
    spread = run.id.int % 1000
    tokens_in = turns * (1200 + spread * 3)
    tokens_out = turns * (150 + spread // 4)
    spend = (tokens_in * PRICE_IN + tokens_out * PRICE_OUT).quantize(Decimal("0.000001"))
    return tokens_in, tokens_out, spend


def run_rows(runs: list[PlannedRun], seeded: Seeded, now: datetime, rng: random.Random):
    for number, run in enumerate(runs):
        tokens_in, tokens_out, spend = run_usage(run)
        slug = seeded.task_slugs[run.task]
        reference = f"REF-{number:07d}"
        run_input = {"reference": reference, "amount": round(rng.uniform(10, 9000), 2)}
        live = run.status in ("queued", "running", "waiting")
        started = None if run.status == "queued" else run.created_at + timedelta(seconds=1)
        finished = None if live else step_at(run, run.steps) + timedelta(seconds=1)
        reason = {
            "failed": f"{seeded.grants[run.task][0][1]} failed: the service answered 503",
            "halted": "The step budget is spent.",
            "cancelled": "Cancelled by an operator.",
            "waiting": "A call waits for a person's approval.",
        }.get(run.status, "")
        yield (
            run.id,
            seeded.task_ids[run.task],
            seeded.version_ids[run.task],
            TRIGGER_KINDS[number % len(TRIGGER_KINDS)],
            seeded.admin_id if number % 4 < 2 else None,
            json.dumps(run_input),
            f"{TASKS[run.task][1]} for {reference}. ({slug})",
            seeded.models[run.task],
            run.status,
            f"Done: {reference} reconciled." if run.status == "succeeded" else "",
            reason,
            run.steps,  # a queued run may have worked slices already
            tokens_in,
            tokens_out,
            spend,
            round(run.steps * STEP_SECONDS, 3),
            round(0.55 + (run.id.int % 45) / 100, 2),
            run.created_at,
            f"bench:{number % 4}:1" if run.status == "running" else "",
            now + timedelta(seconds=60) if run.status == "running" else None,
            run.created_at,
            started,
            finished,
        )


def steps_copy(cursor: Any, runs: list[PlannedRun], seeded: Seeded, rng: random.Random) -> dict:
    """COPY every step (ids given here, the sequence moved past them); returns the id of
    each run's last tool step, for its approval."""
    from tasks.models import Step

    first_id = (Step.objects.aggregate(models.Max("id"))["id__max"] or 0) + 1
    last_tool: dict[uuid.UUID, int] = {}

    def rows() -> Iterator[tuple]:
        step_id = first_id
        for run in runs:
            tokens_in, tokens_out, _ = run_usage(run)
            turns = run.steps // 2 + 1
            for number, kind, status, tool in step_plan(run, seeded.grants[run.task]):
                at = step_at(run, number)
                ended = status in ("succeeded", "failed")
                call_id = f"call_{number}"
                if kind == "tool":
                    tool_id, name, _ = tool
                    last_tool[run.id] = step_id
                    arguments = f'{{"n": {number}, "reference": "REF-{number:04d}"}}'
                    result = (
                        f'{{"found": true, "amount": {rng.randint(1, 90000) / 100}}}'
                        if status == "succeeded"
                        else None
                    )
                    yield (
                        step_id, run.id, number, kind, status, "", "[]", tool_id, name,
                        call_id, arguments, f"{run.id.hex[:12]}-{number}", result,
                        "the service answered 503" if status == "failed" else "",
                        0, 0, rng.randint(20, 900) if ended else None, at,
                        at + timedelta(seconds=1) if ended else None,
                    )  # fmt: skip
                else:
                    next_tool = seeded.grants[run.task][((number + 1) // 2) % TOOLS_PER_TASK]
                    calls = (
                        f'[{{"id": "call_{number + 1}", "name": "{next_tool[1]}", '
                        f'"arguments": "{{\\"n\\": {number + 1}}}"}}]'
                        if kind == "model" and number < run.steps
                        else "[]"
                    )
                    content = (
                        "1. Fetch the records. 2. Check each one. 3. Report."
                        if kind == "plan"
                        else f"Step {number}: the figures agree so far."
                    )
                    yield (
                        step_id, run.id, number, kind, status, content, calls, None, "",
                        "", None, "", None, "", tokens_in // turns, tokens_out // turns,
                        rng.randint(300, 4000), at, at + timedelta(seconds=1),
                    )  # fmt: skip
                step_id += 1

    copy_rows(cursor, "tasks.Step", STEP_COLUMNS, rows())
    table = table_of("tasks.Step")
    cursor.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
        f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"
    )
    return last_tool


def approval_rows(
    runs: list[PlannedRun],
    seeded: Seeded,
    step_ids: dict[uuid.UUID, int],
    now: datetime,
    rng: random.Random,
) -> Iterator[tuple]:
    """A pending approval for each waiting run; every ``DECIDED_EVERY``-th ended run had
    a call decided by a person (mostly approved)."""
    for number, run in enumerate(runs):
        step_id = step_ids.get(run.id)
        if step_id is None:
            continue
        waiting = run.status == "waiting"
        if not waiting and (run.status in ("queued", "running") or number % DECIDED_EVERY):
            continue
        tool = seeded.grants[run.task][-1]
        created = step_at(run, run.steps - 1)
        if waiting:
            status, decided_at, decider, reason = "pending", None, None, ""
        else:
            rejected = run.status in ("failed", "cancelled") or number % 7 == 0
            status = "rejected" if rejected else "approved"
            decided_at = created + timedelta(seconds=rng.randint(30, 7200))
            decider = seeded.admin_id
            reason = "The amount is above the customer's limit." if rejected else ""
        yield (
            run.id,
            step_id,
            "action",
            status,
            tool[1],
            f'{{"n": {run.steps - 1}, "amount": {rng.randint(100, 900000) / 100}}}',
            uuid.uuid5(run.id, "call").hex + uuid.uuid5(run.id, "digest").hex,
            tool[2],
            f"{tool[2]} call at autonomy level 1",
            "The record matches the request; this call completes it.",
            seeded.group_id if run.task % 2 else None,
            created + timedelta(hours=24) if waiting and number % 3 else None,
            created,
            decided_at,
            decider,
            reason,
            round(0.5 + (run.id.int % 50) / 100, 2),
            json.dumps({"budget": {"steps": [run.steps, 40], "spend": ["0.02", "2.00"]}}),
        )


def event_rows(runs: list[PlannedRun], seeded: Seeded) -> Iterator[tuple]:
    """Each run's trail, as many events as it has steps: its queuing and start, one
    event per step, its end; each event's canonical text and hash made as
    ``lineage.services.events_chained`` makes them, chained from the genesis hash."""
    for run in runs:
        prev = GENESIS_HASH
        for seq, (kind, body) in enumerate(trail_planned(run, seeded), start=1):
            at = step_at(run, seq) + timedelta(milliseconds=500)
            canonical = json_canonical(
                event_document(
                    run_uuid=run.id, seq=seq, at=at, kind=kind, actor="engine", payload=body
                )
            )
            digest = event_hash(prev, canonical)
            yield (
                run.id,
                seq,
                at,
                kind,
                "engine",
                json_canonical(body),
                prev,
                digest,
                canonical,
                HASH_CANONICAL,
            )
            prev = digest


def trail_planned(run: PlannedRun, seeded: Seeded) -> Iterator[tuple[str, dict]]:
    """(kind, payload) of each of the run's ``run.steps`` events."""
    tokens_in, tokens_out, spend = run_usage(run)
    turns = run.steps // 2 + 1
    kinds = {"plan": "plan.drafted", "model": "model.responded"}
    ended = run.status not in ("queued", "running", "waiting")
    events = [("run.queued", {"objective": f"{TASKS[run.task][1]}.", "input": {"n": 1}})]
    events.append(("run.running", {"worker": "bench:1:1"}))
    for number, kind, status, tool in step_plan(run, seeded.grants[run.task]):
        if len(events) >= run.steps - (1 if ended else 0):
            break
        if kind == "plan":
            body = {
                "step": number,
                "version": 1,
                "steps": [
                    {"title": "Fetch the records", "status": "done"},
                    {"title": "Check each one", "status": "doing"},
                    {"title": "Report", "status": "todo"},
                ],
            }
        elif kind == "model":
            body = {
                "step": number,
                "tokens_in": tokens_in // turns,
                "tokens_out": tokens_out // turns,
                "cost": str((spend / turns).quantize(Decimal("0.000001"))),
                "content": f"Step {number}: the figures agree so far.",
            }
        else:
            body = {"step": number, "tool": tool[1], "result": {"found": True, "n": number}}
            ending = {"succeeded": "tool.succeeded", "failed": "tool.failed"}
            events.append((ending.get(status, "tool.started"), body))
            continue
        events.append((kinds[kind], body))
    if ended:
        events.append((f"run.{run.status}", {"reason": "", "outcome": "Done."}))
    return iter(events[: run.steps])


# COPY --------------------------------------------------------------------------------


def table_of(label: str) -> str:
    from django.apps import apps

    return connection.ops.quote_name(apps.get_model(label)._meta.db_table)


def copy_rows(cursor: Any, label: str, columns: tuple[str, ...], rows: Iterable[tuple]) -> int:
    """COPY ``rows`` (values for ``columns``, JSON as text) into the model's table; every
    other column gets its field's default, so a field added later with a default needs
    nothing here, and one without a default stops the seeding with its name."""
    from django.apps import apps

    model = apps.get_model(label)
    given = set(columns)
    fixed_columns, fixed_values = [], []
    for model_field in model._meta.concrete_fields:
        if model_field.column in given or model_field.attname in given:
            continue
        if isinstance(model_field, models.AutoField) or model_field.primary_key:
            continue
        value = model_field.get_default()
        if value is None and not model_field.null:
            raise RuntimeError(
                f"the bench does not fill {label}.{model_field.name}, which has no default: "
                "agentops/bench_pages.py needs it in its COPY columns"
            )
        if isinstance(model_field, models.JSONField):
            value = None if value is None else json.dumps(value)
        elif value is not None:
            value = model_field.get_db_prep_save(value, connection)
        fixed_columns.append(model_field.column)
        fixed_values.append(value)
    names = ", ".join(connection.ops.quote_name(name) for name in (*columns, *fixed_columns))
    count = 0
    fixed = tuple(fixed_values)
    with cursor.copy(f"COPY {table_of(label)} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row + fixed)
            count += 1
    return count


# Timing the pages ----------------------------------------------------------------------

REQUESTS = 12
GOAL_MS = 150.0


@dataclass(frozen=True)
class Page:
    path: str


@dataclass(frozen=True)
class PageFigures:
    page: Page
    status: int
    median_ms: float = 0.0
    p90_ms: float = 0.0
    queries: int = 0
    kib: float = 0.0
    said: str = ""

    @property
    def answered(self) -> bool:
        return self.status == 200

    @property
    def meets_goal(self) -> bool:
        return self.answered and self.median_ms < GOAL_MS


def pages_to_time() -> list[Page]:
    """The operator's pages, with the seeded task, tool and long run in their paths."""
    from tasks.models import Step

    task_slug = TASK_PREFIX + TASKS[0][0]
    busiest = (
        Step.objects.filter(tool__isnull=False)
        .values("tool_name")
        .annotate(calls=models.Count("pk"))
        .order_by("-calls", "tool_name")
        .first()
    )
    tool_name = busiest["tool_name"] if busiest else TOOLS[0][0]
    run = f"/runs/{LONG_RUN_ID}/"
    return [
        Page("/"),
        Page("/runs/"),
        Page("/runs/?page=2"),
        Page("/runs/?status=failed"),
        Page("/approvals/"),
        Page(run),
        Page(f"{run}lineage/"),
        Page("/tasks/"),
        Page(f"/tasks/{task_slug}/"),
        Page("/tools/"),
        Page(f"/tools/{tool_name}/"),
        # Prometheus' scrape: read from the database each time (agentops.metrics).
        Page("/metrics"),
    ]


def response_bytes(response: Any) -> int:
    if getattr(response, "streaming", False):
        return sum(len(piece) for piece in response.streaming_content)
    return len(response.content)


def page_time(client: Any, page: Page, *, requests: int) -> PageFigures:
    """One request to warm the page up (untimed), one counting its queries, then
    ``requests`` timed: the wall time of the test client's request, which is the
    server's whole work (no network, no browser)."""
    from django.test.utils import CaptureQueriesContext

    response = client.get(page.path)
    if response.status_code != 200:
        return PageFigures(page, response.status_code, said=answer_said(response))
    # The log keeps at most 9,000 queries and the count is a slice of it: emptied first,
    # or a full log (a migration under DEBUG) would count none.
    reset_queries()
    with CaptureQueriesContext(connection) as queries:
        response = client.get(page.path)
    # Read now: the captured queries are a slice of a log that later requests empty.
    query_count = len(queries.captured_queries)
    if response.status_code != 200:
        return PageFigures(page, response.status_code, said=answer_said(response))
    seconds, sizes = [], []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(page.path)
        size = response_bytes(response)
        seconds.append(time.perf_counter() - started)
        sizes.append(size)
        if response.status_code != 200:
            return PageFigures(page, response.status_code, said=answer_said(response))
    milliseconds = sorted(s * 1000 for s in seconds)
    p90 = (
        statistics.quantiles(milliseconds, n=10, method="inclusive")[-1]
        if len(milliseconds) > 1
        else milliseconds[0]
    )
    return PageFigures(
        page,
        200,
        median_ms=statistics.median(milliseconds),
        p90_ms=p90,
        queries=query_count,
        kib=statistics.median(sizes) / 1024,
    )


def answer_said(response: Any) -> str:
    """What a page that did not answer 200 said: where it redirects, or its text's
    start (one line)."""
    if response.status_code in (301, 302, 303, 307, 308):
        return f"redirects to {response.get('Location', '?')}"
    try:
        text = response.content.decode(errors="replace")
    except Exception:  # a streaming answer has no .content
        return ""
    return " ".join(text.split())[:120]


def connect_ms(samples: int = 5) -> float:
    """The median time to open a database connection, as each request pays when
    ``CONN_MAX_AGE`` is 0 (the bench keeps one open across its requests instead)."""
    seconds = []
    for _ in range(samples):
        connection.close()
        started = time.perf_counter()
        connection.ensure_connection()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000
