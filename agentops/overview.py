"""Reads for the overview (``/``): what runs, what it costs, who is waited on, what
fails, and whether anything is working the queue.

Each panel is one aggregate query (two for the approvals, a few for the health panel),
grouped in SQL and filtered on ``status`` and ``created_at`` so the indexes on runs
serve them: nothing here reads a run row per run, or a step at all. Days are the
server's ``TIME_ZONE`` days. A run counts on the day it was created: its spend and its
end are attributed to the day it started, which keeps every filter on the indexed
``created_at`` and matches the runs list's date filters.

Every figure carries the address of the list behind it (``runs_list_url``), in the
runs list's and the inbox's own query names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.core.cache import caches
from django.db.models import Count, F, Max, Min, OuterRef, Q, Subquery, Sum
from django.db.models.functions import TruncDate
from django.urls import reverse
from django.utils import timezone

from approvals.models import Approval, ApprovalKind, ApprovalStatus
from tasks.models import LIVE_RUN_STATUSES, ModelPrice, Run, RunStatus

logger = logging.getLogger("agentops.overview")

CHART_DAYS = 14
# The order runs stack in the chart and read in the panels: live ones first.
STATUS_ORDER = (
    RunStatus.QUEUED,
    RunStatus.RUNNING,
    RunStatus.WAITING,
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.HALTED,
    RunStatus.CANCELLED,
)
ENDED_STATUSES = tuple(status for status in STATUS_ORDER if status not in LIVE_RUN_STATUSES)
TROUBLE_STATUSES = (RunStatus.FAILED, RunStatus.HALTED)
# How long a broker may take to answer before the page says it is unreachable.
BROKER_TIMEOUT_SECONDS = 0.5
# A schedule this late (past its next run) has no cluster ticking it.
SCHEDULE_GRACE = timedelta(minutes=2)
# Django caches that live inside one process: django-q2's cluster stats written there by
# a worker process can never be read by the web process.
PROCESS_LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
# The periodic jobs the runtime schedules (django-q2 schedules made by migrations, or
# Celery beat), by the function they call, with what they are for.
PERIODIC_JOBS = {
    "agentops.runtime.dispatch.runs_reap_job": "the reaper (expired leases, lost messages, "
    "approvals past their deadline)",
    "agentops.runtime.dispatch.trail_checkpoint_job": "the trail's signed checkpoint",
    "triggers.cron.cron_tick_job": "the cron triggers' tick",
}


def runs_list_url(**filters: Any) -> str:
    """The runs list narrowed by ``filters`` (the list's own names: status, task, model,
    trigger, since, until, q), empty ones left out; dates as ISO days."""
    query = {
        name: value.isoformat() if isinstance(value, date) else value
        for name, value in filters.items()
        if value not in ("", None)
    }
    return reverse("runs:list") + (f"?{urlencode(query)}" if query else "")


def inbox_url(**filters: Any) -> str:
    """The approval inbox, narrowed (kind, group, item...) in its own query names."""
    query = {name: value for name, value in filters.items() if value not in ("", None)}
    return reverse("approvals:inbox") + (f"?{urlencode(query)}" if query else "")


@dataclass(frozen=True)
class Period:
    """The moments the panels count from, in the server's time zone."""

    now: datetime
    zone: tzinfo
    today: date
    today_start: datetime
    month_start: datetime
    chart_start: datetime
    day_ago: datetime
    week_ago: datetime

    @property
    def days(self) -> list[date]:
        return [self.today - timedelta(days=back) for back in range(CHART_DAYS - 1, -1, -1)]


def day_start(day: date, zone: tzinfo) -> datetime:
    """Midnight of ``day`` in ``zone`` (a DST change moves it, never the day)."""
    return timezone.make_aware(datetime.combine(day, time.min), zone)


