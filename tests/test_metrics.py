"""Prometheus /metrics: the deployment's figures from the database, for a token or staff."""

from __future__ import annotations

import threading
import time

import pytest
from django.contrib.auth.models import User
from prometheus_client.parser import text_string_to_metric_families

from agentops.runtime.engine import Outcome
from approvals.models import Approval
from approvals.services import approval_decide
from tasks.models import RunStatus
from tasks.services import run_start
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture
def metrics_token(settings) -> str:
    settings.AGENTOPS_METRICS_TOKEN = TOKEN
    return TOKEN


def scrape(client, token: str = TOKEN) -> dict[tuple[str, tuple], float]:
    """Every sample, by name and sorted labels, as Prometheus's own parser reads them."""
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        assert family.name.startswith("agentops_")
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_figures_move_when_a_run_runs(client, make_task, operator, metrics_token):
    task = make_task(
        [
            {"calls": [("test_send", {"text": "x"})], "tokens_in": 100, "tokens_out": 20},
            {"content": "sent", "tokens_in": 150, "tokens_out": 10},
        ],
        tools=["test_send"],
    )
    before = scrape(client)
    assert value(before, "agentops_runs_total", task=task.slug, status="succeeded") == 0

    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    waiting = scrape(client)
    assert value(waiting, "agentops_runs_live", task=task.slug, status="waiting") == 1
    assert value(waiting, "agentops_approvals_waiting", kind="action") == 1
    assert value(waiting, "agentops_approval_oldest_age_seconds") >= 0
    assert value(waiting, "agentops_steps_open", kind="tool", status="proposed") == 1

    approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    after = scrape(client)

    assert value(after, "agentops_runs_total", task=task.slug, status="succeeded") == 1
    assert value(after, "agentops_runs_created_total", task=task.slug) == 1
    assert value(after, "agentops_runs_live", task=task.slug, status="waiting") == 0
    assert value(after, "agentops_approvals_waiting", kind="action") == 0
    model = task.model
    assert value(after, "agentops_model_tokens_total", model=model, type="input") == 250
    assert value(after, "agentops_model_tokens_total", model=model, type="output") == 30
    model_steps = run.steps.filter(kind="model").count()
    assert (
        value(after, "agentops_steps_total", kind="model", status="succeeded")
        - value(before, "agentops_steps_total", kind="model", status="succeeded")
        == model_steps
    )
    assert value(after, "agentops_steps_total", kind="tool", status="succeeded") == 1
    assert value(after, "agentops_steps_open", kind="tool", status="proposed") == 0
    # The latencies, from the steps' recorded durations, in the histogram's buckets.
    assert value(after, "agentops_tool_call_duration_seconds_count", tool="test_send") == 1
    assert (
        value(after, "agentops_tool_call_duration_seconds_bucket", tool="test_send", le="+Inf") == 1
    )
    assert (
        value(after, "agentops_tool_call_duration_seconds_bucket", tool="test_send", le="300.0")
        == 1
    )
    model_calls = run.steps.filter(kind__in=["model", "check"]).count()
    assert value(after, "agentops_model_call_duration_seconds_count", model=model) == model_calls
    assert value(after, "agentops_queue_up", queue="q2") == 1
    assert ("agentops_lease_recoveries_total", ()) in after


def test_a_scrape_is_a_fixed_number_of_queries(
    client, make_task, operator, metrics_token, django_assert_num_queries
):
    for _ in range(3):  # more runs, steps and approvals cost no more statements
        task = make_task([{"calls": [("test_send", {"text": "x"})]}], tools=["test_send"])
        run_until_rest(run_start(task=task, run_input={}, user=operator))
    # runs, steps, approvals by kind and the oldest, live runs, the q2 broker, firings,
    # the trail's recoveries.
    with django_assert_num_queries(8):
        scrape(client)


def test_refused_without_the_token_or_a_staff_sign_in(client, operator, metrics_token):
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")
    assert wrong.status_code == 401
    for response in (anonymous, wrong):
        assert b"agentops_" not in response.content

    client.force_login(operator)  # signed in, not staff
    assert client.get("/metrics").status_code == 403
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405

    staff = User.objects.create_user("stella", "stella@example.com", "pw-stella-123", is_staff=True)
    client.force_login(staff)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"agentops_runs_created" in response.content


def test_no_token_configured_refuses_every_bearer(client, settings):
    settings.AGENTOPS_METRICS_TOKEN = ""
    for token in ("", "anything"):
        response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert response.status_code == 401
        assert b"agentops_" not in response.content


def test_scrapes_that_pile_up_share_one_reading(monkeypatch):
    """Scrapes that ask while one is being read get its result, not one read each; a
    scrape that asks after it finished reads again (never an old figure)."""
    from agentops import metrics

    readings = []
    started = threading.Event()
    release = threading.Event()

    def slow() -> bytes:
        readings.append(1)
        started.set()
        release.wait(5)
        return f"reading {len(readings)}".encode()

    monkeypatch.setattr(metrics, "metrics_text", slow)
    first = threading.Thread(target=metrics.metrics_text_shared)
    first.start()
    started.wait(5)
    answers: list[bytes] = []
    waiting = [
        threading.Thread(target=lambda: answers.append(metrics.metrics_text_shared()))
        for _ in range(3)
    ]
    for thread in waiting:
        thread.start()
    time.sleep(0.2)  # the three wait on the first
    release.set()
    first.join(5)
    for thread in waiting:
        thread.join(5)
    assert answers == [b"reading 1"] * 3 and len(readings) == 1
    assert metrics.metrics_text_shared() == b"reading 2"
