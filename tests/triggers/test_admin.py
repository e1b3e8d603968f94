"""Triggers in the admin: only staff holding the trigger permissions change them; a bad
config or mapping is refused naming its field and saves nothing; a webhook's secret is
shown once, after it is made or rotated, and never again in full; a trigger with
firings is disabled, not deleted; every change is in the task's trail."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from lineage.models import LineageEvent
from tasks.autonomy import task_trail_uuid
from tasks.models import Task, Trigger
from triggers.models import Firing
from triggers.selectors import secret_fingerprint
from triggers.services import trigger_fire

pytestmark = pytest.mark.django_db

Kind = Trigger.Kind
ADD = reverse("admin:tasks_trigger_add")

SCHEMA = {
    "type": "object",
    "properties": {"batch": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}},
    "required": ["batch"],
    "additionalProperties": False,
}


def staff(codenames: list[str], *, name: str = "tess") -> Client:
    user = User.objects.create_user(name, f"{name}@example.com", f"pw-{name}-123", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def editor() -> Client:
    """Staff who may add, change, delete and view triggers, view tasks and start runs."""
    return staff(
        [
            "add_trigger",
            "change_trigger",
            "delete_trigger",
            "view_trigger",
            "view_task",
            "start_run",
        ]
    )


@pytest.fixture
def task(make_task) -> Task:
    return make_task([], input_schema=SCHEMA)


def form(task: Task, **fields: Any) -> dict[str, Any]:
    data = {
        "task": str(task.pk),
        "name": "Batch closed",
        "kind": Kind.WEBHOOK,
        "enabled": "on",
        "config": "{}",
        "input_mapping": "{batch: data.batch}",
        "max_per_minute": "",
        "max_per_hour": "",
        "example_payload": "",
    }
    for name, value in fields.items():
        data[name] = value if isinstance(value, str) else json.dumps(value)
    return data


def said(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def errors_on(response, field: str) -> list[str]:
    assert response.status_code == 200, "the form was accepted"
    return list(response.context["adminform"].form.errors.get(field, []))


# Adding ------------------------------------------------------------------------------


def test_a_new_webhook_gets_a_secret_shown_once_then_only_its_fingerprint(editor, task):
    response = editor.post(ADD, form(task))
    assert response.status_code == 302
    trigger = Trigger.objects.get()
    assert trigger.secret.startswith("whsec_") and len(trigger.secret) == 50
    messages = said(response)
    assert any(trigger.secret in message and "not shown again" in message for message in messages)

    # The next page shows the message, once; after it, no page holds the secret.
    landing = editor.get(response["Location"]).content.decode()
    assert trigger.secret in landing
    for url in (
        response["Location"],
        reverse("admin:tasks_trigger_change", args=[trigger.pk]),
        reverse("admin:tasks_trigger_changelist"),
        reverse("tasks:detail", args=[task.slug]),
    ):
        page = editor.get(url).content.decode()
        assert trigger.secret.removeprefix("whsec_") not in page, url
    change = editor.get(reverse("admin:tasks_trigger_change", args=[trigger.pk])).content
    assert secret_fingerprint(trigger.secret) in change.decode()
    assert f"/hooks/{trigger.public_id}/" in change.decode()


def test_a_new_trigger_is_written_in_the_tasks_trail_without_its_secret(editor, task):
    editor.post(ADD, form(task, max_per_minute="5"))
    trigger = Trigger.objects.get()
    event = LineageEvent.objects.get(run_uuid=task_trail_uuid(task), kind="config.changed")
    note = event.payload["note"]
    assert note.startswith(f"trigger 'Batch closed' (webhook, #{trigger.pk}) added")
    assert "{batch: data.batch}" in note and "5/min" in note
    assert event.actor == "user:tess"
    assert trigger.secret.removeprefix("whsec_") not in json.dumps(event.payload)


def test_a_password_written_in_a_queue_url_is_not_written_in_the_trail(editor, task):
    queue = {"transport": "redis", "url": "redis://:hunter2-SUPERSECRET@127.0.0.1:6379/9",
             "stream": "leads"}  # fmt: skip
    response = editor.post(ADD, form(task, kind=Kind.QUEUE, config=queue, name="Leads"))
    assert response.status_code == 302
    event = LineageEvent.objects.get(run_uuid=task_trail_uuid(task), kind="config.changed")
    assert "hunter2" not in json.dumps(event.payload)
    assert "127.0.0.1:6379/9" in event.payload["note"]


def test_a_schedule_is_added_with_its_next_slots_and_no_secret(editor, task):
    config = {"expression": "0 2 * * *", "timezone": "UTC", "input": {"batch": "2026-11"}}
    response = editor.post(
        ADD,
        form(task, name="Nightly", kind=Kind.CRON, config=config, input_mapping="{batch: batch}"),
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    trigger = Trigger.objects.get()
    assert trigger.secret == "" and not any("secret" in m for m in said(response))
    page = editor.get(reverse("admin:tasks_trigger_change", args=[trigger.pk])).content.decode()
    assert "Next five slots" in page and "02:00 UTC" in page
    assert "Rotate secret" not in page


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"config": "{not json"}, "config", "This is not valid JSON"),
        ({"config": "[1, 2]"}, "config", "config: [1, 2] is not of type 'object'"),
        ({"config": '{"a": 1, "a": 2}'}, "config", 'the key "a" appears twice'),
        ({"config": {"tolerance_seconds": 0}}, "config", "tolerance_seconds: 0 is less than"),
        ({"config": {"when": "now"}}, "config", "Additional properties are not allowed"),
        ({"input_mapping": "data.["}, "input_mapping", "input_mapping: not a JMESPath expression"),
        ({"input_mapping": "a" * 2001}, "input_mapping", "longer than 2000 characters"),
        ({"kind": "sms"}, "kind", "Select a valid choice"),
        ({"kind": "manual", "config": {}}, "kind", "Select a valid choice"),
        ({"example_payload": "{'batch': 1}"}, "example_payload", "This is not valid JSON"),
        ({"name": ""}, "name", "This field is required"),
        ({"max_per_minute": "0"}, "max_per_minute", "greater than or equal to 1"),
        ({"max_per_hour": "-5"}, "max_per_hour", "greater than or equal to"),
        (
            {"kind": Kind.CRON, "config": {"expression": "every night"}},
            "config",
            "config/expression: 'every night' is not a cron expression",
        ),
        (
            {"kind": Kind.CRON, "config": {"expression": "0 2 * * *", "timezone": "Mars/Olympus"}},
            "config",
            "config/timezone: 'Mars/Olympus' is not a time zone",
        ),
        (
            {"kind": Kind.CRON, "config": {"expression": "0 0 31 2 *"}},
            "config",
            "'0 0 31 2 *' never comes",
        ),
        (
            # What a slot brings is known: this mapping cannot make the task's input.
            {"kind": Kind.CRON, "config": {"expression": "0 2 * * *"}, "input_mapping": ""},
            "input_mapping",
            "the task's input schema refuses: the input: 'batch' is a required property",
        ),
        (
            {
                "kind": Kind.QUEUE,
                "config": {
                    "transport": "redis",
                    "url": "redis://:{secret:SECRET_KEY}@127.0.0.1:6379/0",
                    "stream": "s",
                },
            },
            "config",
            "the secret SECRET_KEY is one of agentops' own settings",
        ),
        (
            # A broker URL sends its password to the host it names: a tool's secret
            # there would go to any host the trigger's author chose.
            {
                "kind": Kind.QUEUE,
                "config": {
                    "transport": "redis",
                    "url": "redis://:{secret:TOOL_SECRET_LEDGER}@attacker.example:6379/0",
                    "stream": "s",
                },
            },
            "config",
            "the secret TOOL_SECRET_LEDGER is not one a trigger may read",
        ),
        (
            {"kind": Kind.QUEUE, "config": {"transport": "amqp", "url": "redis://h"}},
            "config",
            "config/url: a amqp transport needs a amqp or amqps:// URL",
        ),
        (
            {"kind": Kind.EMAIL, "config": {"address": "x", "senders": []}},
            "config",
            "senders: [] should be non-empty",
        ),
        (
            {"example_payload": {"data": {"batch": "November"}}},
            "example_payload",
            "the task's input schema refuses: batch: 'November' does not match",
        ),
        (
            {"example_payload": [1, 2], "input_mapping": ""},
            "example_payload",
            "the input must be a JSON object; the mapping gave a JSON array",
        ),
    ],
)
def test_a_bad_trigger_is_refused_naming_the_field_and_nothing_is_saved(
    editor, task, fields, field, message
):
    response = editor.post(ADD, form(task, **fields))
    errors = errors_on(response, field)
    assert any(message in error for error in errors), errors
    assert not Trigger.objects.exists()
    assert not LineageEvent.objects.filter(run_uuid=task_trail_uuid(task)).exists()


def test_a_nul_in_a_field_is_refused_before_the_admin_sees_it(editor, task):
    response = editor.post(ADD, form(task, name="Batch\x00closed"))
    assert response.status_code == 400 and b"name: a NUL character" in response.content
    assert not Trigger.objects.exists()


def test_the_add_form_shows_an_example_config_for_each_kind(editor, task):
    page = editor.get(ADD + f"?task={task.pk}").content.decode()
    for label in ("Schedule (cron)", "Webhook", "Queue message", "Inbound email"):
        assert f"<dt>{label}</dt>" in page
    assert "&quot;expression&quot;: &quot;0 2 * * *&quot;" in page
    assert "&quot;transport&quot;: &quot;redis&quot;" in page
    assert f'<option value="{task.pk}" selected>' in page  # the task it was added from


# Who may -----------------------------------------------------------------------------


def test_only_staff_with_the_trigger_permissions_may_add_one(task, outsider, client):
    client.force_login(outsider)  # logged in, not staff
    response = client.post(ADD, form(task))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]

    viewer = staff(["view_trigger", "view_task"], name="vera")
    assert viewer.post(ADD, form(task)).status_code == 403
    assert viewer.get(ADD).status_code == 403
    assert not Trigger.objects.exists()


def test_trigger_permissions_without_the_right_to_start_runs_add_and_change_nothing(
    make_trigger, task
):
    """A trigger starts runs with nobody pressing Run: staff who may edit triggers but
    not start runs may neither add one nor change one (enable it, raise its limits)."""
    may_not_run = staff(
        ["add_trigger", "change_trigger", "view_trigger", "view_task"], name="trina"
    )
    assert may_not_run.get(ADD).status_code == 403
    assert may_not_run.post(ADD, form(task)).status_code == 403
    trigger = make_trigger(task=task, secret="whsec_" + "A" * 44, enabled=False)
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    may_not_run.post(change, form(task, name="renamed", max_per_minute="600"))
    rotate = may_not_run.post(reverse("admin:tasks_trigger_rotate", args=[trigger.pk]))
    assert rotate.status_code == 403
    trigger.refresh_from_db()
    assert (trigger.name, trigger.enabled, trigger.max_per_minute) == (
        "webhook trigger",
        False,
        None,
    )
    assert Trigger.objects.count() == 1


def test_a_viewer_cannot_change_rotate_or_delete(make_trigger, task):
    trigger = make_trigger(task=task, secret="whsec_" + "A" * 44)
    viewer = staff(["view_trigger", "view_task"], name="vera")
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    page = viewer.get(change).content.decode()
    assert "Rotate secret" not in page and 'name="_save"' not in page
    viewer.post(change, form(task, name="renamed", enabled=""))
    rotate = viewer.post(reverse("admin:tasks_trigger_rotate", args=[trigger.pk]))
    deleted = viewer.post(reverse("admin:tasks_trigger_delete", args=[trigger.pk]), {"post": "yes"})
    assert rotate.status_code == 403 and deleted.status_code == 403
    trigger.refresh_from_db()
    assert (trigger.name, trigger.enabled, trigger.secret) == (
        "webhook trigger",
        True,
        "whsec_" + "A" * 44,
    )


# Changing ----------------------------------------------------------------------------


def test_a_triggers_task_and_kind_stay_as_made(editor, make_trigger, task, make_task):
    trigger = make_trigger(task=task, input_mapping="{batch: data.batch}")
    other = make_task([], input_schema=SCHEMA)
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    response = editor.post(
        change,
        {**form(task, kind=Kind.CRON, config={"tolerance_seconds": 60}), "task": str(other.pk)},
    )
    assert response.status_code == 302
    trigger.refresh_from_db()
    assert (trigger.task, trigger.kind, trigger.config) == (
        task,
        Kind.WEBHOOK,
        {"tolerance_seconds": 60},
    )
    event = LineageEvent.objects.filter(run_uuid=task_trail_uuid(task)).latest("seq")
    assert (
        "changed: name 'Batch closed', config {\"tolerance_seconds\": 60}" in event.payload["note"]
    )


def test_a_bad_config_on_the_change_form_changes_nothing(editor, make_trigger, task):
    trigger = make_trigger(
        Kind.CRON,
        task=task,
        config={"expression": "0 2 * * *", "input": {"batch": "2026-11"}},
        input_mapping="{batch: batch}",
    )
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    response = editor.post(
        change, form(task, config={"expression": "61 * * * *"}, input_mapping="{batch: batch}")
    )
    assert any("config/expression" in error for error in errors_on(response, "config"))
    trigger.refresh_from_db()
    assert trigger.config["expression"] == "0 2 * * *"


# Rotating the secret -----------------------------------------------------------------


def test_rotating_shows_the_new_secret_once_and_keeps_the_old_one_a_day(editor, make_trigger, task):
    trigger = make_trigger(task=task, secret="whsec_" + "A" * 44)
    old = trigger.secret
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    assert "Rotate secret" in editor.get(change).content.decode()

    response = editor.post(reverse("admin:tasks_trigger_rotate", args=[trigger.pk]))
    assert response.status_code == 302 and response["Location"] == change
    trigger.refresh_from_db()
    assert trigger.secret != old and trigger.previous_secret == old
    left = trigger.previous_secret_until - timezone.now()
    assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
    assert any(trigger.secret in message and "24 h" in message for message in said(response))

    editor.get(change)  # the message is shown once
    page = editor.get(change).content.decode()
    assert (
        trigger.secret.removeprefix("whsec_") not in page and old.removeprefix("whsec_") not in page
    )
    assert f"the previous one ({secret_fingerprint(old)}) is accepted until" in page
    note = LineageEvent.objects.filter(run_uuid=task_trail_uuid(task)).latest("seq").payload["note"]
    assert f"secret rotated: now {secret_fingerprint(trigger.secret)}" in note
    assert trigger.secret.removeprefix("whsec_") not in note


def test_rotate_takes_a_post_and_a_trigger_that_exists(editor, make_trigger, task):
    trigger = make_trigger(task=task, secret="whsec_" + "A" * 44)
    assert editor.get(reverse("admin:tasks_trigger_rotate", args=[trigger.pk])).status_code == 405
    for bogus in ("99999999999999999999999", "424242", "abc"):
        url = f"/admin/tasks/trigger/{bogus}/rotate-secret/"
        assert editor.post(url).status_code == 404, bogus
    trigger.refresh_from_db()
    assert trigger.secret == "whsec_" + "A" * 44


def test_a_trigger_other_than_a_webhook_has_no_secret_to_rotate(editor, make_trigger, task):
    trigger = make_trigger(
        Kind.EMAIL, task=task, config={"address": "a@b.example", "senders": ["@b.example"]}
    )
    response = editor.post(reverse("admin:tasks_trigger_rotate", args=[trigger.pk]))
    assert any("only a webhook has a signing secret" in message for message in said(response))
    trigger.refresh_from_db()
    assert trigger.secret == ""


def test_the_rotate_action_rotates_each_selected_webhook(editor, make_trigger, task):
    one = make_trigger(task=task, name="one", secret="whsec_" + "A" * 44)
    two = make_trigger(task=task, name="two", secret="whsec_" + "B" * 44)
    response = editor.post(
        reverse("admin:tasks_trigger_changelist"),
        {"action": "rotate_selected", "_selected_action": [str(one.pk), str(two.pk)]},
    )
    assert response.status_code == 302
    one.refresh_from_db()
    two.refresh_from_db()
    messages = said(response)
    assert one.previous_secret == "whsec_" + "A" * 44 and two.previous_secret == "whsec_" + "B" * 44
    assert any(one.secret in m for m in messages) and any(two.secret in m for m in messages)


# Deleting and disabling --------------------------------------------------------------


def test_a_trigger_with_firings_is_not_deleted_the_admin_says_disable_it(
    editor, make_trigger, task
):
    trigger = make_trigger(task=task, input_mapping="{batch: data.batch}")
    trigger_fire(trigger_id=trigger.pk, key="k1", payload={"data": {"batch": "2026-11"}})
    delete = reverse("admin:tasks_trigger_delete", args=[trigger.pk])

    for response in (editor.get(delete), editor.post(delete, {"post": "yes"})):
        assert response.status_code == 302
        assert response["Location"] == reverse("admin:tasks_trigger_change", args=[trigger.pk])
        assert any("Disable it instead" in message for message in said(response))
    assert Trigger.objects.filter(pk=trigger.pk).exists() and Firing.objects.count() == 1
    page = editor.get(reverse("admin:tasks_trigger_changelist")).content.decode()
    assert "delete_selected" not in page  # no bulk delete to go around it


def test_a_trigger_without_firings_is_deleted_and_that_is_recorded(editor, make_trigger, task):
    trigger = make_trigger(task=task)
    response = editor.post(
        reverse("admin:tasks_trigger_delete", args=[trigger.pk]), {"post": "yes"}
    )
    assert response.status_code == 302 and not Trigger.objects.exists()
    note = LineageEvent.objects.filter(run_uuid=task_trail_uuid(task)).latest("seq").payload["note"]
    assert note.endswith("deleted")


def test_the_disable_action_disables_and_records_each(editor, make_trigger, task):
    one = make_trigger(task=task, name="one")
    two = make_trigger(task=task, name="two", enabled=False)
    editor.post(
        reverse("admin:tasks_trigger_changelist"),
        {"action": "disable_selected", "_selected_action": [str(one.pk), str(two.pk)]},
    )
    one.refresh_from_db()
    assert not one.enabled
    notes = [e.payload["note"] for e in LineageEvent.objects.filter(run_uuid=task_trail_uuid(task))]
    assert notes == [f"trigger 'one' (webhook, #{one.pk}) disabled"]
    fired = trigger_fire(trigger_id=one.pk, key="k", payload={"batch": "2026-11"})
    assert not fired.accepted and fired.firing.refusal == Firing.Refusal.DISABLED


# The task's admin page ---------------------------------------------------------------


def test_the_task_admin_page_lists_its_triggers_and_links_to_add_one(
    admin_client, make_trigger, task
):
    trigger = make_trigger(task=task, name="Lead arrived", enabled=False)
    page = admin_client.get(reverse("admin:tasks_task_change", args=[task.pk])).content.decode()
    assert reverse("admin:tasks_trigger_change", args=[trigger.pk]) in page
    assert "Lead arrived</a> (Webhook, disabled)" in page
    assert f"{ADD}?task={task.pk}" in page


def test_a_schedule_the_task_no_longer_fits_can_still_be_saved_disabled(editor, make_trigger, task):
    trigger = make_trigger(Kind.CRON, task=task, config={"expression": "0 2 * * *"})
    change = reverse("admin:tasks_trigger_change", args=[trigger.pk])
    data = form(task, config={"expression": "0 2 * * *"}, input_mapping="")
    refused = editor.post(change, data)
    assert any("'batch' is a required property" in e for e in errors_on(refused, "input_mapping"))
    saved = editor.post(change, {**data, "enabled": ""})
    assert saved.status_code == 302
    trigger.refresh_from_db()
    assert not trigger.enabled
