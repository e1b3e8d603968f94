"""Tasks as code (``export_tasks``, ``import_tasks``, tasks.as_code): a fresh export
imports with no change; a change is shown, and applied only with --apply, through the
governed path (what widens waits for a second person); a bad file is refused with its
line and field, and nothing changes; no secret is ever written. Three personas: alice
edits, bob is the second person, oscar may do neither."""

from __future__ import annotations

import copy
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
import yaml
from django.contrib.auth.models import Group, Permission, User
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.core.management.base import CommandError

from tasks.as_code import AsCodeError, tasks_export, tasks_import_apply, tasks_import_plan
from tasks.governance import config_change_decide
from tasks.models import (
    AutonomyChange,
    ConfigChange,
    GrantRule,
    Task,
    TaskVersion,
    ToolGrant,
    Trigger,
)
from triggers.models import Firing

pytestmark = pytest.mark.django_db

EDITOR_PERMISSIONS = [
    "add_task",
    "change_task",
    "view_task",
    "add_toolgrant",
    "change_toolgrant",
    "delete_toolgrant",
    "add_grantrule",
    "change_grantrule",
    "delete_grantrule",
    "add_trigger",
    "change_trigger",
    "delete_trigger",
    "start_run",
]


def editor(username: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.com", "pw-123456789")
    user.is_staff = True
    user.save()
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="tasks", codename__in=EDITOR_PERMISSIONS)
    )
    return User.objects.get(pk=user.pk)


@pytest.fixture
def alice(db) -> User:
    return editor("alice")


@pytest.fixture
def bob(db) -> User:
    return editor("bob")


@pytest.fixture
def oscar(db) -> User:
    """Staff, but holding no permission to change tasks."""
    return User.objects.create_user("oscar", "oscar@example.com", "pw-oscar-123", is_staff=True)


def database_dump() -> str:
    """Every row of the tables an import could touch, to compare before and after."""
    out = StringIO()
    call_command("dumpdata", "tasks", "triggers", "lineage", "auth", stdout=out, indent=1)
    return out.getvalue()


def export() -> str:
    out = StringIO()
    call_command("export_tasks", stdout=out)
    return out.getvalue()


def import_(path: Path, *args: str) -> str:
    out = StringIO()
    call_command("import_tasks", str(path), *args, stdout=out)
    return out.getvalue()


