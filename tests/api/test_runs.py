"""Runs through the API: started (idempotently with a key), read with steps, usage and
trigger, listed with the runs page's filters, cancelled."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from agentops.models import IdempotencyKey
from tasks.models import Run, RunStatus
from tests.conftest import PLANNED, run_until_rest

pytestmark = pytest.mark.django_db


@pytest.fixture
def operate(api_client, make_token, operator):
    return api_client(make_token(operator, "operate"))


def test_a_run_starts_and_is_read_with_its_steps_usage_and_trigger(operate, make_task):
    task = make_task([PLANNED, {"content": "all done"}], self_check=False)
    response = operate.post("/api/runs", {"task": task.slug, "input": {"batch": "2026-11"}})
    assert response.status_code == 201
    started = response.json()
    assert started["status"] == "queued" and started["task"] == task.slug
    assert started["trigger"] == {"kind": "manual", "id": None, "name": None, "firing_key": None}
    assert started["started_by"] == "olivia"
    run = Run.objects.get()
    assert str(run.pk) == started["id"] and run.input == {"batch": "2026-11"}

    run_until_rest(run)
    read = operate.get(f"/api/runs/{run.pk}").json()
    assert read["status"] == "succeeded" and read["outcome"] == "all done"
    assert [step["number"] for step in read["steps"]] == list(range(1, len(read["steps"]) + 1))
    assert read["usage"]["steps"] == run.steps_used > 0
    assert read["earlier_steps"] is False


def test_the_same_idempotency_key_twice_starts_one_run(operate, make_task):
    task = make_task([{"content": "done"}])
    body = {"task": task.slug, "input": {"n": 1}}
    first = operate.post("/api/runs", body, headers={"Idempotency-Key": "batch-7"})
    again = operate.post("/api/runs", body, headers={"Idempotency-Key": "batch-7"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert Run.objects.count() == 1

    other = operate.post(
        "/api/runs", {**body, "input": {"n": 2}}, headers={"Idempotency-Key": "batch-7"}
    )
    assert other.status_code == 409
    assert other.json()["type"] == "urn:agentops:problem:idempotency-key-reused"
    assert Run.objects.count() == 1
    # Another key is another run.
    assert (
        operate.post("/api/runs", body, headers={"Idempotency-Key": "batch-8"}).status_code == 201
    )
    assert Run.objects.count() == 2


def test_a_key_is_per_user(api_client, make_token, operator, make_task, django_user_model):
    from django.contrib.auth.models import Permission

    task = make_task([{"content": "done"}])
    other = django_user_model.objects.create_user("otto", "otto@example.com", "pw-otto-12345")
    other.user_permissions.add(Permission.objects.get(codename="start_run"))
    body = {"task": task.slug, "input": {}}
    key = {"Idempotency-Key": "shared"}
    assert (
        api_client(make_token(operator, "operate")).post("/api/runs", body, headers=key).status_code
        == 201
    )
    assert (
        api_client(make_token(other, "operate")).post("/api/runs", body, headers=key).status_code
        == 201
    )
    assert Run.objects.count() == 2


def test_a_refused_start_keeps_no_key_and_names_the_input(operate, make_task):
    task = make_task(
        [{"content": "done"}],
        input_schema={
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
        },
    )
    response = operate.post(
        "/api/runs", {"task": task.slug, "input": {}}, headers={"Idempotency-Key": "k"}
    )
    assert response.status_code == 422
    problem = response.json()
    assert problem["errors"][0]["pointer"] == "/input"
    assert "schema" in problem["errors"][0]["detail"]
    assert not Run.objects.exists() and not IdempotencyKey.objects.exists()
    # Corrected, the same key starts the run.
    fixed = operate.post(
        "/api/runs", {"task": task.slug, "input": {"n": 1}}, headers={"Idempotency-Key": "k"}
    )
    assert fixed.status_code == 201


def test_an_unknown_task_is_named(operate):
    response = operate.post("/api/runs", {"task": "nope", "input": {}})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"location": "body", "pointer": "/task", "detail": "there is no task 'nope'"}
    ]


def test_a_bad_idempotency_key_is_refused(operate, make_task):
    task = make_task([{"content": "done"}])
    response = operate.post("/api/runs", {"task": task.slug}, headers={"Idempotency-Key": "a b"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["location"] == "header"
    assert response.json()["errors"][0]["pointer"] == "Idempotency-Key"
    assert not Run.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_start_one_run(
    api_client, make_token, operator, make_task
):
    """Two requests at once with the same key: the unique key row makes the second
    wait for the first and answer with its run (on PostgreSQL the second INSERT waits on
    the unique index; on SQLite the second transaction waits for the write lock)."""
    task = make_task([{"content": "done"}])
    secret = make_token(operator, "operate")
    from django.test import Client

    answers: list[tuple[int, str]] = []
    barrier = threading.Barrier(2)

    def send() -> None:
        client = Client()
        barrier.wait()
        response = client.post(
            "/api/runs",
            data={"task": task.slug, "input": {}},
            content_type="application/json",
            headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": "once"},
        )
        answers.append((response.status_code, response.json().get("id", "")))
        connection.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(status for status, _ in answers) == [200, 201]
    assert len({run_id for _, run_id in answers}) == 1
    assert Run.objects.count() == 1


def test_the_list_filters_as_the_runs_page_does_and_pages(operate, make_task):
    from tasks.selectors import RUNS_PER_PAGE
    from tasks.services import run_start

    first = make_task([{"content": "done"}])
    second = make_task([{"content": "done"}])
    for _ in range(RUNS_PER_PAGE + 1):
        run_start(task=first, run_input={"who": "ada"})
    run_start(task=second, run_input={"who": "grace"})

    everything = operate.get("/api/runs").json()
    assert everything["count"] == RUNS_PER_PAGE + 2 and everything["pages"] == 2
    assert len(everything["items"]) == RUNS_PER_PAGE
    assert len(operate.get("/api/runs?page=2").json()["items"]) == 2
    assert operate.get("/api/runs?page=3").json()["items"] == []

    by_task = operate.get(f"/api/runs?task={second.slug}").json()
    assert by_task["count"] == 1 and by_task["items"][0]["task"] == second.slug
    assert operate.get("/api/runs?q=grace").json()["count"] == 1
    assert operate.get("/api/runs?status=succeeded").json()["count"] == 0


def test_bad_filters_are_named_not_ignored(operate):
    response = operate.get("/api/runs?task=nope&since=2026-12-02&until=2026-12-01&status=lost")
    assert response.status_code == 422
    fields = {error["pointer"] for error in response.json()["errors"]}
    assert fields == {"status"}  # the schema refuses it before the filters are read
    response = operate.get("/api/runs?task=nope&since=2026-12-02&until=2026-12-01")
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert {error["pointer"] for error in errors} == {"task", "since"}
    assert any("No task is called 'nope'" in error["detail"] for error in errors)
    assert operate.get("/api/runs?since=1999-01-01").json()["errors"][0]["pointer"] == "since"


def test_a_live_run_is_cancelled_once(operate, make_task, operator):
    from tasks.services import run_start

    run = run_start(task=make_task([{"content": "done"}]), run_input={})
    response = operate.post(f"/api/runs/{run.pk}/cancel", {"why": "wrong batch"})
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.reason == "cancelled by olivia: wrong batch"
    again = operate.post(f"/api/runs/{run.pk}/cancel")
    assert again.status_code == 409
    assert "already ended" in again.json()["detail"]


def test_cancelling_needs_the_cancel_permission(api_client, make_token, make_task, author):
    from tasks.services import run_start

    run = run_start(task=make_task([{"content": "done"}]), run_input={})
    response = api_client(make_token(author, "operate")).post(f"/api/runs/{run.pk}/cancel")
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_a_run_that_is_not_there_is_a_404(operate):
    for path in ("/api/runs/not-a-uuid", "/api/runs/00000000-0000-0000-0000-000000000000"):
        response = operate.get(path)
        assert response.status_code == 404
        assert response["Content-Type"] == "application/problem+json"
