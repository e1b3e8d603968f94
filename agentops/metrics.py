"""Prometheus ``/metrics``, in the text exposition format (docs/observability.md lists
the metrics).

Workers run in other processes, on other machines: a counter kept in the web process
would count only what the web process saw. Every figure is read from the database when
Prometheus scrapes (``RuntimeCollector``), in a few aggregate queries, so any web
process answers the same for the whole deployment. Counters are totals over rows that
are only ever added to in the state counted (ended runs, settled steps, firings, the
trail's events); what moves both ways (live runs, open steps, approvals waiting, the
queue) is a gauge. Latency histograms come from the steps' recorded ``duration_ms``,
bucketed in SQL (one conditional count a bucket), not from samples held in a process.

The cost of a scrape: one grouped scan of runs, one of steps (joined to their run for
the model's name), one of trigger firings, one filtered count of the trail's
``run.recovered`` events, and the overview's own queries for approvals and the queue
(``agentops.overview``): seven or eight statements, each linear in its table at worst,
none per row. Scrape every 30 s or more on a large database.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db.models import Case, CharField, Count, F, Q, Sum, Value, When
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agentops import overview
from approvals.models import ApprovalKind
from lineage.models import LineageEvent
from tasks.models import LIVE_RUN_STATUSES, Run, Step, StepKind, StepStatus
from triggers.models import Firing

# The latency buckets, in milliseconds as steps record them: from a fast local tool to
# a model answer that takes minutes.
BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000, 300_000)
# A step in one of these may still move on; any other status is where it stays.
OPEN_STEP_STATUSES = (StepStatus.PROPOSED, StepStatus.STARTED, StepStatus.UNKNOWN)
RECOVERED_EVENT = "run.recovered"
# The steps that record a model call: a turn, and the self-check's turn.
MODEL_STEP_KINDS = (StepKind.MODEL, StepKind.CHECK)


def bucket_label(ms: int) -> str:
    # As prometheus_client writes its own buckets' bounds ("0.05", "300.0").
    return floatToGoString(ms / 1000)


class RuntimeCollector(Collector):
    """The deployment's figures, read from the database at each scrape."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        yield from runs_metrics()
        yield from steps_metrics()
        yield from approvals_metrics(now)
        yield from queue_metrics(now)
        yield from triggers_metrics()
        recovered = LineageEvent.objects.filter(kind=RECOVERED_EVENT).count()
        yield CounterMetricFamily(
            "agentops_lease_recoveries",
            "Runs taken back from a worker whose lease lapsed (its process stopped or "
            "hung), as the trail records them.",
            value=recovered,
        )


def runs_metrics() -> Iterator[Metric]:
    """One query: runs grouped by task, status and model, with their usage."""
    rows = (
        Run.objects.values("task__slug", "status", "model_label")
        .annotate(
            runs=Count("pk"),
            tokens_in=Sum("tokens_in"),
            tokens_out=Sum("tokens_out"),
            spend=Sum("spend"),
        )
        .order_by()  # Run's default ordering would join the GROUP BY
    )
    created = CounterMetricFamily(
        "agentops_runs_created", "Runs started, by task.", labels=["task"]
    )
    ended = CounterMetricFamily(
        "agentops_runs",
        "Runs ended, by task and final status (succeeded, failed, halted, cancelled).",
        labels=["task", "status"],
    )
    live = GaugeMetricFamily(
        "agentops_runs_live",
        "Runs queued, running or waiting now, by task and status.",
        labels=["task", "status"],
    )
    tokens = CounterMetricFamily(
        "agentops_model_tokens",
        "Tokens used by runs, by model and type (input, output).",
        labels=["model", "type"],
    )
    spend = CounterMetricFamily(
        "agentops_model_spend",
        "What runs spent, by model, in the currency of the model prices (ModelPrice).",
        labels=["model"],
    )
    by_task: dict[str, int] = defaultdict(int)
    by_status: dict[tuple[str, str], int] = defaultdict(int)
    by_model: dict[str, list] = defaultdict(lambda: [0, 0, Decimal(0)])
    for row in rows:
        by_task[row["task__slug"]] += row["runs"]
        by_status[(row["task__slug"], row["status"])] += row["runs"]
        usage = by_model[row["model_label"]]
        usage[0] += row["tokens_in"] or 0
        usage[1] += row["tokens_out"] or 0
        usage[2] += row["spend"] or Decimal(0)
    for task, count in sorted(by_task.items()):
        created.add_metric([task], count)
    for (task, status), count in sorted(by_status.items()):
        (live if status in LIVE_RUN_STATUSES else ended).add_metric([task, status], count)
    for model, (tokens_in, tokens_out, spent) in sorted(by_model.items()):
        tokens.add_metric([model, "input"], tokens_in)
        tokens.add_metric([model, "output"], tokens_out)
        spend.add_metric([model], float(spent))
    yield from (created, ended, live, tokens, spend)