def written(tmp_path: Path, text: str, name: str = "tasks.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def rich_task(make_task, alice) -> Task:
    """A task using every kind of value the file holds: text of several lines with
    trailing spaces, groups, a spend budget, rules at equal positions, and triggers of
    each kind (a webhook with a secret, a queue whose URL holds a password)."""
    approvers = Group.objects.create(name="Finance approvers")
    task = make_task(
        [{"answer": "done"}],
        tools=["ledger_invoices", "email_send"],
        instructions="First line.  \nSecond: line — with ünïcode\n\n  indented\n",
        description="  leading spaces, and a trailing one ",
        max_spend=Decimal("2.5000"),
        max_tokens=12000,
        confidence_threshold=0.85,
        approver_group=approvers,
        four_eyes=True,
        input_schema={"type": "object", "properties": {"batch": {"type": "string"}}},
        example_input={"batch": "2026-11-01"},
    )
    grant = ToolGrant.objects.get(task=task, tool__name="email_send")
    GrantRule.objects.create(grant=grant, position=0, effect="deny", expression="args.to == ''")
    GrantRule.objects.create(
        grant=grant, position=0, effect="approve", expression="true", description="all of them"
    )
    Trigger.objects.create(
        task=task,
        kind="webhook",
        name="hook",
        config={"tolerance_seconds": 120},
        secret="whsec_c2VjcmV0LXNpZ25pbmcta2V5LXZhbHVlLTEyMzQ1Njc4",
        previous_secret="whsec_b2xkLXNpZ25pbmcta2V5LXZhbHVlLTEyMzQ1Njc4OTA=",
    )
    Trigger.objects.create(
        task=task,
        kind="queue",
        name="inbox",
        config={
            "transport": "redis",
            "url": "redis://agent:hunter2-pass@127.0.0.1:6379/0",
            "stream": "invoices",
        },
    )
    Trigger.objects.create(
        task=task,
        kind="email",
        name="mail",
        enabled=False,
        config={"address": "in@agentops.example", "senders": ["@example.com"]},
        input_mapping="{batch: subject} ",  # the admin's form would trim it
        max_per_hour=20,
    )
    Trigger.objects.create(
        task=task,
        kind="cron",
        name="nightly",
        config={"expression": "0 2 * * *", "timezone": "Europe/Paris", "input": {"batch": "x"}},
    )
    return task


# Round trip --------------------------------------------------------------------------


def test_a_fresh_export_of_the_demo_imports_with_no_changes(demo_task, alice, tmp_path):
    text = export()
    assert "version: 1" in text and "reconcile-invoices:" in text
    before = database_dump()

    out = import_(written(tmp_path, text), "--apply", "--user", "alice")

    assert out.strip() == "no changes"
    assert database_dump() == before


def test_every_kind_of_value_round_trips_with_no_changes(rich_task, alice, tmp_path):
    text = export()
    before = database_dump()

    plan = tasks_import_plan(text=text, user=alice)

    assert not plan.has_changes and plan.diff == ["no changes"]
    assert import_(written(tmp_path, text), "--apply", "--user", "alice").strip() == "no changes"
    assert database_dump() == before
    # The export is stable: a second one is the same text.
    assert export() == text


# Changes -----------------------------------------------------------------------------


def test_a_change_shows_a_diff_and_applies_only_with_apply(demo_task, alice, tmp_path):
    text = export()
    changed = text.replace("stall_limit: 8", "stall_limit: 5").replace(
        "max_per_minute: 10", "max_per_minute: 4"
    )
    path = written(tmp_path, changed)
    before = database_dump()

    shown = import_(path)

    assert "~ task reconcile-invoices" in shown
    assert "stall_limit: 8 → 5" in shown
    assert "~ trigger 'Batch closed (accounting webhook)': max_per_minute: 10 → 4" in shown
    assert "Nothing applied" in shown
    assert database_dump() == before

    versions = TaskVersion.objects.filter(task=demo_task).count()
    applied = import_(path, "--apply", "--user", "alice")

    assert "Applied" in applied and "Pending" not in applied
    demo_task.refresh_from_db()
    assert demo_task.stall_limit == 5
    assert Trigger.objects.get(task=demo_task, kind="webhook").max_per_minute == 4
    # A new task version, made by alice; and now the file is what is live.
    latest = TaskVersion.objects.filter(task=demo_task).order_by("-number").first()
    assert TaskVersion.objects.filter(task=demo_task).count() == versions + 1
    assert latest.definition["stall_limit"] == 5 and latest.created_by.username == "alice"
    assert import_(path).strip() == "no changes"


def test_a_widening_change_waits_for_a_second_person_and_is_not_live(
    make_task, alice, bob, tmp_path
):
    task = make_task([{"answer": "done"}], tools=["ledger_invoices"])
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, effect="allow", expression="args.batch == 'a'")
    data = yaml.safe_load(tasks_export(tasks=Task.objects.filter(pk=task.pk)))
    fields = data["tasks"][task.slug]
    fields["autonomy_level"] = 3
    fields["max_steps"] = 60
    fields["grants"]["ledger_invoices"]["rules"].append(
        {"effect": "allow", "expression": "args.batch == 'b'", "position": 1, "description": ""}
    )
    path = written(tmp_path, yaml.safe_dump(data))

    out = import_(path, "--apply", "--user", "alice")

    config_change = ConfigChange.objects.get(task=task, status="pending")
    dial_change = AutonomyChange.objects.get(task=task, status="pending")
    assert f"Pending: {task.slug}: change #{config_change.pk} waits for a second person" in out
    assert f"autonomy change #{dial_change.pk} waits for a second person" in out
    task.refresh_from_db()
    assert (task.autonomy_level, task.max_steps) == (1, 30)
    assert list(GrantRule.objects.filter(grant=grant).values_list("expression", flat=True)) == [
        "args.batch == 'a'"
    ]
    assert dial_change.to_level == 3 and dial_change.requested_by == alice

    # Shown again, the plan says what already waits.
    shown = import_(path)
    assert (
        f"max_steps: 30 → 60 (waits for a second person; change #{config_change.pk} asks" in shown
    )
    assert f"autonomy change #{dial_change.pk} asks it already" in shown

    # The second person confirms it, as on the change's page: then it is live.
    config_change_decide(change=config_change, user=bob, confirm=True)
    task.refresh_from_db()
    assert task.max_steps == 60
    assert GrantRule.objects.filter(grant=grant).count() == 2