def overview_period(now: datetime | None = None) -> Period:
    now = now or timezone.now()
    zone = timezone.get_default_timezone()
    today = timezone.localtime(now, zone).date()
    return Period(
        now=now,
        zone=zone,
        today=today,
        today_start=day_start(today, zone),
        month_start=day_start(today.replace(day=1), zone),
        chart_start=day_start(today - timedelta(days=CHART_DAYS - 1), zone),
        day_ago=now - timedelta(hours=24),
        week_ago=now - timedelta(days=7),
    )


def local_day(moment: datetime, period: Period) -> date:
    return timezone.localtime(moment, period.zone).date()


# -- Runs by status ------------------------------------------------------------------


@dataclass(frozen=True)
class StatusCount:
    status: str
    count: int
    url: str


@dataclass(frozen=True)
class LiveRuns:
    """Runs queued, running or waiting now, whenever they started."""

    counts: list[StatusCount]
    oldest_queued_at: datetime | None

    def count(self, status: str) -> int:
        return next((item.count for item in self.counts if item.status == status), 0)


def runs_live() -> LiveRuns:
    """One query: live runs by status (the ``status`` index: a few rows however many
    runs have ended), with the oldest time a queued run went to the queue."""
    rows = {
        row["status"]: row
        for row in Run.objects.filter(status__in=LIVE_RUN_STATUSES)
        .values("status")
        .annotate(count=Count("pk"), oldest_queued_at=Min("queued_at"))
        .order_by()  # Run's default ordering would join the GROUP BY
    }
    counts = [
        StatusCount(
            status, rows[status]["count"] if status in rows else 0, runs_list_url(status=status)
        )
        for status in LIVE_RUN_STATUSES
    ]
    queued = rows.get(RunStatus.QUEUED)
    return LiveRuns(counts=counts, oldest_queued_at=queued["oldest_queued_at"] if queued else None)


@dataclass(frozen=True)
class Segment:
    """One status's part of one day's bar, placed in the chart's coordinates."""

    status: str
    count: int
    y: float
    height: float
    url: str


@dataclass(frozen=True)
class Day:
    day: date
    total: int
    counts: dict[str, int]
    segments: list[Segment] = field(default_factory=list)
    x: float = 0.0
    center: float = 0.0
    label: str = ""
    month: str = ""

    @property
    def top(self) -> float | None:
        """Where the bar's top is (for its total above it); None for an empty day."""
        return self.segments[-1].y if self.segments else None

    @property
    def cells(self) -> list[tuple[str, int, str]]:
        """Each status's count that day, with the list behind it: the chart as a table."""
        return [
            (
                status,
                self.counts.get(status, 0),
                runs_list_url(status=status, since=self.day, until=self.day),
            )
            for status in STATUS_ORDER
        ]


@dataclass(frozen=True)
class Chart:
    """The last ``CHART_DAYS`` days' runs by status, ready to draw as SVG bars."""

    days: list[Day]
    peak: int
    ticks: list[tuple[int, float]]
    today_ended: list[StatusCount]

    width: int = 700
    height: int = 220
    left: int = 40
    bottom: int = 36
    top: int = 12
    right: int = 8

    @property
    def total(self) -> int:
        return sum(day.total for day in self.days)

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def day_label_y(self) -> int:
        return self.plot_bottom + 15

    @property
    def month_label_y(self) -> int:
        return self.plot_bottom + 29

    @property
    def bar_width(self) -> float:
        return round(self.slot * 0.7, 2)

    @property
    def slot(self) -> float:
        return (self.width - self.left - self.right) / CHART_DAYS