def steps_metrics() -> Iterator[Metric]:
    """One query: steps grouped by kind, status, and the model or granted tool they
    timed, with their durations counted into the buckets in SQL. A tool's name is a
    label only for a granted tool (``tool`` set): a name the model made up is not a
    series of its own."""
    buckets = {f"le_{ms}": Count("pk", filter=Q(duration_ms__lte=ms)) for ms in BUCKETS_MS}
    rows = (
        Step.objects.annotate(
            model=Case(
                When(kind__in=MODEL_STEP_KINDS, then=F("run__model_label")),
                default=Value(""),
                output_field=CharField(),
            ),
            granted=Case(
                When(tool__isnull=False, then=F("tool_name")),
                default=Value(""),
                output_field=CharField(),
            ),
        )
        .values("kind", "status", "model", "granted")
        .annotate(steps=Count("pk"), timed=Count("duration_ms"), ms=Sum("duration_ms"), **buckets)
        .order_by()
    )
    settled = CounterMetricFamily(
        "agentops_steps",
        "Steps settled, by kind (model, tool, plan, check, human) and final status.",
        labels=["kind", "status"],
    )
    still_open = GaugeMetricFamily(
        "agentops_steps_open",
        "Steps that may still move on (proposed, started, unknown), by kind and status.",
        labels=["kind", "status"],
    )
    model_latency = HistogramMetricFamily(
        "agentops_model_call_duration_seconds",
        "How long model calls took (a turn's or a self-check's successful attempt), by model.",
        labels=["model"],
    )
    tool_latency = HistogramMetricFamily(
        "agentops_tool_call_duration_seconds",
        "How long tool calls took (every attempt of the call), by tool.",
        labels=["tool"],
    )
    counts: dict[tuple[str, str], int] = defaultdict(int)
    timings: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        counts[(row["kind"], row["status"])] += row["steps"]
        if row["kind"] in MODEL_STEP_KINDS:
            key = ("model", row["model"])
        elif row["kind"] == StepKind.TOOL and row["granted"]:
            key = ("tool", row["granted"])
        else:
            continue
        folded = timings.setdefault(key, [0] * (len(BUCKETS_MS) + 2))
        for index, ms in enumerate(BUCKETS_MS):
            folded[index] += row[f"le_{ms}"]
        folded[-2] += row["timed"]
        folded[-1] += row["ms"] or 0
    for (kind, status), count in sorted(counts.items()):
        (still_open if status in OPEN_STEP_STATUSES else settled).add_metric([kind, status], count)
    for (family, name), folded in sorted(timings.items()):
        histogram = model_latency if family == "model" else tool_latency
        histogram.add_metric(
            [name],
            buckets=[
                *((bucket_label(ms), folded[index]) for index, ms in enumerate(BUCKETS_MS)),
                ("+Inf", folded[-2]),
            ],
            sum_value=folded[-1] / 1000,
        )
    yield from (settled, still_open, model_latency, tool_latency)


def approvals_metrics(now: datetime) -> Iterator[Metric]:
    """The overview's approvals panel (``overview.approvals_waiting``: one query, two
    when any wait)."""
    waiting = overview.approvals_waiting()
    by_kind = GaugeMetricFamily(
        "agentops_approvals_waiting",
        "Approvals waiting for a person, by kind.",
        labels=["kind"],
    )
    counted = {item.kind: item.count for item in waiting.by_kind}
    for kind in ApprovalKind.values:
        by_kind.add_metric([kind], counted.get(kind, 0))
    yield by_kind
    oldest = waiting.oldest
    yield GaugeMetricFamily(
        "agentops_approval_oldest_age_seconds",
        "How long the oldest approval waiting has waited (0: none waits).",
        value=max(0.0, (now - oldest.created_at).total_seconds()) if oldest else 0.0,
    )


