"""``manage.py bench_lineage`` at a tiny size: it seeds, verifies and cleans up."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

pytestmark = pytest.mark.django_db


@pytest.mark.postgres
def test_the_benchmark_seeds_verifies_and_drops_its_database():
    if connection.vendor != "postgresql":
        pytest.skip("bench_lineage measures PostgreSQL")
    out = StringIO()
    call_command("bench_lineage", events=50, chains=7, workers=2, stdout=out)
    text = out.getvalue()
    assert "seeded 50 events in 7 chains" in text
    assert re.search(r"verified 50 events in 7 chains \(7 held against the checkpoint\)", text)
    assert re.search(r"with 2 workers: [\d,]+ events/s", text)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'agentops_bench_lineage_%%'"
        )
        assert cursor.fetchone() == (0,)


def test_the_benchmark_refuses_bad_sizes_and_sqlite():
    with pytest.raises(CommandError, match="--chains 0: must be at least 1"):
        call_command("bench_lineage", events=10, chains=0)
    with pytest.raises(CommandError, match="--chains 20 is more than --events 10"):
        call_command("bench_lineage", events=10, chains=20)
    if connection.vendor == "sqlite":
        with pytest.raises(CommandError, match="needs PostgreSQL"):
            call_command("bench_lineage", events=10, chains=2)