def test_a_new_task_is_made_at_supervised_and_its_higher_dial_waits(make_task, alice, tmp_path):
    template = make_task([{"answer": "done"}], tools=["ledger_invoices"])
    data = yaml.safe_load(tasks_export(tasks=Task.objects.filter(pk=template.pk)))
    fields = data["tasks"].pop(template.slug)
    fields["autonomy_level"] = 2
    fields["name"] = "A new one"
    data["tasks"]["brand-new"] = fields
    path = written(tmp_path, yaml.safe_dump(data))

    out = import_(path, "--apply", "--user", "alice")

    task = Task.objects.get(slug="brand-new")
    assert task.autonomy_level == 1
    # A read-only tool runs without a person at every level: its grant waits too.
    grant = ConfigChange.objects.get(task=task, status="pending")
    assert [op["op"] for op in grant.operations] == ["grant_add"]
    assert not task.grants.exists()
    change = AutonomyChange.objects.get(task=task, status="pending")
    assert f"change #{grant.pk} waits" in out
    assert f"autonomy change #{change.pk} waits" in out
    assert TaskVersion.objects.filter(task=task).exists()


def test_leaving_a_grant_or_trigger_out_removes_it(rich_task, alice, tmp_path):
    data = yaml.safe_load(export())
    fields = data["tasks"][rich_task.slug]
    del fields["grants"]["email_send"]
    del fields["triggers"]["nightly"]
    path = written(tmp_path, yaml.safe_dump(data))

    shown = import_(path)
    assert "- grant email_send and its 2 rule(s)" in shown
    assert "- trigger 'nightly' (cron)" in shown

    import_(path, "--apply", "--user", "alice")
    assert not ToolGrant.objects.filter(task=rich_task, tool__name="email_send").exists()
    assert not Trigger.objects.filter(task=rich_task, name="nightly").exists()


def test_a_trigger_with_firings_is_not_removed(rich_task, alice, tmp_path):
    nightly = Trigger.objects.get(task=rich_task, name="nightly")
    Firing.objects.create(trigger=nightly, key="slot-1", accepted=False, refusal="disabled")
    data = yaml.safe_load(export())
    del data["tasks"][rich_task.slug]["triggers"]["nightly"]
    before = database_dump()

    with pytest.raises(CommandError, match="it has firings"):
        import_(written(tmp_path, yaml.safe_dump(data)), "--apply", "--user", "alice")
    assert database_dump() == before


# Bad files ---------------------------------------------------------------------------

