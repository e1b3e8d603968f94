"""Tasks through the API: read with the current definition, created through the admin's
checks, changed only through governance (a widening change waits: 202)."""

from __future__ import annotations

import pytest

from tasks.models import ConfigChange, Task, TaskVersion, ToolGrant

pytestmark = pytest.mark.django_db


@pytest.fixture
def authoring(api_client, make_token, author):
    return api_client(make_token(author, "operate"))


NEW = {
    "slug": "reconcile",
    "name": "Reconcile",
    "objective_template": "Reconcile batch {batch}.",
    "input_schema": {
        "type": "object",
        "properties": {"batch": {"type": "string"}},
        "required": ["batch"],
        "additionalProperties": False,
    },
    "example_input": {"batch": "2026-11"},
    "model": "scripted:nothing",
}


def test_a_task_is_listed_and_read_with_its_definition(authoring, make_task):
    task = make_task([{"content": "done"}], max_steps=12)
    listed = authoring.get("/api/tasks").json()
    assert [row["slug"] for row in listed] == [task.slug]
    read = authoring.get(f"/api/tasks/{task.slug}").json()
    assert read["definition"]["max_steps"] == 12
    assert read["definition"]["model"] == task.model
    assert authoring.get("/api/tasks/nope").status_code == 404


def test_a_task_is_created_as_the_admin_creates_one(authoring, make_task, author):
    make_task([{"content": "done"}])  # installs a script, so scripted:* can be named
    body = {**NEW, "model": Task.objects.get().model}
    response = authoring.post("/api/tasks", body)
    assert response.status_code == 201, response.json()
    made = Task.objects.get(slug="reconcile")
    assert made.autonomy_level == 1 and made.max_steps == 30  # defaults kept
    assert TaskVersion.objects.filter(task=made, number=1).exists()
    assert response.json()["version"] == 1
    assert response.json()["definition"]["objective_template"] == "Reconcile batch {batch}."


def test_a_new_task_is_refused_with_each_field_at_fault(authoring):
    body = {
        **NEW,
        "objective_template": "Reconcile {batch} for {client}.",
        "example_input": {"batch": 7},
        "autonomy_level": 3,
        "model": "scripted:missing-script",
    }
    response = authoring.post("/api/tasks", body)
    assert response.status_code == 422
    problem = response.json()
    assert problem["type"] == "urn:agentops:problem:validation"
    pointers = {error["pointer"] for error in problem["errors"]}
    assert {"/objective_template", "/autonomy_level", "/model"} <= pointers
    assert all(error["location"] == "body" for error in problem["errors"])
    assert not Task.objects.filter(slug="reconcile").exists()


def test_a_taken_slug_is_refused(authoring, make_task):
    task = make_task([{"content": "done"}])
    response = authoring.post("/api/tasks", {**NEW, "slug": task.slug, "model": task.model})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/slug"


def test_creating_needs_the_add_permission(api_client, make_token, operator):
    response = api_client(make_token(operator, "operate")).post("/api/tasks", NEW)
    assert response.status_code == 403
    assert "tasks.add_task" in response.json()["detail"]


def test_a_narrowing_change_applies_now_as_a_new_version(authoring, make_task):
    task = make_task([{"content": "done"}], max_steps=20)
    response = authoring.patch(
        f"/api/tasks/{task.slug}", {"max_steps": 10, "instructions": "Be brief."}
    )
    assert response.status_code == 200, response.json()
    answer = response.json()
    assert answer["pending_change"] is None
    assert len(answer["applied"]) == 2
    assert answer["task"]["definition"]["max_steps"] == 10
    task.refresh_from_db()
    assert (task.max_steps, task.instructions) == (10, "Be brief.")
    assert answer["task"]["version"] == TaskVersion.objects.filter(task=task).count() >= 1


def test_a_widening_change_waits_for_a_second_person_202(authoring, make_task):
    task = make_task([{"content": "done"}], max_steps=20)
    response = authoring.patch(
        f"/api/tasks/{task.slug}",
        # A raised budget widens; an irreversible tool at Supervised waits for a person
        # on every call, so granting it does not; nor do the instructions.
        {"max_steps": 200, "grant": ["test_send"], "instructions": "Careful."},
    )
    assert response.status_code == 202, response.json()
    answer = response.json()
    change = ConfigChange.objects.get(pk=answer["pending_change"]["id"])
    assert change.status == ConfigChange.Status.PENDING and change.task == task
    assert any(
        "max_steps" in line or "steps" in line for line in answer["pending_change"]["summary"]
    )
    task.refresh_from_db()
    assert task.max_steps == 20  # waits for a second person
    assert task.instructions == "Careful."  # applied now
    assert ToolGrant.objects.filter(task=task, tool__name="test_send").exists()
    assert answer["task"]["pending_changes"][0]["id"] == change.pk
    assert len(answer["applied"]) == 2


def test_a_change_is_checked_as_the_admin_checks_it(authoring, make_task):
    task = make_task([{"content": "done"}], objective_template="Do {thing}.")
    response = authoring.patch(
        f"/api/tasks/{task.slug}",
        {"input_schema": {"type": "object", "properties": {}, "additionalProperties": False}},
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/objective_template"
    bad = authoring.patch(f"/api/tasks/{task.slug}", {"grant": ["no_such_tool"], "max_steps": None})
    assert bad.status_code == 422
    assert {e["pointer"] for e in bad.json()["errors"]} == {"/max_steps"}
    bad = authoring.patch(f"/api/tasks/{task.slug}", {"grant": ["no_such_tool"]})
    assert bad.json()["errors"] == [
        {"location": "body", "pointer": "/grant/0", "detail": "there is no tool 'no_such_tool'"}
    ]
    task.refresh_from_db()
    assert task.objective_template == "Do {thing}."


def test_the_dial_does_not_turn_through_a_change(authoring, make_task):
    task = make_task([{"content": "done"}])
    response = authoring.patch(f"/api/tasks/{task.slug}", {"autonomy_level": 3})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/autonomy_level"
    task.refresh_from_db()
    assert task.autonomy_level == 1


def test_changing_needs_the_change_permission_and_granting_the_grant_permission(
    api_client, make_token, operator, make_task
):
    task = make_task([{"content": "done"}])
    response = api_client(make_token(operator, "operate")).patch(
        f"/api/tasks/{task.slug}", {"max_steps": 5}
    )
    assert response.status_code == 403
    assert "tasks.change_task" in response.json()["detail"]
