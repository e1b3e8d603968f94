"""Providers treated well: a cap on calls at once, requests and tokens a minute, and a
429's Retry-After held for every call to the provider; a run over the limits waits its
turn holding nothing, and its page says so."""

from __future__ import annotations

import math
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from agentops.config import env_provider_limits
from agentops.runtime.engine import waits
from agentops.runtime.models.base import ModelError
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from agentops.runtime.providers import Limits, Provider, limits_parse, provider_for
from tasks.models import Run, RunStatus
from tests.peers.openai_server import OpenAICompatibleServer
from tests.peers.paced_model import PacedModel
from tests.runtime.test_runner import runs_at_rest, served_runs


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "is not JSON"),
        ("[]", "must be a JSON object"),
        ('{"gpt-4o": {}}', "one or more of concurrency, rpm, tpm"),
        ('{"gpt-4o": {"burst": 3}}', "unknown limit burst"),
        ('{"gpt-4o": {"rpm": 0}}', "rpm must be a whole number from 1"),
        ('{"gpt-4o": {"rpm": true}}', "rpm must be a whole number from 1"),
        ('{"gpt-4o": {"tpm": 1.5}}', "tpm must be a whole number from 1"),
        ('{" ": {"rpm": 1}}', "must name a model"),
    ],
)
def test_limits_that_cannot_be_read_stop_start_up_with_what_is_wrong(monkeypatch, text, problem):
    monkeypatch.setenv("AGENTOPS_PROVIDER_LIMITS", text)
    with pytest.raises(ImproperlyConfigured, match=problem):
        env_provider_limits("AGENTOPS_PROVIDER_LIMITS")


def test_a_call_follows_its_model_then_its_base_url_then_the_default(settings):
    settings.AGENTOPS_PROVIDER_LIMITS = limits_parse(
        '{"gpt-4o": {"rpm": 1}, "http://llm.internal:8000/v1/": {"rpm": 2}, "*": {"rpm": 3}}'
    )
    assert provider_for("gpt-4o", "http://llm.internal:8000/v1").key == "gpt-4o"
    assert provider_for("llama", "http://llm.internal:8000/v1").limits.rpm == 2
    assert provider_for("llama", "http://other:1/v1").key == "*"
    settings.AGENTOPS_PROVIDER_LIMITS = {}
    assert provider_for("gpt-4o", None) is None


def test_the_cap_on_calls_at_once_lets_one_through_as_one_ends():
    provider = Provider("m", Limits(concurrency=2))
    assert provider.admission(10) == (0.0, "")
    assert provider.admission(10) == (0.0, "")
    delay, why = provider.admission(10)
    assert math.isinf(delay) and why == "2 calls at once"
    woken: list[str] = []
    provider.on_release(lambda: woken.append("first"))
    provider.on_release(lambda: woken.append("second"))
    provider.done(reserved=10, used=12)
    assert woken == ["first"], "one call ended: one waiter goes"
    assert provider.admission(10) == (0.0, "")


def test_requests_a_minute_are_a_sliding_window():
    provider = Provider("m", Limits(rpm=2))
    assert provider.admission(0, now=100.0) == (0.0, "")
    assert provider.admission(0, now=110.0) == (0.0, "")
    assert provider.admission(0, now=120.0) == (40.0, "2 requests a minute")
    # A minute after the first, it leaves the window.
    assert provider.admission(0, now=160.5) == (0.0, "")


def test_tokens_a_minute_count_what_each_call_used():
    provider = Provider("m", Limits(tpm=1000))
    assert provider.admission(400, now=100.0) == (0.0, "")
    provider.done(reserved=400, used=500)  # it used more than it reserved: counted so
    assert provider.admission(400, now=110.0) == (0.0, "")
    provider.done(reserved=400, used=300)
    delay, why = provider.admission(300, now=120.0)  # 800 used: 300 more is over 1000
    assert why == "1000 tokens a minute" and delay == pytest.approx(40.0)
    assert provider.admission(150, now=120.0) == (0.0, "")


def test_a_429_with_retry_after_holds_every_call_to_the_provider(settings):
    settings.AGENTOPS_PROVIDER_LIMITS = {"busy-model": Limits(concurrency=5)}
    with OpenAICompatibleServer() as server:
        server.reply_busy("3")
        client = OpenAICompatibleClient(
            model="busy-model", api_key="test", base_url=server.base_url, timeout=5
        )
        with pytest.raises(ModelError):
            waits.model_complete(
                client, messages=[{"role": "user", "content": "hi"}], tools=[], max_tokens=64
            )
    provider = provider_for("busy-model", server.base_url)
    delay, why = provider.admission(64)
    assert 2.0 < delay <= 3.0 and "429" in why
    assert provider.active == 0, "the refused call gave its slot back"


@pytest.mark.django_db(transaction=True)
def test_runs_over_the_cap_wait_their_turn_holding_nothing_and_their_page_says_so(
    make_task,
    operator,
    settings,
    runner,
    client,
):
    settings.AGENTOPS_PROVIDER_LIMITS = {"test-model": Limits(concurrency=3)}
    client.force_login(operator)
    with PacedModel(0.5) as model:
        runs = served_runs(make_task, operator, settings, model, 9)
        for run in runs:
            assert runner.submit(run.pk)
        notes: set[str] = set()
        page = ""
        deadline = time.monotonic() + 20
        while model.served < 3 and time.monotonic() < deadline:
            for waiting in Run.objects.filter(pk__in=[r.pk for r in runs]).exclude(waiting_on=""):
                notes.add(waiting.waiting_on)
                if not page:
                    page = client.get(reverse("runs:detail", args=[waiting.pk])).content.decode()
            time.sleep(0.05)
        done = runs_at_rest(runs, seconds=30)
    assert [run.status for run in done] == [RunStatus.SUCCEEDED] * 9
    assert model.peak == 3, f"{model.peak} calls were out at once, over the cap of 3"
    assert notes == {"test-model: 3 calls at once"}
    assert "Waiting for its provider's capacity: test-model: 3 calls at once." in page
    assert all(run.waiting_on == "" for run in done)
