"""manage.py bench_triggers, once, small: it starts the server, sends signed deliveries
with duplicates among them, and its figures agree with each other and the database."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks.models import Run, RunStatus, Trigger
from tests.peers import workers
from triggers.models import Firing

# Committed for real: the server the bench starts is another process.
pytestmark = pytest.mark.django_db(transaction=True)


def figure(text: str, pattern: str) -> tuple[str, ...]:
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"{pattern!r} not in:\n{text}"
    return found.groups()


def agrees(rate: str, count: int, seconds: str) -> bool:
    """Whether a printed rate is count / seconds, given that both were rounded as printed."""
    half = 0.5 * 10 ** -len(seconds.partition(".")[2])
    low, high = count / (float(seconds) + half), count / (float(seconds) - half)
    return low - 0.05 <= float(rate) <= high + 0.05


def test_the_bench_prints_figures_that_agree_with_the_database():
    output = StringIO()
    call_command(
        "bench_triggers",
        "--deliveries",
        "40",
        "--clients",
        "4",
        "--duplicates",
        "0.25",
        "--database-url",
        workers.test_database_url(),
        stdout=output,
    )
    text = output.getvalue()

    assert figure(text, r"^server: http://127\.0\.0\.1:(\d+) \(manage\.py runserver")
    sent, clients, again, distinct = map(
        int,
        figure(
            text,
            r"^deliveries: (\d+) from (\d+) client threads, a connection each  "
            r"duplicates: (\d+) \(\d+%\) of (\d+) distinct webhook-ids$",
        ),
    )
    assert (sent, clients, again, distinct) == (40, 4, 10, 30)
    answered, seconds, per_second = figure(
        text, r"^deliveries answered: (\d+) in (\d+\.\d+) s \((\d+\.\d+) per second\)$"
    )
    assert int(answered) == 40 and agrees(per_second, 40, seconds)
    accepted_rate, accepted = figure(
        text, r"^deliveries accepted per second: (\d+\.\d+) \((\d+) runs queued\)$"
    )
    assert int(accepted) == distinct
    assert agrees(accepted_rate, distinct, seconds)
    p50, p99 = map(
        float, figure(text, r"^delivery to queued run \(202\), ms: p50 (\d+\.\d+)  p99 (\d+\.\d+)$")
    )
    assert 0 < p50 <= p99
    refused, of, share = figure(
        text, r"^duplicates refused: (\d+) of (\d+) \((\d+\.\d)%\), each answered 200"
    )
    assert (int(refused), int(of), share) == (10, 10, "100.0")
    assert figure(text, r"^answers: (.*)$") == ("200 x10, 202 x30",)
    assert figure(text, r"^load average before: (\S+)") and figure(
        text, r"^load average after: (\S+)"
    )

    # The database agrees: one queued run per distinct id, and one per warm-up delivery.
    runs, from_deliveries, warm_ups = map(
        int,
        figure(
            text,
            r"^runs queued by the bench trigger: (\d+) \((\d+) from the deliveries, "
            r"(\d+) from the warm-up\)$",
        ),
    )
    assert (runs, from_deliveries, warm_ups) == (34, 30, 4)
    trigger = Trigger.objects.get(kind=Trigger.Kind.WEBHOOK, name="bench webhook")
    assert Run.objects.filter(trigger=trigger, status=RunStatus.QUEUED).count() == 34
    assert Firing.objects.filter(trigger=trigger, accepted=True).count() == 34
    assert not Firing.objects.filter(trigger=trigger, accepted=False).exists()


def test_the_bench_sends_only_on_loopback():
    with pytest.raises(CommandError, match="not a loopback address"):
        call_command("bench_triggers", "--url", "http://192.0.2.1:8000", stdout=StringIO())