STALL = "    stall_limit: 8\n"
BAD_FILES = {
    # name: (how the demo's export is spoiled, the line's text, the field, the message)
    "syntax": (
        lambda text: text.replace("    input_schema:\n", "    input_schema: [unclosed\n"),
        "input_schema: [unclosed",
        "",
        "not YAML",
    ),
    "unknown field": (
        lambda text: text.replace(
            "    stall_limit: 8\n", "    stall_limit: 8\n    stal_limit: 9\n"
        ),
        "stal_limit: 9",
        "tasks.reconcile-invoices.stal_limit",
        "unknown field",
    ),
    "wrong type": (
        lambda text: text.replace("max_steps: 20", "max_steps: twenty"),
        "max_steps: twenty",
        "tasks.reconcile-invoices.max_steps",
        "must be a whole number",
    ),
    "out of range": (
        lambda text: text.replace("model_max_attempts: 3", "model_max_attempts: 30"),
        "model_max_attempts: 30",
        "tasks.reconcile-invoices.model_max_attempts",
        "less than or equal to 10",
    ),
    "unknown tool": (
        lambda text: text.replace("      ledger_invoices:", "      ledger_invoicez:"),
        "ledger_invoicez:",
        "tasks.reconcile-invoices.grants.ledger_invoicez",
        "no tool named 'ledger_invoicez'",
    ),
    "duplicate key": (
        lambda text: text.replace(
            "    stall_limit: 8\n", "    stall_limit: 8\n    max_steps: 21\n"
        ),
        "max_steps: 21",
        "tasks.reconcile-invoices.max_steps",
        "duplicate key 'max_steps'",
    ),
    "bad rule": (
        lambda text: text.replace(
            "      email_send:\n        rules: []",
            "      email_send:\n        rules:\n        - effect: deny\n"
            "          expression: args.to ==",
        ),
        "expression: args.to ==",
        "tasks.reconcile-invoices.grants.email_send.rules[0].expression",
        "",
    ),
    "bad cron": (
        lambda text: text.replace("expression: 0 2 * * *", "expression: 0 2 * *"),
        "expression: 0 2 * *",
        "tasks.reconcile-invoices.triggers.Reconcile every night.config.expression",
        "not a cron expression",
    ),
    "alias": (
        lambda text: text.replace("example_input:\n", "example_input: &x\n").replace(
            "    four_eyes: false\n", "    four_eyes: false\n    input_schema_copy: *x\n"
        ),
        "example_input: &x",
        "",
        "anchors and aliases",
    ),
    "a number past any column": (
        lambda text: text.replace("max_steps: 20", "max_steps: 1" + "0" * 5000),
        "max_steps: 10000",
        "tasks.reconcile-invoices.max_steps",
        "",
    ),
    "a lone surrogate": (
        lambda text: text.replace("name: Reconcile invoices", 'name: "\\uD800"'),
        'name: "\\uD800"',
        "tasks.reconcile-invoices.name",
        "lone surrogate",
    ),
    "a group that is not": (
        lambda text: text.replace("approver_group: null", "approver_group: Nobody"),
        "approver_group: Nobody",
        "tasks.reconcile-invoices.approver_group",
        "no group named 'Nobody'",
    ),
    "a new task above its schema": (
        lambda text: text.replace(
            "objective_template: Reconcile the invoices of batch {batch}",
            "objective_template: Reconcile the invoices of batch {batchh}",
        ),
        "objective_template: Reconcile the invoices of batch {batchh}",
        "tasks.reconcile-invoices.objective_template",
        "not a property of the input schema",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_names_its_line_and_field_and_changes_nothing(case, demo_task, alice, tmp_path):
    spoil, line_text, field, message = BAD_FILES[case]
    text = spoil(export())
    assert line_text in text, "the test's edit did not take"
    expected_line = next(n for n, line in enumerate(text.splitlines(), 1) if line_text in line)
    before = database_dump()

    with pytest.raises(AsCodeError) as refused:
        tasks_import_plan(text=text, user=alice)
    with pytest.raises(CommandError, match="refused, and nothing changed"):
        import_(written(tmp_path, text), "--apply", "--user", "alice")

    problem = next(p for p in refused.value.problems if message in p.message)
    assert (problem.line, problem.field) == (expected_line, field)
    assert str(problem).startswith(f"line {expected_line}, column ")
    assert database_dump() == before


def test_one_bad_task_in_a_file_stops_the_good_one_too(demo_task, make_task, alice, tmp_path):
    other = make_task([{"answer": "done"}])
    text = export().replace("stall_limit: 8", "stall_limit: 5", 1)
    data = yaml.safe_load(text)
    data["tasks"][other.slug]["max_tokens"] = -1  # refused by the admin's form
    before = database_dump()

    with pytest.raises(AsCodeError) as refused:
        tasks_import_plan(text=yaml.safe_dump(data), user=alice)

    assert [p.field for p in refused.value.problems] == [f"tasks.{other.slug}.max_tokens"]
    assert database_dump() == before


def test_a_file_over_the_size_limit_is_refused(demo_task, tmp_path):
    text = export() + "#" * (1024 * 1024)
    with pytest.raises(AsCodeError, match="at most 1,048,576"):
        tasks_import_plan(text=text)
    with pytest.raises(CommandError, match="larger than 1,048,576 bytes"):
        import_(written(tmp_path, text))


def test_a_plan_made_stale_by_a_change_meanwhile_is_refused(demo_task, alice):
    plan = tasks_import_plan(text=export().replace("stall_limit: 8", "stall_limit: 5"), user=alice)
    Task.objects.filter(pk=demo_task.pk).update(stall_limit=6)

    with pytest.raises(AsCodeError, match="plan again"):
        tasks_import_apply(plan=plan, user=alice)
    demo_task.refresh_from_db()
    assert demo_task.stall_limit == 6


# Secrets -----------------------------------------------------------------------------


def test_secrets_are_never_exported(rich_task, alice, tmp_path):
    hook = Trigger.objects.get(task=rich_task, name="hook")
    text = export()

    for secret in (hook.secret, hook.previous_secret, "hunter2-pass", hook.public_id):
        assert secret not in text
    assert "redis://agent:•••@127.0.0.1:6379/0" in text

    # Read back, the redacted URL keeps its password and the webhook keeps its secret.
    data = yaml.safe_load(text)
    data["tasks"][rich_task.slug]["triggers"]["inbox"]["enabled"] = False
    data["tasks"][rich_task.slug]["triggers"]["hook2"] = {"kind": "webhook"}
    out = import_(written(tmp_path, yaml.safe_dump(data)), "--apply", "--user", "alice")

    inbox = Trigger.objects.get(task=rich_task, name="inbox")
    assert inbox.config["url"] == "redis://agent:hunter2-pass@127.0.0.1:6379/0"
    assert not inbox.enabled
    hook.refresh_from_db()
    assert hook.secret == "whsec_c2VjcmV0LXNpZ25pbmcta2V5LXZhbHVlLTEyMzQ1Njc4"
    made = Trigger.objects.get(task=rich_task, name="hook2")
    assert made.secret.startswith("whsec_") and made.secret not in out
    assert "'hook2' has a new signing secret" in out
    assert made.secret not in export()


def test_a_redacted_url_for_a_new_trigger_is_refused(rich_task, alice):
    data = yaml.safe_load(export())
    triggers = data["tasks"][rich_task.slug]["triggers"]
    triggers["inbox2"] = copy.deepcopy(triggers["inbox"])
    with pytest.raises(AsCodeError, match="password is redacted"):
        tasks_import_plan(text=yaml.safe_dump(data), user=alice)


# Who may ----------------------------------------------------------------------------


def test_a_user_without_permission_is_refused(demo_task, oscar, alice, tmp_path):
    path = written(tmp_path, export().replace("stall_limit: 8", "stall_limit: 5"))
    before = database_dump()

    with pytest.raises(CommandError, match="oscar may not make these changes: they need tasks"):
        import_(path, "--apply", "--user", "oscar")
    with pytest.raises(CommandError, match="needs --user"):
        import_(path, "--apply")
    with pytest.raises(CommandError, match="no user 'nobody'"):
        import_(path, "--apply", "--user", "nobody")
    assert database_dump() == before
    alice.is_staff = False
    alice.save()
    before = database_dump()
    with pytest.raises(CommandError, match="not active staff"):
        import_(path, "--apply", "--user", "alice")
    assert database_dump() == before


def test_a_grant_needs_the_grant_permission(demo_task, alice):
    ToolGrant.objects.filter(task=demo_task, tool__name="ledger_payments").delete()
    alice.user_permissions.remove(Permission.objects.get(codename="add_toolgrant"))
    alice = User.objects.get(pk=alice.pk)
    data = yaml.safe_load(export())
    data["tasks"]["reconcile-invoices"]["grants"]["ledger_payments"] = {"rules": []}

    with pytest.raises(PermissionDenied, match=r"they need tasks\.add_toolgrant"):
        tasks_import_plan(text=yaml.safe_dump(data), user=alice)
    # Without a user, the plan is only shown: it says what a grant would do.
    shown = tasks_import_plan(text=yaml.safe_dump(data)).diff
    assert "    + grant ledger_payments (waits for a second person)" in shown


def test_a_trigger_added_or_changed_needs_the_right_to_start_runs(demo_task, alice):
    """A trigger starts runs with nobody pressing Run: as in the admin, whoever may not
    start runs may not add one or raise its limits. Removing one needs no such right."""
    alice.user_permissions.remove(Permission.objects.get(codename="start_run"))
    alice = User.objects.get(pk=alice.pk)
    data = yaml.safe_load(export())
    triggers = data["tasks"]["reconcile-invoices"]["triggers"]
    raised = yaml.safe_load(yaml.safe_dump(data))
    raised["tasks"]["reconcile-invoices"]["triggers"]["Batch closed (accounting webhook)"][
        "max_per_minute"
    ] = 600
    added = yaml.safe_load(yaml.safe_dump(data))
    added["tasks"]["reconcile-invoices"]["triggers"]["Every minute"] = {
        **triggers["Reconcile every night"],
        "config": {**triggers["Reconcile every night"]["config"], "expression": "* * * * *"},
    }
    before = database_dump()

    for changed in (raised, added):
        with pytest.raises(PermissionDenied, match=r"tasks\.start_run"):
            tasks_import_plan(text=yaml.safe_dump(changed), user=alice)
    assert database_dump() == before
    removed = yaml.safe_load(yaml.safe_dump(data))
    del removed["tasks"]["reconcile-invoices"]["triggers"]["Reconcile every night"]
    assert "tasks.start_run" not in tasks_import_plan(text=yaml.safe_dump(removed)).permissions()


def test_the_example_file_in_the_docs_is_accepted(demo_task, alice):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "tasks-as-code.md").read_text()
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    Group.objects.create(name="Finance approvers")

    plan = tasks_import_plan(text=example, user=alice)

    assert "    - grant ledger_payments" in plan.diff
    assert (
        '    + email_send: rule approve `args.to != "finance@example.com"` (anyone but '
        "finance waits for a person)" in plan.diff
    )
