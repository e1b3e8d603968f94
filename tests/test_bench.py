"""manage.py bench_engine, once, small: it prints its figures and its runs succeed."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command

from tasks.models import Run, RunStatus
from tests.peers import workers

# Committed for real: the bench counts commits (a test transaction would turn them into
# savepoints) and its worker process must see the runs.
pytestmark = pytest.mark.django_db(transaction=True)


def test_the_bench_prints_its_figures_and_its_runs_succeed():
    output = StringIO()
    call_command(
        "bench_engine",
        "--runs",
        "2",
        "--steps",
        "3",
        "--workers",
        "1",
        "--database-url",
        workers.test_database_url(),
        stdout=output,
    )
    text = output.getvalue()

    for line in (
        "database: ",
        "runs: 2  agent steps per run: 3  workers: 1",
        "engine overhead per agent step: median ",
        "agent steps per second, 1 worker: ",
        "agent steps per second, 1 worker process: ",
        "queries per agent step: ",
    ):
        assert line in text, text
    commits = re.search(r"^commits per agent step: (\d+\.\d+) ", text, re.MULTILINE)
    assert commits is not None and float(commits.group(1)) > 0, text
    assert re.search(r"^goal: at most 3 commits per agent step: (PASS|MISS)$", text, re.M), text

    slug = re.search(r"^bench task: (bench-[0-9a-f]+) ", text, re.MULTILINE).group(1)
    runs = Run.objects.filter(task__slug=slug)
    # One counted, two timed, and the worker process's warm-up run and two timed.
    assert runs.count() == 6
    assert set(runs.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    assert [run.steps.count() for run in runs] == [2 * 3 + 1] * 6


def test_commits_are_counted_in_and_outside_transactions():
    from django.db import connection, transaction

    from agentops.bench import database_counted

    table = connection.ops.quote_name(Run._meta.db_table)
    with database_counted(connection) as count:
        with transaction.atomic():  # two writes, one commit
            Run.objects.filter(pk=None).update(reason="")
            Run.objects.filter(pk=None).update(reason="")
        Run.objects.filter(pk=None).update(reason="")  # autocommit: its own commit
        with connection.cursor() as cursor:  # a write inside WITH commits by itself too
            cursor.execute(f"WITH gone AS (SELECT 1) UPDATE {table} SET reason = '' WHERE 1 = 0")
            cursor.execute("WITH one AS (SELECT 1) SELECT * FROM one")  # reads: no commit
        list(Run.objects.all()[:1])
    assert count.commits == 3
    assert count.queries == 6
