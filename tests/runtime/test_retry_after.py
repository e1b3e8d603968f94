"""A busy model server's Retry-After is honoured: the next attempt waits what the server
asked (bounded by a maximum and by the run's time budget), not the default backoff.
Over real HTTP, against the local OpenAI-compatible test server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from agentops.runtime.budgets import Limits, Usage
from agentops.runtime.engine import Outcome
from agentops.runtime.models.base import (
    RETRY_AFTER_MAX_SECONDS,
    ModelError,
    retry_after_seconds,
)
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from lineage.models import LineageEvent
from tasks.models import RunStatus
from tasks.services import run_start
from tests.conftest import run_until_rest
from tests.peers.openai_server import OpenAICompatibleServer, completion

MESSAGES = [{"role": "user", "content": "Say hello."}]
# The first turn's answer: the plan every run drafts first.
PLANNED = completion(None, [("call_plan", "plan_update", {"steps": [{"title": "say done"}]})])


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


def served_run(make_task, operator, settings, server: OpenAICompatibleServer, **fields):
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "test"
    # The default backoff is a hundredth of a second: any longer wait is the server's.
    settings.AGENTOPS_MODEL_BACKOFF_SECONDS = 0.01
    task = make_task([], self_check=False, **fields)
    task.model = "test-model"
    task.save()
    return run_start(task=task, run_input={}, user=operator)


def retry_delays(run) -> list[float]:
    events = LineageEvent.objects.filter(run_uuid=run.pk, kind="model.retrying").order_by("seq")
    return [event.payload["delay"] for event in events]


# The client reads the header -----------------------------------------------------------


def test_a_429_carries_the_servers_retry_after_in_seconds():
    with OpenAICompatibleServer() as server:
        server.reply_busy("7")
        client = OpenAICompatibleClient(
            model="test-model", api_key="test", base_url=server.base_url, timeout=5
        )
        with pytest.raises(ModelError) as caught:
            client.complete(messages=MESSAGES, tools=[])
    assert caught.value.status == 429 and caught.value.transient
    assert caught.value.retry_after == 7.0
    assert len(server.requests) == 1  # the client still never retries by itself


def test_retry_after_reads_seconds_dates_and_milliseconds_and_ignores_nonsense():
    now = datetime(2026, 12, 4, 18, 0, 0, tzinfo=UTC)

    def headers(given: dict[str, str]) -> dict[str, str]:
        return {name.lower(): value for name, value in given.items()}  # as HTTP reads them

    assert retry_after_seconds(headers({"Retry-After": "3"})) == 3.0
    date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds(headers({"Retry-After": date}), now=now) == 90.0
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds(headers({"Retry-After": past}), now=now) == 0.0
    assert retry_after_seconds(headers({"retry-after-ms": "1500", "Retry-After": "9"})) == 1.5
    for nonsense in ("soon", "-4", "nan", "inf", ""):
        assert retry_after_seconds(headers({"Retry-After": nonsense})) is None
    assert retry_after_seconds(headers({})) is None


def test_the_wait_is_the_servers_within_a_maximum_and_the_time_budget():
    busy = ModelError("429", transient=True, status=429, retry_after=5.0)
    unlimited, fresh = Limits(steps=10), Usage(steps=0)
    assert busy.retry_wait(0.5, unlimited, fresh) == 5.0
    assert busy.retry_wait(8.0, unlimited, fresh) == 8.0  # a longer backoff still holds
    assert ModelError("x", transient=True).retry_wait(0.5, unlimited, fresh) == 0.5
    greedy = ModelError("429", transient=True, status=429, retry_after=86400.0)
    assert greedy.retry_wait(0.5, unlimited, fresh) == RETRY_AFTER_MAX_SECONDS
    timed = Limits(steps=10, seconds=30.0)
    assert busy.retry_wait(0.5, timed, Usage(steps=1, seconds=28.0)) == 2.0
    assert busy.retry_wait(0.5, timed, Usage(steps=1, seconds=31.0)) == 0.0


# The engine waits it -----------------------------------------------------------------


@pytest.mark.django_db
def test_a_429_with_retry_after_in_seconds_waits_that_long_before_the_next_attempt(
    make_task, operator, settings
):
    with OpenAICompatibleServer() as server:
        run = served_run(make_task, operator, settings, server)
        server.reply_busy("2")
        server.reply(PLANNED)
        server.reply(completion("done"))
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert retry_delays(run) == [2.0]
    first, second, _answer = server.arrivals
    assert second - first >= 2.0


@pytest.mark.django_db
def test_a_503_with_retry_after_as_an_http_date_waits_until_then(make_task, operator, settings):
    with OpenAICompatibleServer() as server:
        run = served_run(make_task, operator, settings, server)
        server.reply_busy(http_date(3), status=503, message="warming up")
        server.reply(PLANNED)
        server.reply(completion("done"))
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    [delay] = retry_delays(run)
    # An HTTP date has whole seconds: the wait is what is left of the three of them.
    assert 1.0 < delay <= 3.0
    first, second, _answer = server.arrivals
    assert second - first >= delay


@pytest.mark.django_db
def test_a_retry_after_longer_than_the_time_budget_waits_only_what_is_left(
    make_task, operator, settings
):
    with OpenAICompatibleServer() as server:
        run = served_run(make_task, operator, settings, server, max_seconds=2)
        server.reply_busy("30")
        server.reply(completion("done"))
        run_until_rest(run)

    [delay] = retry_delays(run)
    # Hardly any work was done before the retry: nearly all two seconds were left.
    assert 1.0 < delay <= 2.0
