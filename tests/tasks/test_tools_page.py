"""The tools page: each tool's contract, the tasks that hold it, its recent calls."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tasks.models import Run
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def test_the_tools_list_shows_kind_class_and_use(
    make_task, operator_client, django_assert_max_num_queries
):
    task = make_task(
        [{"calls": [("test_echo", {"text": "a"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run_until_rest(Run.objects.get())
    with django_assert_max_num_queries(6):
        page = operator_client.get(reverse("tools:list")).content.decode()
    assert 'href="/tools/test_echo/"' in page and "Read only" in page and "Irreversible" in page


def test_a_tools_page_shows_its_tasks_and_recent_calls_with_latency(make_task, operator_client):
    task = make_task(
        [
            {"calls": [("test_echo", {"text": "a"})]},
            {"calls": [("test_echo", {"text": 5})]},
            {"content": "ok"},
        ],
        tools=["test_echo"],
    )
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run_until_rest(Run.objects.get())
    page = operator_client.get(reverse("tools:detail", args=["test_echo"])).content.decode()
    assert task.name in page
    assert "2 in all. Of these: 1 succeeded, 0 failed, 1 refused" in page
    assert " ms</td>" in page and "is not of type" in page
    assert operator_client.get(reverse("tools:detail", args=["nope"])).status_code == 404


def test_a_tools_figures_are_over_its_latest_calls(make_task, operator_client, monkeypatch):
    from tasks import selectors

    task = make_task(
        [
            {"calls": [("test_echo", {"text": 5})]},
            {"calls": [("test_echo", {"text": "a"})]},
            {"calls": [("test_echo", {"text": "b"})]},
            {"content": "ok"},
        ],
        tools=["test_echo"],
    )
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run_until_rest(Run.objects.get())
    monkeypatch.setattr(selectors, "TOOL_FIGURES_CALLS", 2)
    page = operator_client.get(reverse("tools:detail", args=["test_echo"])).content.decode()
    # The refused call came first: the latest two both succeeded.
    assert "3 in all. Of the latest 2: 2 succeeded, 0 failed, 0 refused" in page
    listed = operator_client.get(reverse("tools:list")).content.decode()
    assert "<td>3</td>" in listed


def test_the_admin_checks_a_new_tools_config_with_its_kind(admin_client):
    from tasks.models import Tool

    form = {
        "name": "orders_delete",
        "kind": "sql",
        "description": "",
        "input_schema": '{"type": "object", "properties": {"id": {"type": "integer"}}}',
        "side_effect": "read",
        "idempotency": "key",
        "retry_max_attempts": "3",
        "retry_backoff_seconds": "0.5",
        "timeout_seconds": "5",
        "available": "on",
        "config": '{"database": "default", "query": "DELETE FROM orders WHERE id = %(id)s", '
        '"mode": "write"}',
    }
    response = admin_client.post("/admin/tasks/tool/add/", form)
    page = response.content.decode()
    assert response.status_code == 200
    assert "A write tool cannot be read-only." in page
    assert "never sees the idempotency key" in page
    assert not Tool.objects.filter(name="orders_delete").exists()

    form.update(side_effect="irreversible", idempotency="none", config='{"mode": "sometimes"}')
    page = admin_client.post("/admin/tasks/tool/add/", form).content.decode()
    assert "mode" in page and not Tool.objects.filter(name="orders_delete").exists()
