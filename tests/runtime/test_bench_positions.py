"""manage.py bench_engine --positions, once, small: it prints the cost of an agent step
by its position within a run, the first steps against the last, and the machine's load."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command

from tasks.models import Run, RunStatus
from tests.peers import workers

# Committed for real, as the bench's own test has it (tests/test_bench.py).
pytestmark = pytest.mark.django_db(transaction=True)


def test_the_bench_prints_the_cost_by_position_within_a_run():
    output = StringIO()
    arguments = ["--positions", "--runs", "2", "--steps", "6"]
    call_command(
        "bench_engine", *arguments, "--database-url", workers.test_database_url(), stdout=output
    )
    text = output.getvalue()

    assert "runs: 2  agent steps per run: 6  (cost by position)" in text, text
    assert re.search(r"^load average before: \S+", text, re.MULTILINE), text
    for span in ("1-3", "4-6"):
        line = rf"^agent steps {span}: \d+\.\d+ ms per agent step \(of which, ms: transcript "
        assert re.search(
            line + r"\d+\.\d+, loops check \d+\.\d+, token estimate \d+\.\d+\)$", text, re.MULTILINE
        ), text
    assert re.search(r"^last 3 / first 3: \d+\.\d+; goal at most 1\.2: (PASS|MISS)$", text, re.M)
    slug = re.search(r"^bench task: (bench-[0-9a-f]+) ", text, re.MULTILINE).group(1)
    runs = Run.objects.filter(task__slug=slug)
    assert runs.count() == 3  # one to warm up, two timed
    assert set(runs.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
