"""manage.py bench_pages, short: it makes its database, seeds a small volume with valid
trails, times every page, and prints figures that are well-formed and agree with what
the database holds; a second run uses the database as it is; it works only on a
bench's database on this machine.

The bench itself needs PostgreSQL (COPY): it runs once, in the suite's PostgreSQL pass.
The refusals take no database and run in both passes."""

from __future__ import annotations

import os
import re
from io import StringIO
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from agentops.bench_pages import LONG_RUN_ID, LONG_RUN_STEPS
from tasks.models import Task

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
RUNS, STEPS_PER_RUN = 200, 5
PAGES = 12
# A page's line: path, status, then its figures or why there are none.
FIGURES = re.compile(
    r"^(?P<path>/\S*)\s+200\s+(?P<median>\d+\.\d)\s+(?P<p90>\d+\.\d)\s+(?P<queries>\d+)"
    r"\s+(?P<kib>\d+\.\d)\s+(?P<verdict>PASS|MISS)$"
)
REFUSED = re.compile(r"^(?P<path>/\S*)\s+(?P<status>\d{3})\s+answered (?P=status), not 200")


def scratch_url(name: str) -> str:
    return urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))


def bench(*arguments: str) -> str:
    output = StringIO()
    try:
        call_command("bench_pages", *arguments, stdout=output)
    except CommandError as error:
        raise AssertionError(f"{error}\n{output.getvalue()}") from None
    return output.getvalue()


def figure(pattern: str, text: str) -> int:
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"no {pattern!r} in:\n{text}"
    return int(found.group(1).replace(",", ""))


@pytest.fixture
def bench_database():
    """A bench database of this test's own on the suite's server, dropped afterwards."""
    name = f"agentops_bench_pages_test_{os.getpid()}"
    yield name, scratch_url(name)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as server:
        server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="run once, in the suite's PostgreSQL pass"
)
def test_the_bench_seeds_times_every_page_and_its_figures_agree_with_the_database(
    bench_database, capfd
):
    name, url = bench_database
    volume = ("--runs", str(RUNS), "--steps-per-run", str(STEPS_PER_RUN))
    text = bench("--database-url", url, *volume, "--requests", "2")

    assert f"database: postgresql {name} on 127.0.0.1:5432 (created)" in text
    assert "seeding: done in " in text
    with psycopg.connect(url) as seeded:
        held = {
            table: seeded.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in (
                "tasks_run",
                "tasks_step",
                "lineage_lineageevent",
                "approvals_approval",
            )
        }
        pending = seeded.execute(
            "SELECT count(*) FROM approvals_approval WHERE status = 'pending'"
        ).fetchone()[0]
        long_run = seeded.execute(
            "SELECT (SELECT count(*) FROM tasks_step WHERE run_id = %s),"
            " (SELECT count(*) FROM lineage_lineageevent WHERE run_uuid = %s)",
            [LONG_RUN_ID, LONG_RUN_ID],
        ).fetchone()
    steps = (RUNS - 1) * STEPS_PER_RUN + LONG_RUN_STEPS
    assert held["tasks_run"] == figure(r"^runs: ([\d,]+) ", text) == RUNS
    assert held["tasks_step"] == figure(r"  steps: ([\d,]+) ", text) == steps
    assert held["lineage_lineageevent"] == figure(r"lineage events: ([\d,]+) ", text) == steps
    assert held["approvals_approval"] == figure(r"approvals: ([\d,]+) \(", text) > 0
    assert pending == figure(r"\(([\d,]+) pending\)", text) > 0
    assert long_run == (LONG_RUN_STEPS, LONG_RUN_STEPS)

    lines = [line for line in text.splitlines() if line.startswith("/")]
    assert len(lines) == PAGES
    paths = []
    for line in lines:
        timed, refused = FIGURES.match(line), REFUSED.match(line)
        assert timed or refused, f"not a page's figures: {line!r}"
        if timed:
            median, p90 = float(timed["median"]), float(timed["p90"])
            assert 0 < median <= p90
            assert int(timed["queries"]) >= 1  # at least the session
            assert float(timed["kib"]) > 0
            assert timed["verdict"] == ("PASS" if median < 150 else "MISS")
        paths.append((timed or refused)["path"])
    assert paths[:5] == ["/", "/runs/", "/runs/?page=2", "/runs/?status=failed", "/approvals/"]
    assert f"/runs/{LONG_RUN_ID}/lineage/" in paths
    assert re.search(r"^load average before: \d+\.\d+", text, re.MULTILINE)
    assert re.search(r"^load average after: \d+\.\d+", text, re.MULTILINE)
    answered = sum(1 for line in lines if FIGURES.match(line))
    missed = sum(1 for line in lines if line.endswith("MISS"))
    assert figure(r"^pages under 150 ms: (\d+) of", text) == answered - missed
    # Nothing went where the suite's own database would see it.
    assert not Task.objects.filter(slug__startswith="bench-pages-").exists()

    again = bench("--database-url", url, *volume, "--requests", "1")
    assert "(there already)" in again
    assert "seeding: skipped, the database holds that volume already" in again
    assert figure(r"^runs: ([\d,]+) ", again) == RUNS

    # Another volume is not seeded over this one: the child process says why, and fails.
    capfd.readouterr()
    with pytest.raises(AssertionError, match="the bench stopped with exit status 1"):
        bench("--database-url", url, "--runs", str(RUNS + 1), *volume[2:], "--requests", "1")
    said = capfd.readouterr().err
    assert f"holds {RUNS} runs, {steps:,} steps and {steps:,} lineage events, not the" in said
    assert "pass --reseed to make it again" in said


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgres://postgres@10.1.2.3:5432/agentops_bench_pages", "not a loopback address"),
        ("postgres://postgres@db.example.org/agentops_bench_pages", "not a loopback address"),
        ("postgres://postgres@127.0.0.1:5432/agentops", "is not a bench's"),
        ("postgres://postgres@127.0.0.1:5432/test", "is not a bench's"),
        ("sqlite:///var/agentops_bench.sqlite3", "must name a PostgreSQL database"),
        ("mysql://root@127.0.0.1/agentops_bench", "is not supported"),
    ],
)
def test_the_bench_refuses_a_database_that_is_not_a_bench_s_on_this_machine(url, said):
    with pytest.raises(CommandError, match=said):
        call_command("bench_pages", "--database-url", url, stdout=StringIO())