def queue_metrics(now: datetime) -> Iterator[Metric]:
    """The overview's queue figures (``overview.runs_live`` and the broker's depth):
    django-q2's ORM broker in one query, Celery's Redis asked with a short timeout."""
    live = overview.runs_live()
    oldest = live.oldest_queued_at
    yield GaugeMetricFamily(
        "agentops_queue_oldest_age_seconds",
        "How long the run queued longest has waited for a worker (0: none queued).",
        value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
    )
    depth = GaugeMetricFamily(
        "agentops_queue_messages",
        "Messages on the queue's broker: waiting for a worker, or taken by one "
        "(django-q2's ORM broker only).",
        labels=["queue", "state"],
    )
    if settings.AGENTOPS_QUEUE == "celery":
        waiting, _unreachable = overview.celery_queue_depth()
        reachable = waiting is not None
        if reachable:
            depth.add_metric(["celery", "waiting"], waiting)
        queue = "celery"
    else:
        waiting, taken = overview.q2_queue_depth(now)
        depth.add_metric(["q2", "waiting"], waiting)
        depth.add_metric(["q2", "taken"], taken)
        reachable, queue = True, "q2"
    yield depth
    up = GaugeMetricFamily(
        "agentops_queue_up", "Whether the queue's broker answered (1) or not (0).", labels=["queue"]
    )
    up.add_metric([queue], 1 if reachable else 0)
    yield up


def triggers_metrics() -> Iterator[Metric]:
    """One query: every firing, grouped by its trigger's kind and what came of it."""
    rows = (
        Firing.objects.values("trigger__kind", "accepted", "refusal")
        .annotate(firings=Count("pk"))
        .order_by()
    )
    firings = CounterMetricFamily(
        "agentops_trigger_firings",
        "What arrived for triggers, by trigger kind and outcome (accepted, refused).",
        labels=["kind", "outcome"],
    )
    refusals = CounterMetricFamily(
        "agentops_trigger_refusals",
        "Firings refused, by trigger kind and reason (disabled, rate, live, overlap, "
        "missed, input).",
        labels=["kind", "reason"],
    )
    outcomes: dict[tuple[str, str], int] = defaultdict(int)
    reasons: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        kind = row["trigger__kind"]
        outcomes[(kind, "accepted" if row["accepted"] else "refused")] += row["firings"]
        if not row["accepted"]:
            reasons[(kind, row["refusal"] or "other")] += row["firings"]
    for labels, count in sorted(outcomes.items()):
        firings.add_metric(list(labels), count)
    for labels, count in sorted(reasons.items()):
        refusals.add_metric(list(labels), count)
    yield from (firings, refusals)


def metrics_text() -> bytes:
    """The exposition: this collector's figures only. The web process's own (its memory,
    its requests) would describe one process of many, not the deployment."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector())
    return generate_latest(registry)


_scrape_lock = threading.Lock()
_latest: tuple[float, bytes] | None = None  # (when it was finished, the exposition)


def metrics_text_shared() -> bytes:
    """``metrics_text()``, computed once for every scrape that asked while it ran: a
    scrape costs a second of database time at volume, and a process's sync views share
    one thread under ASGI, so scrapes that pile up (two Prometheus servers, someone
    refreshing) would each cost it again and hold the process's pages behind them. A
    result finished after a scrape asked is as fresh as that scrape needs."""
    global _latest
    asked = time.monotonic()
    with _scrape_lock:
        if _latest is not None and _latest[0] >= asked:
            return _latest[1]
        text = metrics_text()
        _latest = (time.monotonic(), text)
        return text


def bearer_token(request: HttpRequest) -> str | None:
    """The bearer token the request carries, None when it carries none."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def refused(status: int, why: str) -> HttpResponse:
    response = HttpResponse(why + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="agentops metrics"'
    return response


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics, for Prometheus with ``AGENTOPS_METRICS_TOKEN`` as its bearer token,
    or for a staff member signed in. Anyone else learns nothing but why not."""
    token = bearer_token(request)
    expected = settings.AGENTOPS_METRICS_TOKEN
    if token is not None:
        if not expected:
            return refused(401, "metrics tokens are not enabled (AGENTOPS_METRICS_TOKEN)")
        # Compared in constant time: how long a wrong token takes says nothing of it.
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return refused(401, "the bearer token is not the metrics token")
    elif not request.user.is_authenticated:
        return refused(401, "a bearer token or a staff sign-in is needed")
    elif not request.user.is_staff:
        return refused(403, "only staff may read the metrics")
    response = HttpResponse(metrics_text_shared(), content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
