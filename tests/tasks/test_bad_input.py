"""Bad input to the task and run pages gets a clear 4xx naming what was wrong, never a
500, and changes nothing: nesting past the limit, lone surrogates and NUL in the run's
input, NUL and over-long text in reasons and notes, levels and ids that cannot be.
Through real HTTP, on SQLite and on PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

from html import unescape

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from lineage.models import LineageEvent
from tasks.models import AutonomyChange, Incident, Run, RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def editor_client(client, operator):
    operator.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["change_task", "add_incident"], content_type__app_label="tasks"
        )
    )
    client.force_login(operator)
    return client


def page(response) -> str:
    return unescape(response.content.decode())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"a": ' + "[" * 101 + "]" * 101 + "}", "nesting deeper than 100 levels is not accepted"),
        ("[" * 200_000, "nesting deeper than 100 levels is not accepted (line 1, column 101)"),
        ('{"a": "\\ud800"}', "an unpaired surrogate (\\ud800 to \\udfff) is not a character"),
        ('{"a": "\\udc00x"}', "an unpaired surrogate"),
        ('{"a": "x\\u0000"}', "a NUL character (\\u0000) cannot be stored"),
        ('{"a": "x\x00"}', "The input holds a NUL character, which cannot be stored"),
        ('{"a": ' + "1" * 5000 + "}", "an integer of more than 3900 digits is not accepted"),
    ],
)
def test_run_input_that_cannot_be_stored_is_a_400_naming_why_and_where(
    make_task, operator_client, raw, message
):
    task = make_task([])
    response = operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": raw})
    assert response.status_code == 400
    assert message in page(response)
    assert not Run.objects.exists()


def test_run_input_with_a_surrogate_pair_escape_is_taken(make_task, operator_client):
    task = make_task([])
    response = operator_client.post(
        reverse("tasks:run", args=[task.slug]), {"input": '{"a": "\\ud83d\\ude00"}'}
    )
    assert response.status_code == 303
    assert Run.objects.get().input == {"a": "😀"}


@pytest.fixture
def a_run(make_task, operator_client) -> Run:
    task = make_task([{"content": "ok"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    return Run.objects.get()


@pytest.mark.parametrize(
    ("why", "said"),
    [
        ("wrong\x00batch", "why: a NUL character cannot be stored"),
        ("w" * 301, "why: longer than 300 characters (301)"),
    ],
)
def test_a_cancel_with_a_reason_that_cannot_be_is_a_400_and_cancels_nothing(
    a_run, operator_client, why, said
):
    before = LineageEvent.objects.filter(run_uuid=a_run.pk).count()
    response = operator_client.post(reverse("runs:cancel", args=[a_run.pk]), {"why": why})
    assert response.status_code == 400
    assert f"The run was not cancelled: {said}" in page(response)
    a_run.refresh_from_db()
    assert a_run.status == RunStatus.QUEUED
    assert LineageEvent.objects.filter(run_uuid=a_run.pk).count() == before


@pytest.mark.parametrize(
    ("note", "said"),
    [("bad\x00", "note: a NUL character"), ("n" * 2001, "note: longer than 2,000 characters")],
)
def test_an_incident_note_that_cannot_be_is_a_400_and_flags_nothing(
    a_run, editor_client, note, said
):
    response = editor_client.post(reverse("runs:incident", args=[a_run.pk]), {"note": note})
    assert response.status_code == 400
    assert f"Not flagged: {said}" in page(response)
    assert not Incident.objects.exists()


@pytest.mark.parametrize(
    ("level", "reason", "said"),
    [
        ("9" * 30, "why", "The dial did not move: choose one of its levels"),
        ("9" * 5000, "why", "The dial did not move: choose one of its levels"),
        ("-1", "why", "The dial did not move: choose one of its levels"),
        ("²", "why", "The dial did not move: choose one of its levels"),
        ("2\x00", "why", "The dial did not move: choose one of its levels"),
        ("0", "be\x00cause", "The dial did not move: reason: a NUL character"),
        ("0", "r" * 2001, "The dial did not move: reason: longer than 2,000 characters"),
    ],
)
def test_a_dial_turn_that_cannot_be_is_a_400_and_moves_nothing(
    make_task, editor_client, level, reason, said
):
    task = make_task([])
    response = editor_client.post(
        reverse("tasks:autonomy", args=[task.slug]), {"level": level, "reason": reason}
    )
    assert response.status_code == 400
    assert said in page(response)
    assert not AutonomyChange.objects.exists()
    task.refresh_from_db()
    assert task.autonomy_level == 1


def test_a_change_id_out_of_range_is_a_400_naming_it(editor_client):
    huge = "9" * 30
    url = reverse("tasks:autonomy_decide", args=[1]).replace("/1/", f"/{huge}/")
    response = editor_client.post(url, {"decision": "confirm"})
    assert response.status_code == 400
    assert f"change id {huge} is out of range" in page(response)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/runs/not-a-uuid/", 404),
        ("/runs/00000000-0000-0000-0000-000000000000/", 404),
        ("/tasks/" + "s" * 5000 + "/", 404),
        ("/tools/a%00b/", 400),
        ("/tools/" + "t" * 5000 + "/", 404),
        ("/runs/?status=%00", 200),  # an unknown status: every run, and a note saying so
    ],
)
def test_urls_that_name_nothing_are_a_4xx_never_a_500(operator_client, path, status):
    assert operator_client.get(path).status_code == status


def test_a_tool_name_holding_nul_says_so(operator_client):
    response = operator_client.get("/tools/a%00b/")
    assert "tool name: a NUL character" in page(response)


# The admin's JSON boxes (StrictJSONFormField) ----------------------------------------
# Django's admin answers a refused form with the form again (200): the point here is no
# 500, the field named, nothing saved.


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ('{"url": ' + "[" * 150 + "]" * 150 + "}", "nesting deeper than 100 levels"),
        ("[" * 100_000, "nesting deeper than 100 levels"),
        ('{"url": "https://a.example/\\ud800"}', "an unpaired surrogate"),
        ('{"url": "https://a.example/\\u0000"}', "a NUL character (\\u0000) cannot be stored"),
    ],
)
def test_a_tool_config_that_cannot_be_stored_is_refused_in_the_admin(admin_client, config, why):
    from tasks.models import Tool
    from tests.tasks.test_admin_validation import http_tool_data

    response = admin_client.post("/admin/tasks/tool/add/", http_tool_data(config=config))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["config"]
    assert any(why in error for error in errors), errors
    assert not Tool.objects.filter(name="items_create").exists()


def test_an_example_input_nested_too_deep_is_refused_in_the_admin(demo_task, admin_client):
    from tests.tasks.test_admin_validation import task_post

    response = task_post(admin_client, demo_task, example_input="[" * 5000 + "]" * 5000)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["example_input"]
    assert any("nesting deeper than 100 levels" in error for error in errors), errors
    demo_task.refresh_from_db()
    assert demo_task.example_input == {"batch": "2026-11"}
