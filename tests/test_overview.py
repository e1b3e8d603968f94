"""The overview at ``/``, through real HTTP: each panel's figures against the rows
behind them, the days of the server's time zone, the links to the lists, the health
panel on django-q2 and on a Celery broker that is down, hostile names, and the query
count, the same at any size."""

from __future__ import annotations

import html
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import redis
import time_machine
from django.contrib.auth.models import Group
from django.urls import reverse
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import OrmQ, Schedule
from django_q.models import Task as QTask
from django_q.signing import SignedPackage
from django_q.status import Stat, Status

from approvals.models import Approval, ApprovalKind, ApprovalStatus
from tasks.models import ModelPrice, Run, RunStatus, Task, TaskVersion
from tests.conftest import require

pytestmark = pytest.mark.django_db

NEW_YORK = "America/New_York"
# Sunday 15 November 2026, 14:00 in New York (EST, UTC-5).
NOW = datetime(2026, 11, 15, 19, 0, tzinfo=UTC)


@pytest.fixture
def frozen() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def new_york(settings):
    settings.TIME_ZONE = NEW_YORK
    return timezone.get_default_timezone()


def local(zone, *args) -> datetime:
    """A moment given as the wall-clock time in ``zone``."""
    return timezone.make_aware(datetime(*args), zone)


def task_make(slug: str, name: str = "", **fields) -> Task:
    task = Task.objects.create(
        slug=slug, name=name or slug.title(), objective_template="Do it.", **fields
    )
    TaskVersion.objects.create(task=task, number=1, definition={"max_steps": 30}, digest="d")
    return task


def run_make(
    task: Task,
    status: str,
    at: datetime,
    *,
    spend: str = "0",
    tokens_in: int = 0,
    tokens_out: int = 0,
    model: str = "gpt-test",
    **fields,
) -> Run:
    run = Run.objects.create(
        task=task,
        task_version=task.versions.get(),
        objective="Do it.",
        model_label=model,
        status=status,
        spend=Decimal(spend),
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        **fields,
    )
    Run.objects.filter(pk=run.pk).update(created_at=at)  # auto_now_add ignores a value
    return run


def approval_make(run: Run, at: datetime, **fields) -> Approval:
    approval = Approval.objects.create(run=run, gate="a test gate", **fields)
    Approval.objects.filter(pk=approval.pk).update(created_at=at)
    return approval


def overview(client, **headers) -> str:
    response = client.get(reverse("home"), **headers)
    assert response.status_code == 200
    return response.content.decode()


def block(page: str, element_id: str, end: str) -> str:
    """The HTML from the element with ``element_id`` to the first ``end`` after it."""
    start = page.index(f'id="{element_id}"')
    return page[start : page.index(end, start)]


def row_of(table: str, text: str) -> str:
    """The table row holding ``text``."""
    return next(row for row in re.findall(r"<tr[^>]*>.*?</tr>", table, re.S) if text in row)


def figures(page: str, group_id: str) -> dict[str, tuple[int, str]]:
    """The status figures in a group: status -> (count, link)."""
    found = re.findall(
        r'<a class="figure" href="([^"]*)" data-status="(\w+)">'
        r'<span class="figure-value">(\d+)</span>',
        block(page, group_id, "</ul>"),
    )
    return {status: (int(count), html.unescape(url)) for url, status, count in found}


def chart_table(page: str) -> dict[str, dict[str, int]]:
    """The chart's table: the day as shown -> status -> count."""
    table = block(page, "runs-by-day", "</table>")
    statuses = re.findall(r'<th scope="col">(\w+)</th>', table)[1:-1]
    days = {}
    for day, cells in re.findall(r'<th scope="row">([^<]+)</th>(.*?)</tr>', table, re.S):
        counts = [int(n) for n in re.findall(r"<td>(?:<a [^>]*>|<span [^>]*>)?(\d+)", cells)]
        days[day] = dict(zip(statuses, counts, strict=False))
    return days