def nice_ceiling(value: int) -> int:
    """The least of 1, 2, 5 x 10^k at or above ``value``: the chart's top line."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if step * top >= value:
                return step * top
        top *= 10


def runs_by_day(period: Period) -> Chart:
    """One query: runs created in the last ``CHART_DAYS`` days, grouped by their local
    day and status (a range on ``created_at``: its index, not a scan of every run)."""
    rows = (
        # Every status, which filters nothing: it lets the (status, created_at) index
        # answer the range as seven short scans of the index alone (the day and the
        # status are both in it), where the range by itself would read it whole.
        Run.objects.filter(status__in=RunStatus.values, created_at__gte=period.chart_start)
        .annotate(day=TruncDate("created_at", tzinfo=period.zone))
        .values("day", "status")
        .annotate(count=Count("*"))
        .order_by()
    )
    by_day: dict[date, dict[str, int]] = {day: {} for day in period.days}
    for row in rows:
        if row["day"] in by_day:  # a clock ahead of ours could put a run in tomorrow
            by_day[row["day"]][row["status"]] = row["count"]
    peak = nice_ceiling(max((sum(counts.values()) for counts in by_day.values()), default=0))
    frame = Chart(days=[], peak=peak, ticks=[], today_ended=[])  # the geometry alone
    plot = frame.plot_bottom - frame.top
    days = []
    for index, (day, counts) in enumerate(by_day.items()):
        stacked = frame.plot_bottom
        segments = []
        for status in STATUS_ORDER:
            count = counts.get(status, 0)
            if not count:
                continue
            height = round(plot * count / peak, 2)
            stacked = round(stacked - height, 2)
            url = runs_list_url(status=status, since=day, until=day)
            segments.append(Segment(status, count, stacked, height, url))
        first_of_month = index == 0 or day.day == 1
        x = frame.left + index * frame.slot + (frame.slot - frame.bar_width) / 2
        days.append(
            Day(
                day=day,
                total=sum(counts.values()),
                counts=counts,
                segments=segments,
                x=round(x, 2),
                center=round(x + frame.bar_width / 2, 2),
                label=str(day.day),
                month=day.strftime("%b") if first_of_month else "",
            )
        )
    today = by_day[period.today]
    return Chart(
        days=days,
        peak=peak,
        ticks=[
            (value, round(frame.plot_bottom - plot * value / peak, 2))
            for value in sorted({0, peak // 2, peak})
        ],
        today_ended=[
            StatusCount(
                status, today.get(status, 0), runs_list_url(status=status, since=period.today)
            )
            for status in ENDED_STATUSES
        ],
    )


# -- Spend and tokens ----------------------------------------------------------------


@dataclass
class Usage:
    """Runs, tokens and spend over a period (the runs created in it)."""

    runs: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    spend: Decimal = Decimal(0)

    def add(self, runs: int, tokens_in: int, tokens_out: int, spend: Decimal) -> None:
        self.runs += runs
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.spend += spend

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass
class TaskSpend:
    """One task's month: its usage, today's spend, and its per-run limits beside the
    most one run spent (the only spend budgets agentops has)."""

    slug: str
    name: str
    max_spend: Decimal | None
    max_tokens: int | None
    month: Usage = field(default_factory=Usage)
    today_spend: Decimal = Decimal(0)
    largest_run_spend: Decimal = Decimal(0)
    runs_at_spend_limit: int = 0
    url: str = ""


@dataclass
class ModelSpend:
    label: str
    month: Usage = field(default_factory=Usage)
    price_in: Decimal | None = None
    price_out: Decimal | None = None
    url: str = ""

    @property
    def scripted(self) -> bool:
        return self.label.startswith("scripted:")

    @property
    def priced(self) -> bool:
        return self.price_in is not None


@dataclass
class Spend:
    today: Usage
    month: Usage
    tasks: list[TaskSpend]
    models: list[ModelSpend]
    today_url: str
    month_url: str
    month_start: date

    @property
    def periods(self) -> list[tuple[str, Usage, str]]:
        return [("Today", self.today, self.today_url), ("This month", self.month, self.month_url)]


def spend_this_month(period: Period) -> Spend:
    """One query for the usage (runs of this month grouped by task and model, today's
    part as a filtered sum; the task's limits come in the same row), one for the model
    prices (a small table). Today, the month, by task and by model are all folded from
    those rows."""
    rows = (
        Run.objects.filter(created_at__gte=period.month_start)
        .values(
            "task_id",
            "task__slug",
            "task__name",
            "task__max_spend",
            "task__max_tokens",
            "model_label",
        )
        .annotate(
            month_runs=Count("pk"),
            month_tokens_in=Sum("tokens_in"),
            month_tokens_out=Sum("tokens_out"),
            month_spend=Sum("spend"),
            largest=Max("spend"),
            at_limit=Count("pk", filter=Q(spend__gte=F("task__max_spend"))),
            today_runs=Count("pk", filter=Q(created_at__gte=period.today_start)),
            today_tokens_in=Sum("tokens_in", filter=Q(created_at__gte=period.today_start)),
            today_tokens_out=Sum("tokens_out", filter=Q(created_at__gte=period.today_start)),
            today_spend=Sum("spend", filter=Q(created_at__gte=period.today_start)),
        )
        .order_by()
    )
    month_day = period.month_start.date()
    today, month = Usage(), Usage()
    tasks: dict[int, TaskSpend] = {}
    models: dict[str, ModelSpend] = {}
    for row in rows:
        usage = (
            row["month_runs"],
            row["month_tokens_in"] or 0,
            row["month_tokens_out"] or 0,
            row["month_spend"] or Decimal(0),
        )
        month.add(*usage)
        today.add(
            row["today_runs"],
            row["today_tokens_in"] or 0,
            row["today_tokens_out"] or 0,
            row["today_spend"] or Decimal(0),
        )
        task = tasks.get(row["task_id"])
        if task is None:
            slug = row["task__slug"]
            task = tasks[row["task_id"]] = TaskSpend(
                slug=slug,
                name=row["task__name"],
                max_spend=row["task__max_spend"],
                max_tokens=row["task__max_tokens"],
                url=runs_list_url(task=slug, since=month_day),
            )
        task.month.add(*usage)
        task.today_spend += row["today_spend"] or Decimal(0)
        task.largest_run_spend = max(task.largest_run_spend, row["largest"] or Decimal(0))
        task.runs_at_spend_limit += row["at_limit"]
        label = row["model_label"]
        model = models.get(label)
        if model is None:
            model = models[label] = ModelSpend(
                label=label, url=runs_list_url(model=label, since=month_day)
            )
        model.month.add(*usage)
    if models:
        for price in ModelPrice.objects.filter(model__in=list(models)):
            models[price.model].price_in = price.input_per_million
            models[price.model].price_out = price.output_per_million
    return Spend(
        today=today,
        month=month,
        tasks=sorted(tasks.values(), key=lambda task: (-task.month.spend, task.name)),
        models=sorted(models.values(), key=lambda model: (-model.month.spend, model.label)),
        today_url=runs_list_url(since=period.today),
        month_url=runs_list_url(since=month_day),
        month_start=month_day,
    )


# -- Approvals waiting ----------------------------------------------------------------


@dataclass(frozen=True)
class KindCount:
    kind: str
    label: str
    count: int
    url: str


@dataclass(frozen=True)
class Waiting:
    """Approvals pending, whoever may decide them (the inbox shows each person theirs)."""

    count: int
    by_kind: list[KindCount]
    oldest: Approval | None
    oldest_url: str
    inbox_url: str

    @property
    def waits_on(self) -> str:
        if self.oldest is None:
            return ""
        if self.oldest.group is not None:
            return f"the group {self.oldest.group.name}"
        return "anyone with the decide permission"

    @property
    def waits_on_url(self) -> str:
        if self.oldest is None:
            return ""
        return inbox_url(group=self.oldest.group_id or "none")


def approvals_waiting() -> Waiting:
    """Two queries on the (status, created_at) index: pending approvals by kind, then
    the oldest one with its group and task (skipped when none wait)."""
    pending = Approval.objects.filter(status=ApprovalStatus.PENDING)
    labels = dict(ApprovalKind.choices)
    by_kind = [
        KindCount(
            row["kind"],
            labels.get(row["kind"], row["kind"]),
            row["count"],
            inbox_url(kind=row["kind"]),
        )
        for row in pending.values("kind").annotate(count=Count("pk")).order_by("-count", "kind")
    ]
    count = sum(item.count for item in by_kind)
    oldest = None
    if count:
        oldest = (
            pending.select_related("group", "run__task")
            .only(
                "pk",
                "kind",
                "tool_name",
                "created_at",
                "expires_at",
                "escalated",
                "group__name",
                "run__id",
                "run__task__name",
                "run__task__slug",
            )
            .order_by("created_at", "pk")
            .first()
        )
    return Waiting(
        count=count,
        by_kind=by_kind,
        oldest=oldest,
        oldest_url=inbox_url(item=oldest.pk) if oldest else "",
        inbox_url=inbox_url(),
    )


# -- Tasks failing ---------------------------------------------------------------------


@dataclass(frozen=True)
class TaskTrouble:
    """A task's failed and halted runs, of those created in the last 24 h and 7 days."""

    slug: str
    name: str
    failed_day: int
    halted_day: int
    failed_week: int
    halted_week: int
    last_at: datetime
    urls: dict[str, str]


def tasks_in_trouble(period: Period) -> list[TaskTrouble]:
    """One query: failed and halted runs of the last 7 days grouped by task (the
    (status, created_at) index answers the filter), the worst first."""
    day = Q(created_at__gte=period.day_ago)
    rows = (
        Run.objects.filter(status__in=TROUBLE_STATUSES, created_at__gte=period.week_ago)
        .values("task__slug", "task__name")
        .annotate(
            failed_day=Count("pk", filter=day & Q(status=RunStatus.FAILED)),
            halted_day=Count("pk", filter=day & Q(status=RunStatus.HALTED)),
            failed_week=Count("pk", filter=Q(status=RunStatus.FAILED)),
            halted_week=Count("pk", filter=Q(status=RunStatus.HALTED)),
            last_at=Max("created_at"),
        )
        .order_by()
    )
    # The list filters by day: the 24 h links start at the day 24 h ago began.
    since_day, since_week = local_day(period.day_ago, period), local_day(period.week_ago, period)
    found = []
    for row in rows:
        slug = row.pop("task__slug")
        urls = {
            f"{status}_{span}": runs_list_url(status=status, task=slug, since=since)
            for status in TROUBLE_STATUSES
            for span, since in (("day", since_day), ("week", since_week))
        }
        urls["week"] = runs_list_url(task=slug, since=since_week)
        found.append(TaskTrouble(slug=slug, name=row.pop("task__name"), urls=urls, **row))
    found.sort(
        key=lambda task: (
            -(task.failed_day + task.halted_day),
            -(task.failed_week + task.halted_week),
            task.name,
        )
    )
    return found


# -- Workers and schedules -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSeen:
    """A worker process as its leases show it: it renews every lease it holds a third of
    a lease period apart, so the latest renewal is the last time it was heard from."""

    name: str  # host:pid
    runs: int
    last_heard_at: datetime
    lease_expires_at: datetime
    lapsed: bool


@dataclass(frozen=True)
class ClusterSeen:
    """A django-q2 cluster as it reports itself (its sentinel writes this about every
    second, to the cache, for a few seconds)."""

    cluster_id: str
    host: str
    pid: int
    status: str
    workers: int
    last_seen_at: datetime | None
    up_since: datetime | None


@dataclass(frozen=True)
class ScheduleSeen:
    name: str
    purpose: str
    minutes: int | None
    next_run: datetime | None
    last_started: datetime | None
    last_stopped: datetime | None
    last_success: bool | None
    overdue: bool


@dataclass
class Health:
    queue: str  # "q2" or "celery"
    broker: str
    depth: int | None  # messages waiting on the broker; None: not known
    taken: int | None  # messages a worker holds (django-q2's ORM broker only)
    broker_error: str
    queued_runs: int
    oldest_queued_at: datetime | None
    workers: list[WorkerSeen]
    clusters: list[ClusterSeen] | None
    clusters_said: str
    schedules: list[ScheduleSeen] | None
    schedules_said: str
    lease_seconds: float
    queued_url: str = field(default_factory=lambda: runs_list_url(status=RunStatus.QUEUED))
    running_url: str = field(default_factory=lambda: runs_list_url(status=RunStatus.RUNNING))


def workers_from_leases(now: datetime) -> list[WorkerSeen]:
    """One query: the leases on running runs, by owner. An owner is named
    ``host:pid:claim`` (``engine.context.worker_name``): claims of one process are
    folded into one worker. A worker with no run in hand holds no lease, and does not
    show here: this is who works, not who is alive."""
    lease = timedelta(seconds=settings.AGENTOPS_LEASE_SECONDS)
    rows = (
        Run.objects.filter(status=RunStatus.RUNNING, lease_expires_at__isnull=False)
        .exclude(lease_owner="")
        .values("lease_owner")
        .annotate(runs=Count("pk"), expires=Max("lease_expires_at"))
        .order_by()
    )
    folded: dict[str, dict[str, Any]] = {}
    for row in rows:
        parts = row["lease_owner"].rsplit(":", 1)
        name = parts[0] if len(parts) == 2 and ":" in parts[0] else row["lease_owner"]
        seen = folded.setdefault(name, {"runs": 0, "expires": row["expires"]})
        seen["runs"] += row["runs"]
        seen["expires"] = max(seen["expires"], row["expires"])
    return sorted(
        (
            WorkerSeen(
                name=name,
                runs=seen["runs"],
                last_heard_at=seen["expires"] - lease,
                lease_expires_at=seen["expires"],
                lapsed=seen["expires"] < now,
            )
            for name, seen in folded.items()
        ),
        key=lambda worker: worker.name,
    )


def q2_queue_depth(now: datetime) -> tuple[int, int]:
    """One query on django-q2's ORM broker (the database itself): messages waiting for a
    worker, and those a worker has taken (locked until its retry time)."""
    from django_q.conf import Conf
    from django_q.models import OrmQ

    waiting = Q(lock__lte=now) | Q(lock__isnull=True)
    depth = OrmQ.objects.filter(key=Conf.CLUSTER_NAME).aggregate(
        waiting=Count("pk", filter=waiting), taken=Count("pk", filter=~waiting)
    )
    return depth["waiting"], depth["taken"]


def q2_clusters() -> tuple[list[ClusterSeen] | None, str]:
    """django-q2's clusters as they report themselves, from the Django cache they write
    to. A cache inside one process (the default, LocMemCache) is not the worker's: what
    is knowable then is nothing, and it says so rather than "no cluster"."""
    from django.core.cache.backends.dummy import DummyCache
    from django.core.cache.backends.locmem import LocMemCache
    from django_q.brokers import get_broker
    from django_q.conf import Conf
    from django_q.status import Stat

    try:
        cache = caches[Conf.CACHE]
    except Exception as error:  # an unknown alias, a backend that cannot load
        return None, f"the cache {Conf.CACHE!r} django-q2 reports to cannot be used ({error})"
    if isinstance(cache, (LocMemCache, DummyCache)):
        return None, (
            "django-q2 reports its clusters to the Django cache, and this one "
            f"({type(cache).__name__}) lives inside each process, so this page cannot see "
            "the worker's: configure a shared cache (database or Redis) to see them"
        )
    try:
        stats = Stat.get_all(broker=get_broker())
    except Exception as error:  # a cache server that is down must not take the page
        logger.warning("overview: django-q2's cluster stats could not be read: %s", error)
        return None, f"the cache django-q2 reports to could not be read ({error})"
    clusters = [
        ClusterSeen(
            cluster_id=str(getattr(stat, "cluster_id", "")),
            host=str(getattr(stat, "host", "")),
            pid=getattr(stat, "pid", 0) or 0,
            status=str(getattr(stat, "status", "")),
            workers=len(getattr(stat, "workers", None) or []),
            last_seen_at=getattr(stat, "timestamp", None),
            up_since=getattr(stat, "tob", None),
        )
        for stat in stats
    ]
    return sorted(clusters, key=lambda cluster: (cluster.host, cluster.pid)), ""


def q2_schedules(now: datetime) -> list[ScheduleSeen]:
    """One query: the runtime's django-q2 schedules, each with its last task's record
    (``Schedule.task`` names it; django-q2 prunes old successes, so it may be gone). A
    schedule whose next run is well past has no cluster ticking it."""
    from django_q.models import Schedule
    from django_q.models import Task as QTask

    last = QTask.objects.filter(id=OuterRef("task")).order_by()
    rows = (
        Schedule.objects.filter(func__in=list(PERIODIC_JOBS))
        .annotate(
            last_started=Subquery(last.values("started")[:1]),
            last_stopped=Subquery(last.values("stopped")[:1]),
            last_success=Subquery(last.values("success")[:1]),
        )
        .values(
            "name", "func", "minutes", "next_run", "last_started", "last_stopped", "last_success"
        )
        .order_by("name")
    )
    return [
        ScheduleSeen(
            name=row["name"],
            purpose=PERIODIC_JOBS[row["func"]],
            minutes=row["minutes"],
            next_run=row["next_run"],
            last_started=row["last_started"],
            last_stopped=row["last_stopped"],
            last_success=row["last_success"],
            overdue=row["next_run"] is not None and row["next_run"] < now - SCHEDULE_GRACE,
        )
        for row in rows
    ]


def celery_queue_depth() -> tuple[int | None, str]:
    """The length of Celery's queue on Redis, asked with a short timeout: a broker that
    is down or unreachable is reported as such, never waited on."""
    import redis

    queue = getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", "celery")
    client = None
    try:
        client = redis.Redis.from_url(
            settings.CELERY_BROKER_URL,
            socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
            socket_timeout=BROKER_TIMEOUT_SECONDS,
            retry_on_timeout=False,
        )
        return int(client.llen(queue)), ""
    except (redis.RedisError, OSError, ValueError) as error:
        logger.warning("overview: Celery's broker could not be reached: %s", error)
        return None, f"unreachable ({error})"
    finally:
        if client is not None:
            client.close()


def health(now: datetime, live: LiveRuns) -> Health:
    """What the runtime records of its workers and schedules, with "unknown" (and why)
    where nothing records it."""
    workers = workers_from_leases(now)
    common = {
        "queued_runs": live.count(RunStatus.QUEUED),
        "oldest_queued_at": live.oldest_queued_at,
        "workers": workers,
        "lease_seconds": settings.AGENTOPS_LEASE_SECONDS,
    }
    if settings.AGENTOPS_QUEUE == "celery":
        depth, error = celery_queue_depth()
        return Health(
            queue="celery",
            broker="Celery on Redis",
            depth=depth,
            taken=None,
            broker_error=error,
            clusters=None,
            clusters_said=(
                "Celery workers answer only when asked over the broker "
                "(celery -A agentops inspect ping), which this page does not wait for"
            ),
            schedules=None,
            schedules_said=(
                "Celery beat keeps when it last sent each job in its own schedule file, "
                "not in the database"
            ),
            **common,
        )
    depth, taken = q2_queue_depth(now)
    clusters, clusters_said = q2_clusters()
    return Health(
        queue="q2",
        broker="django-q2 on the database (ORM broker)",
        depth=depth,
        taken=taken,
        broker_error="",
        clusters=clusters,
        clusters_said=clusters_said,
        schedules=q2_schedules(now),
        schedules_said="",
        **common,
    )


def overview_figures(now: datetime | None = None) -> dict[str, Any]:
    """Every panel's figures, for the template."""
    period = overview_period(now)
    live = runs_live()
    return {
        "period": period,
        "statuses": [str(status) for status in STATUS_ORDER],
        "live": live,
        "chart": runs_by_day(period),
        "spend": spend_this_month(period),
        "waiting": approvals_waiting(),
        "trouble": tasks_in_trouble(period),
        "health": health(period.now, live),
    }
