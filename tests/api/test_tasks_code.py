"""Tasks as code over the API: the export, a plan that writes nothing, and an apply
through the governed path as the token's user, as `import_tasks` does."""

from __future__ import annotations

import pytest

from tasks.models import ConfigChange, Task, TaskVersion
from tests.tasks.test_as_code import database_dump, editor

EXPORT = "/api/tasks-as-code"
PLAN = "/api/tasks-as-code/plan"
APPLY = "/api/tasks-as-code/apply"
ONE = {"slug": "reconcile-invoices"}  # the demo's other tasks are left out of the file


@pytest.fixture
def alice(db):
    return editor("alice")


def test_an_export_planned_again_changes_nothing(demo_task, alice, make_token, api_client):
    api = api_client(make_token(alice, "operate"))
    exported = api.get(EXPORT)
    assert exported.status_code == 200
    assert "reconcile-invoices" in exported.json()["tasks"]
    before = database_dump()

    planned = api.post(PLAN, {"yaml": exported.json()["yaml"]})

    assert planned.status_code == 200, planned.content
    assert planned.json()["has_changes"] is False
    assert planned.json()["diff"][0] == "no changes"
    applied = api.post(APPLY, {"yaml": exported.json()["yaml"]})
    assert applied.status_code == 200 and applied.json()["applied"] == []
    assert database_dump() == before


def test_a_change_is_planned_then_applied_as_the_tokens_user(
    demo_task, alice, make_token, api_client
):
    api = api_client(make_token(alice, "operate"))
    changed = api.get(EXPORT, data=ONE).json()["yaml"]
    changed = changed.replace("stall_limit: 8", "stall_limit: 5")
    versions = TaskVersion.objects.filter(task=demo_task).count()

    plan = api.post(PLAN, {"yaml": changed}).json()
    assert plan["has_changes"] and "stall_limit: 8 → 5" in "\n".join(plan["diff"])
    assert TaskVersion.objects.filter(task=demo_task).count() == versions  # a plan writes nothing

    applied = api.post(APPLY, {"yaml": changed, "expect": plan["digest"]})

    assert applied.status_code == 200, applied.content
    assert applied.json()["pending"] == []
    demo_task.refresh_from_db()
    assert demo_task.stall_limit == 5
    latest = TaskVersion.objects.filter(task=demo_task).order_by("-number").first()
    assert latest.number == versions + 1 and latest.created_by == alice


def test_a_widening_change_waits_for_a_second_person(demo_task, alice, make_token, api_client):
    api = api_client(make_token(alice, "operate"))
    text = api.get(EXPORT, data=ONE).json()["yaml"]
    budget = f"max_steps: {demo_task.max_steps}"
    assert budget in text

    applied = api.post(
        APPLY, {"yaml": text.replace(budget, f"max_steps: {demo_task.max_steps * 4}")}
    )

    assert applied.status_code == 200, applied.content
    [pending] = applied.json()["pending"]
    assert pending["task"] == "reconcile-invoices" and pending["kind"] == "config"
    assert ConfigChange.objects.get(pk=pending["id"]).status == ConfigChange.Status.PENDING
    assert Task.objects.get(pk=demo_task.pk).max_steps == demo_task.max_steps  # not live


def test_a_plan_that_no_longer_holds_applies_nothing(demo_task, alice, make_token, api_client):
    api = api_client(make_token(alice, "operate"))
    text = api.get(EXPORT, data=ONE).json()["yaml"].replace("stall_limit: 8", "stall_limit: 5")
    stale = api.post(PLAN, {"yaml": text}).json()["digest"]
    Task.objects.filter(pk=demo_task.pk).update(stall_limit=6)  # someone changed it since
    before = database_dump()

    applied = api.post(APPLY, {"yaml": text, "expect": stale})

    assert applied.status_code == 409
    assert applied.json()["type"] == "urn:agentops:problem:plan-changed"
    assert database_dump() == before


def test_a_bad_file_names_its_line_and_changes_nothing(demo_task, alice, make_token, api_client):
    api = api_client(make_token(alice, "operate"))
    text = api.get(EXPORT, data=ONE).json()["yaml"].replace("stall_limit: 8", "stall_limit: many")
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "stall_limit: many" in row)
    before = database_dump()

    for url in (PLAN, APPLY):
        answer = api.post(url, {"yaml": text})
        assert answer.status_code == 422, answer.content
        assert answer["Content-Type"] == "application/problem+json"
        [error] = answer.json()["errors"]
        assert error["pointer"] == "/yaml"
        assert error["detail"].startswith(f"line {line}, column ")
        assert "stall_limit" in error["detail"]
    assert database_dump() == before


def test_scopes_and_permissions_hold(demo_task, alice, make_token, api_client, operator):
    text = api_client(make_token(alice, "read")).get(EXPORT, data=ONE).json()["yaml"]
    changed = text.replace("stall_limit: 8", "stall_limit: 5")
    before = database_dump()

    read_only = api_client(make_token(alice, "read")).post(APPLY, {"yaml": changed})
    assert read_only.status_code == 403 and read_only.json()["type"].endswith(":scope")
    # An operator who starts runs but may not change tasks in the admin.
    outsider = api_client(make_token(operator, "operate")).post(APPLY, {"yaml": changed})
    assert outsider.status_code == 403 and outsider.json()["type"].endswith(":permission")
    assert api_client(None).post(PLAN, {"yaml": changed}).status_code == 401
    assert database_dump() == before


def test_export_of_an_unknown_task_is_a_404(demo_task, alice, make_token, api_client):
    answer = api_client(make_token(alice)).get(
        EXPORT, data={"slug": ["reconcile-invoices", "nope"]}
    )
    assert answer.status_code == 404
    assert "nope" in answer.json()["detail"]


def test_too_many_parameters_is_a_problem_not_an_html_page(alice, make_token, api_client):
    """Django refuses past DATA_UPLOAD_MAX_NUMBER_FIELDS parameters itself; the API
    answers it as every other refusal (schemathesis found the HTML page)."""
    answer = api_client(make_token(alice)).get(EXPORT, data={"slug": ["x"] * 1500})
    assert answer.status_code == 400
    assert answer["Content-Type"] == "application/problem+json"
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in answer.json()["detail"]


def test_export_needs_the_right_to_see_tasks(demo_task, operator, make_token, api_client):
    """Tasks' definitions are the admin's to show: an operator who starts runs but may not
    view tasks gets none of them."""
    answer = api_client(make_token(operator)).get(EXPORT)
    assert answer.status_code == 403 and "tasks.view_task" in answer.json()["detail"]