# Access ------------------------------------------------------------------------------------


def test_the_overview_asks_for_a_login(client):
    response = client.get(reverse("home"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_the_overview_only_answers_get(operator_client):
    assert operator_client.post(reverse("home")).status_code == 405


def test_a_query_string_is_ignored_whatever_it_holds(operator_client):
    response = operator_client.get(reverse("home"), {"status": "x\x00<script>", "n": "9" * 40})
    assert response.status_code == 200
    assert "<script>" not in response.content.decode().split("<main>", 1)[1]


def test_the_page_refreshes_its_panels_alone(operator_client):
    full = overview(operator_client)
    assert "<html" in full and 'hx-trigger="every 30s"' in full
    panels = overview(operator_client, HTTP_HX_REQUEST="true")
    assert "<html" not in panels and panels.lstrip().startswith('<div id="overview-panels"')


# Runs by status ----------------------------------------------------------------------------


def test_runs_by_status_match_the_database(operator_client, new_york, frozen):
    a, b = task_make("alpha"), task_make("beta")
    today = local(new_york, 2026, 11, 15, 9, 0)
    for status, task, at in [
        (RunStatus.QUEUED, a, today),
        (RunStatus.QUEUED, b, NOW - timedelta(days=40)),  # live whenever it started
        (RunStatus.RUNNING, a, today),
        (RunStatus.WAITING, b, NOW - timedelta(days=3)),
        (RunStatus.SUCCEEDED, a, today),
        (RunStatus.SUCCEEDED, b, today),
        (RunStatus.SUCCEEDED, b, local(new_york, 2026, 11, 15, 0, 0)),  # midnight: today
        (RunStatus.FAILED, a, today),
        (RunStatus.HALTED, a, today),
        (RunStatus.HALTED, b, today),
        (RunStatus.FAILED, a, local(new_york, 2026, 11, 14, 23, 59, 59)),  # yesterday
        (RunStatus.CANCELLED, b, NOW - timedelta(days=13)),
        (RunStatus.SUCCEEDED, b, NOW - timedelta(days=20)),  # before the chart
    ]:
        run_make(task, status, at, queued_at=at if status == RunStatus.QUEUED else None)

    page = overview(operator_client)

    live = figures(page, "runs-live")
    assert list(live) == ["queued", "running", "waiting"]  # live ones first
    for status, (count, url) in live.items():
        assert count == Run.objects.filter(status=status).count()
        assert url == f"/runs/?status={status}"
    assert live["queued"][0] == 2

    ended = figures(page, "runs-today")
    today_start = local(new_york, 2026, 11, 15, 0, 0)
    for status, (count, url) in ended.items():
        assert count == Run.objects.filter(status=status, created_at__gte=today_start).count()
        assert url == f"/runs/?status={status}&since=2026-11-15"
    assert {status: count for status, (count, _) in ended.items()} == {
        "succeeded": 3, "failed": 1, "halted": 2, "cancelled": 0,
    }  # fmt: skip

    # The chart's table: every day of the last 14, each run on its New York day.
    expected: dict[date, Counter] = {}
    for run in Run.objects.all():
        day = timezone.localtime(run.created_at, new_york).date()
        expected.setdefault(day, Counter())[run.status] += 1
    table = chart_table(page)
    assert list(table) == [
        f"{(date(2026, 11, 2) + timedelta(days=n)):%a %-d %b}" for n in range(14)
    ]
    for n in range(14):
        day = date(2026, 11, 2) + timedelta(days=n)
        shown = table[f"{day:%a %-d %b}"]
        assert {k: v for k, v in shown.items() if v} == dict(expected.get(day, {}))
    assert table["Sat 14 Nov"] == {**dict.fromkeys(shown, 0), "failed": 1}

    # The bars carry the same figures, each linked to that day's list.
    chart = block(page, "runs-chart", "</svg>")
    assert 'aria-label="Sun 15 Nov: 3 succeeded"' in chart
    assert "/runs/?status=failed&amp;since=2026-11-14&amp;until=2026-11-14" in chart
    assert chart.count("<rect ") == sum(len(counts) for counts in expected.values()) - 2


def test_days_are_the_server_time_zone_days(operator_client, settings):
    """Days, today and the month are New York's: across the end of summer time (1
    November), at the chart's first midnight and at today's."""
    settings.TIME_ZONE = NEW_YORK
    zone = timezone.get_default_timezone()
    task = task_make("alpha")
    moments = {
        "before the chart": local(zone, 2026, 10, 27, 23, 59, 59),
        "first day": local(zone, 2026, 10, 28, 0, 0),
        "summer time, 1 Nov": local(zone, 2026, 11, 1, 0, 30),
        "winter time, 1 Nov": local(zone, 2026, 11, 1, 23, 30),  # 04:30 UTC on 2 Nov
        "late on 9 Nov": local(zone, 2026, 11, 9, 23, 30),  # 04:30 UTC on 10 Nov
        "today's midnight": local(zone, 2026, 11, 10, 0, 0),
    }
    for at in moments.values():
        run_make(task, RunStatus.FAILED, at, spend="1")
    with time_machine.travel(datetime(2026, 11, 10, 17, 0, tzinfo=UTC), tick=False):
        page = overview(operator_client)

    table = chart_table(page)
    assert next(iter(table)) == "Wed 28 Oct" and list(table)[-1] == "Tue 10 Nov"
    failed = {day: counts["failed"] for day, counts in table.items() if counts["failed"]}
    assert failed == {"Wed 28 Oct": 1, "Sun 1 Nov": 2, "Mon 9 Nov": 1, "Tue 10 Nov": 1}
    assert figures(page, "runs-today")["failed"][0] == 1
    # The month began at New York's midnight on 1 November: four runs, 4.0000 spent.
    month = block(page, "spend-this-month", "</a>")
    assert ">4.0000<" in month and "4 runs" in month
    assert "since=2026-11-01" in month
    today = block(page, "spend-today", "</a>")
    assert ">1.0000<" in today and "1 run" in today

    # The same rows on UTC days fall elsewhere: the grouping follows the setting.
    settings.TIME_ZONE = "UTC"
    with time_machine.travel(datetime(2026, 11, 10, 17, 0, tzinfo=UTC), tick=False):
        table = chart_table(overview(operator_client))
    failed = {day: counts["failed"] for day, counts in table.items() if counts["failed"]}
    assert failed == {"Wed 28 Oct": 2, "Sun 1 Nov": 1, "Mon 2 Nov": 1, "Tue 10 Nov": 2}


def test_an_empty_database_says_so_in_every_panel(operator_client, frozen):
    page = overview(operator_client)
    assert {status: count for status, (count, _) in figures(page, "runs-live").items()} == {
        "queued": 0, "running": 0, "waiting": 0,
    }  # fmt: skip
    assert "No runs started in the last 14 days" in page and 'id="runs-chart"' not in page
    assert ">0.0000<" in block(page, "spend-today", "</a>")
    assert "No runs started this month." in page and "No model was used this month." in page
    assert "No daily or monthly spend budget exists" in page
    assert "Nothing waits for a person." in page
    assert "No run started in the last 7 days failed or halted." in page
    assert "No worker holds a run now" in page
    assert "Runs are queued and no worker holds a run" not in page


# Spend and tokens --------------------------------------------------------------------------


def test_spend_and_tokens_today_this_month_by_task_and_by_model(operator_client, new_york, frozen):
    capped = task_make("capped", "Capped task", max_spend=Decimal("0.5"), max_tokens=9000)
    free = task_make("free", "Free task")
    ModelPrice.objects.create(
        model="gpt-priced", input_per_million=Decimal("2.5"), output_per_million=Decimal("10")
    )
    today = local(new_york, 2026, 11, 15, 8, 0)
    earlier = local(new_york, 2026, 11, 3, 8, 0)
    last_month = local(new_york, 2026, 10, 31, 23, 59)
    run_make(capped, RunStatus.SUCCEEDED, today, spend="0.25", tokens_in=1000, tokens_out=200,
             model="gpt-priced")  # fmt: skip
    run_make(capped, RunStatus.HALTED, earlier, spend="0.5", tokens_in=3000, tokens_out=500,
             model="gpt-priced")  # fmt: skip
    run_make(free, RunStatus.SUCCEEDED, today, spend="0", tokens_in=400, tokens_out=40,
             model="gpt-unpriced")  # fmt: skip
    run_make(free, RunStatus.SUCCEEDED, earlier, tokens_in=7, model="scripted:demo")
    run_make(free, RunStatus.SUCCEEDED, last_month, spend="9", tokens_in=99999,
             model="gpt-priced")  # fmt: skip

    page = overview(operator_client)

    today_tile = block(page, "spend-today", "</a>")
    assert ">0.2500<" in today_tile and "1,640 tokens (1,400 in, 240 out) · 2 runs" in today_tile
    assert 'href="/runs/?since=2026-11-15"' in today_tile
    month_tile = block(page, "spend-this-month", "</a>")
    assert ">0.7500<" in month_tile and "5,147 tokens (4,407 in, 740 out) · 4 runs" in month_tile
    assert 'href="/runs/?since=2026-11-01"' in month_tile

    by_task = block(page, "spend-by-task", "</table>")
    rows = re.findall(r"<tr>(.*?)</tr>", by_task.split("<tbody>")[1], re.S)
    assert "Capped task" in rows[0] and "Free task" in rows[1]  # the costliest first
    assert 'href="/runs/?task=capped&amp;since=2026-11-01"' in rows[0]
    cells = re.findall(r'<td class="num"[^>]*>([^<]*)</td>', rows[0])
    assert cells == ["2", "4,700", "0.7500", "0.2500"]
    assert "0.5000: largest run 0.5000" in rows[0] and "1 run reached it" in rows[0]
    assert "9,000 tokens a run" in rows[0]
    assert "no spend limit" in rows[1]

    by_model = block(page, "spend-by-model", "</table>")
    assert "2.5000 in, 10.0000 out" in by_model
    assert 'href="/runs/?model=gpt-unpriced&amp;since=2026-11-01"' in by_model
    assert "no price: its spend is not counted" in by_model
    assert 'href="/runs/?model=scripted%3Ademo&amp;since=2026-11-01"' in by_model
    assert "none needed" in by_model  # a scripted model costs nothing

    assert "No daily or monthly spend budget exists in agentops" in page


# Approvals waiting -------------------------------------------------------------------------


def test_approvals_waiting_their_oldest_and_who_it_waits_on(operator_client, frozen):
    finance = Group.objects.create(name="finance")
    task = task_make("alpha", "Alpha")
    run = run_make(task, RunStatus.WAITING, NOW - timedelta(hours=5))
    approval_make(run, NOW - timedelta(hours=9), status=ApprovalStatus.APPROVED,
                  kind=ApprovalKind.ACTION)  # fmt: skip
    oldest = approval_make(run, NOW - timedelta(hours=3, minutes=5), kind=ApprovalKind.ACTION,
                           tool_name="email_send", group=finance,
                           expires_at=NOW + timedelta(hours=2))  # fmt: skip
    approval_make(run, NOW - timedelta(hours=1), kind=ApprovalKind.QUESTION)
    approval_make(run, NOW - timedelta(minutes=5), kind=ApprovalKind.ACTION)

    page = overview(operator_client)
    panel = block(page, "panel-approvals", "</section>")
    assert re.search(r'id="approvals-count" href="/approvals/">.*?>3</span>', panel, re.S)
    oldest_tile = block(panel, "approvals-oldest", "</a>")
    assert "3\xa0hours, 5\xa0minutes" in oldest_tile
    assert f'href="/approvals/?item={oldest.pk}"' in panel
    assert "Approve an action: email_send</a> in" in panel
    waits_on = block(panel, "approvals-waits-on", "</dd>")
    assert "the group finance" in waits_on and f"?group={finance.pk}" in waits_on
    assert "in 2\xa0hours" in panel
    kinds = block(panel, "approvals-by-kind", "</ul>")
    assert re.search(r'href="/approvals/\?kind=action">Approve an action <strong>2</strong>', kinds)
    assert re.search(r'href="/approvals/\?kind=question">Answer .*?<strong>1</strong>', kinds)

    # Decided, it waits no longer; the next oldest waits on anyone who may decide.
    Approval.objects.filter(pk=oldest.pk).update(status=ApprovalStatus.APPROVED)
    panel = block(overview(operator_client), "panel-approvals", "</section>")
    assert re.search(r'id="approvals-count" href="/approvals/">.*?>2</span>', panel, re.S)
    waits_on = block(panel, "approvals-waits-on", "</dd>")
    assert "anyone with the decide permission" in waits_on and "?group=none" in waits_on


# Tasks failing -----------------------------------------------------------------------------


def test_tasks_with_failures_or_halts_link_to_their_runs(operator_client, new_york, frozen):
    flaky, steady = task_make("flaky", "Flaky"), task_make("steady", "Steady")
    quiet = task_make("quiet", "Quiet")
    run_make(flaky, RunStatus.FAILED, NOW - timedelta(hours=2))
    run_make(flaky, RunStatus.FAILED, NOW - timedelta(hours=30))
    run_make(flaky, RunStatus.HALTED, NOW - timedelta(hours=23))
    run_make(steady, RunStatus.HALTED, NOW - timedelta(days=6))
    run_make(steady, RunStatus.FAILED, NOW - timedelta(days=8))  # too long ago
    run_make(quiet, RunStatus.SUCCEEDED, NOW - timedelta(hours=1))

    table = block(overview(operator_client), "trouble-tasks", "</table>")
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    assert len(rows) == 2 and "Flaky" in rows[0] and "Steady" in rows[1]
    counts = [re.findall(r'aria-label="[^"]*">(\d+)</a>', row) for row in rows]
    assert counts == [["1", "1", "2", "1"], ["0", "0", "0", "1"]]
    # 24 h ago was 9:00 on the 14th in New York; 7 days ago, the 8th.
    assert 'href="/runs/?status=failed&amp;task=flaky&amp;since=2026-11-14"' in rows[0]
    assert 'href="/runs/?status=halted&amp;task=steady&amp;since=2026-11-08"' in rows[1]
    assert 'href="/runs/?task=flaky&amp;since=2026-11-08"' in rows[0]
    assert "Quiet" not in table


# Workers and schedules ---------------------------------------------------------------------


def test_health_on_django_q2_shows_the_queue_the_leases_and_the_schedules(
    operator_client, frozen, settings
):
    settings.AGENTOPS_LEASE_SECONDS = 120.0
    # A cache inside each process: what the clusters report cannot be seen from here.
    local = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    settings.CACHES = {"default": local, "q2": local}
    task = task_make("alpha")
    # Two claims of one worker process, and a worker whose lease lapsed.
    for owner, expires in [
        ("host-a:101:aaaa1111", NOW + timedelta(seconds=100)),
        ("host-a:101:bbbb2222", NOW + timedelta(seconds=90)),
        ("host-b:7:cccc3333", NOW - timedelta(minutes=3)),
    ]:
        run_make(task, RunStatus.RUNNING, NOW, lease_owner=owner, lease_expires_at=expires)
    run_make(task, RunStatus.QUEUED, NOW, queued_at=NOW - timedelta(minutes=4))
    broker = get_broker()
    broker.enqueue("one")
    broker.enqueue("two")
    OrmQ.objects.create(key=Conf.CLUSTER_NAME, payload="taken", lock=NOW + timedelta(minutes=5))
    OrmQ.objects.create(key="another-cluster", payload="not ours", lock=NOW)
    # The reaper ran a minute ago; the checkpoint's schedule is well overdue.
    QTask.objects.create(
        id="reaper-last", name="reaper", func="agentops.runtime.dispatch.runs_reap_job",
        started=NOW - timedelta(seconds=61), stopped=NOW - timedelta(seconds=60), success=True,
    )  # fmt: skip
    Schedule.objects.filter(func="agentops.runtime.dispatch.runs_reap_job").update(
        task="reaper-last", next_run=NOW + timedelta(seconds=1)
    )
    Schedule.objects.filter(func="agentops.runtime.dispatch.trail_checkpoint_job").update(
        next_run=NOW - timedelta(minutes=30)
    )

    page = overview(operator_client)
    panel = block(page, "panel-health", "</section>")
    queued = block(panel, "health-queued", "</a>")
    assert ">1</span>" in queued and "4\xa0minutes" in queued and "/runs/?status=queued" in queued
    broker_tile = block(panel, "health-broker", "</li>")
    assert ">2</span>" in broker_tile and "1 taken by a worker" in broker_tile

    workers = block(panel, "health-workers", "</table>")
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", workers.split("<tbody>")[1], re.S)
    assert len(rows) == 2
    assert "host-a:101" in rows[0] and ">2</a>" in rows[0] and "lapsed" not in rows[0]
    # Its latest renewal: the lease's end less a lease period, 20 s ago.
    assert "0\xa0minutes ago" in rows[0]
    assert "host-b:7" in rows[1] and "lapsed 3\xa0minutes ago" in rows[1]

    clusters = block(panel, "health-clusters-unknown", "</p>")
    assert "Unknown" in clusters and "LocMemCache" in clusters

    schedules = block(panel, "health-schedules", "</table>")
    reaper = row_of(schedules, "agentops: reap runs")
    assert "1\xa0minute ago" in reaper and "overdue" not in reaper
    checkpoint = row_of(schedules, "agentops: checkpoint the trail")
    assert "overdue by 30\xa0minutes" in checkpoint
    assert "never, or its record was pruned" in checkpoint


def test_health_with_a_shared_cache_shows_each_cluster_s_heartbeat(
    operator_client, frozen, settings, tmp_path
):
    """django-q2's clusters report to the Django cache; one every process shares (here
    a file cache) lets the page show them."""
    shared = {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(tmp_path / "cache"),
    }
    settings.CACHES = {"default": shared, "q2": shared}
    page = overview(operator_client)
    assert "No django-q2 cluster has reported in the last few seconds" in page

    status = Status(pid=4242, cluster_id="c0ffee")
    status.host, status.status, status.workers = "worker-1", "Idle", [1, 2]
    status.timestamp = NOW - timedelta(seconds=2)
    status.tob = NOW - timedelta(hours=1)
    get_broker().set_stat(Stat.get_key("c0ffee"), SignedPackage.dumps(status, True), 60)

    clusters = block(overview(operator_client), "health-clusters", "</table>")
    assert "c0ffee" in clusters and "worker-1 (4242)" in clusters and "Idle" in clusters
    assert '<td class="num">2</td>' in clusters and "0\xa0minutes ago" in clusters


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that takes connections and never answers: a broker that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def celery_on(settings, url: str, queue: str = "celery") -> None:
    settings.AGENTOPS_QUEUE = "celery"
    settings.CELERY_BROKER_URL = url
    settings.CELERY_TASK_DEFAULT_QUEUE = queue


def test_health_says_a_celery_broker_that_refuses_is_unreachable(operator_client, settings):
    celery_on(settings, f"redis://127.0.0.1:{closed_port()}/0")
    task_make("alpha")
    page = overview(operator_client)
    tile = block(page, "health-broker", "</div>")
    assert "unknown" in tile and "unreachable" in tile and "Connection refused" in tile
    assert "Celery workers answer only when asked" in page
    assert "Celery beat keeps when it last sent each job" in page


def test_health_gives_up_on_a_celery_broker_that_never_answers(
    operator_client, settings, silent_server
):
    celery_on(settings, f"redis://127.0.0.1:{silent_server}/0")
    tile = block(overview(operator_client), "health-broker", "</div>")
    assert "unreachable" in tile and "Timeout" in tile


def test_health_counts_the_messages_on_celery_s_redis_queue(operator_client, settings):
    url = "redis://127.0.0.1:6379/14"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as error:
        require(False, f"Redis at {url} is not reachable ({error})")
    queue = f"agentops-overview-test-{os.getpid()}"
    client.delete(queue)
    client.rpush(queue, "m1", "m2", "m3")
    try:
        celery_on(settings, url, queue)
        tile = block(overview(operator_client), "health-broker", "</li>")
    finally:
        client.delete(queue)
        client.close()
    assert ">3</span>" in tile and "Celery on Redis" in tile and "unreachable" not in tile


# Hostile names -------------------------------------------------------------------------------


def test_names_from_the_database_are_escaped(operator_client, frozen):
    evil = "<script>alert(1)</script>"
    task = task_make("evil", f"Evil {evil}")
    group = Group.objects.create(name=f"group {evil}")
    run = run_make(task, RunStatus.FAILED, NOW - timedelta(hours=1), model=f"m{evil}")
    run_make(task, RunStatus.RUNNING, NOW, lease_owner=f"{evil}:1:x",
             lease_expires_at=NOW + timedelta(seconds=60))  # fmt: skip
    approval_make(run, NOW - timedelta(minutes=3), kind=ApprovalKind.ACTION,
                  tool_name=evil, group=group)  # fmt: skip
    page = overview(operator_client)
    assert evil not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert page.count(escaped) >= 6  # task (twice), model, worker, tool, group
    assert "model=m%3Cscript%3Ealert%281%29%3C%2Fscript%3E" in page  # a link, encoded


# Query count ------------------------------------------------------------------------------------


def populate(tasks: int, runs_per_task: int) -> None:
    """Runs of every status over 20 days, leases, approvals and broker messages."""
    statuses = list(RunStatus.values)
    group = Group.objects.create(name=f"approvers-{tasks}")
    for t in range(tasks):
        task = task_make(f"task-{tasks}-{t}", max_spend=Decimal("1"))
        for r in range(runs_per_task):
            status = statuses[r % len(statuses)]
            run = run_make(
                task, status, NOW - timedelta(hours=7 * r + t), spend="0.1", tokens_in=10,
                model=f"model-{r % 3}",
                lease_owner=f"host:{r}:x" if status == RunStatus.RUNNING else "",
                lease_expires_at=NOW if status == RunStatus.RUNNING else None,
            )  # fmt: skip
            if status == RunStatus.WAITING:
                approval_make(run, NOW - timedelta(hours=r), kind=ApprovalKind.ACTION,
                              group=group if r % 2 else None)  # fmt: skip
    ModelPrice.objects.get_or_create(
        model="model-1", defaults={"input_per_million": 1, "output_per_million": 2}
    )
    get_broker().enqueue("message")


# Django's session and user; the runs live, by day, the month's spend and the prices;
# approvals by kind and the oldest; tasks failing; the leases, the broker's queue and the
# schedules; the nav's inbox count (the person's permissions, then the count).
OVERVIEW_QUERIES = 2 + 4 + 2 + 1 + 3 + 3


def test_the_query_count_is_pinned_and_does_not_grow_with_the_data(
    operator_client, frozen, django_assert_num_queries
):
    populate(tasks=2, runs_per_task=7)
    with django_assert_num_queries(OVERVIEW_QUERIES):
        small = overview(operator_client)
    populate(tasks=6, runs_per_task=40)
    with django_assert_num_queries(OVERVIEW_QUERIES):
        large = overview(operator_client)
    assert "task-6-5" in large and "task-2-1" in small
    assert len(re.findall(r"<tr>", block(large, "spend-by-task", "</table>"))) == 1 + 8
