"""Tasks as code under attack: an insider with a staff account and some permissions
writes a hostile file (docs/tasks-as-code.md). Each test is a way in that was found
open, or one checked and found shut, and says which: the file must not widen what runs
unattended without a second person, read past the person's permissions, store what
the admin refuses, leak a secret, or make the process spin."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import yaml
from django.contrib.auth.models import Permission, User
from django.core.exceptions import PermissionDenied

from tasks.as_code import (
    MAX_ITEMS,
    MAX_NODES,
    AsCodeError,
    tasks_export,
    tasks_import_apply,
    tasks_import_plan,
)
from tasks.models import (
    AutonomyChange,
    ConfigChange,
    GrantRule,
    Task,
    TaskVersion,
    ToolGrant,
    Trigger,
)
from tests.tasks.test_as_code import database_dump, editor, export

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(db) -> User:
    return editor("alice")


@pytest.fixture
def viewer(db) -> User:
    """Staff who may look at tasks but change nothing."""
    user = User.objects.create_user("vera", "vera@example.com", "pw-vera-12345", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="tasks", codename="view_task")
    )
    return User.objects.get(pk=user.pk)


@pytest.fixture
def outsider(db) -> User:
    """Staff holding no permission on tasks at all."""
    return User.objects.create_user("oscar", "oscar@example.com", "pw-oscar-123", is_staff=True)


def refused(text: str, user: User | None = None) -> AsCodeError:
    with pytest.raises(AsCodeError) as caught:
        tasks_import_plan(text=text, user=user)
    return caught.value


# Values the admin refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    "spoil, field",
    [
        # A YAML escape writes a NUL the file's bytes never hold: the admin's forms
        # refuse it, PostgreSQL cannot store it (the apply failed with a DataError).
        (
            lambda f: f["grants"]["email_send"].update(
                rules=[{"effect": "deny", "expression": "true", "description": "x\0y"}]
            ),
            "grants.email_send.rules[0].description",
        ),
        # Held before (the admin's forms said it): said at the file's level now.
        (lambda f: f["triggers"].update({"a\0b": {"kind": "webhook"}}), "triggers"),
        (lambda f: f.update(instructions="line\0"), "instructions"),
    ],
)
def test_a_nul_character_written_as_an_escape_is_refused(make_task, alice, spoil, field):
    task = make_task([{"answer": "done"}], tools=["email_send"])
    data = yaml.safe_load(export())
    spoil(data["tasks"][task.slug])
    text = yaml.safe_dump(data)
    assert "\0" not in text  # only the escape: "\0"
    before = database_dump()

    error = refused(text, alice)

    assert any("NUL" in p.message and field in p.field for p in error.problems), error
    assert database_dump() == before


def test_a_name_the_admin_would_trim_is_refused(make_task, alice):
    """A new trigger "hook " was made beside a live "hook" (the admin trims a name), two
    triggers that read the same on every page; a new task "x " was made as "x"."""
    task = make_task([{"answer": "done"}])
    Trigger.objects.create(task=task, kind="webhook", name="hook", config={}, secret="whsec_x")
    data = yaml.safe_load(export())
    data["tasks"][task.slug]["triggers"]["hook "] = {"kind": "webhook"}
    data["tasks"]["fresh "] = {"name": "Fresh", "objective_template": "Do it."}
    before = database_dump()

    error = refused(yaml.safe_dump(data), alice)

    said = {p.field: p.message for p in error.problems}
    assert "no spaces at its ends" in said[f"tasks.{task.slug}.triggers.hook "]
    assert "no spaces at its ends" in said["tasks.fresh "]
    assert database_dump() == before


@pytest.mark.parametrize(
    "spoil, said",
    [
        # Text from an API's JSON may hold a lone surrogate: it escaped as a raw
        # UnicodeEncodeError from libyaml.
        (lambda t: t.replace("stall_limit: 8", "stall_limit: 8\n    x: \ud800"), "surrogate"),
        # A control character was said at line 1 whatever its line.
        (lambda t: t.replace("stall_limit: 8", "stall_limit: 8\x07"), "'\\x07'"),
        # A raw NEL reads as a line break that editors do not show: one line to the eye,
        # two fields to YAML.
        (
            lambda t: t.replace("stall_limit: 8", "stall_limit: 8\x85    max_steps: 999"),
            "U+0085",
        ),
    ],
)
def test_characters_that_hide_or_crash_are_refused_at_their_line(demo_task, spoil, said):
    text = spoil(export())
    odd = ("\ud800", "\x07", "\x85")
    expected = next(n for n, x in enumerate(text.split("\n"), 1) if any(c in x for c in odd))
    before = database_dump()

    error = refused(text)

    assert error.problems[0].line == expected and said in error.problems[0].message, error
    assert database_dump() == before


def test_the_version_is_the_number_one_not_a_boolean(demo_task, alice):
    error = refused(export().replace("version: 1\n", "version: yes\n"), alice)
    assert [p.field for p in error.problems] == ["version"]
    error = refused(export().replace("version: 1\n", "version: 1.0\n"), alice)
    assert [p.field for p in error.problems] == ["version"]


# Reading past one's permissions ------------------------------------------------------


def test_planning_needs_the_right_to_see_tasks(demo_task, outsider, viewer):
    """A plan says every live task's slug and, in its diff and its faults, live values:
    the admin shows them only to whoever may view tasks."""
    same = export()
    spoiled = same.replace("max_live_runs: null", "max_live_runs: 3")  # a fault naming a value

    for text in (same, spoiled):
        with pytest.raises(
            PermissionDenied, match=r"oscar may not make these changes: .* may not see tasks"
        ):
            tasks_import_plan(text=text, user=outsider)
    # Someone who may view them sees the plan; a change still needs its permissions.
    assert tasks_import_plan(text=same, user=viewer).diff == ["no changes"]
    with pytest.raises(PermissionDenied, match="vera may not make these changes"):
        tasks_import_plan(text=same.replace("stall_limit: 8", "stall_limit: 5"), user=viewer)


# Making the process spin -------------------------------------------------------------


def test_a_sexagesimal_number_is_refused_without_being_computed(demo_task):
    """PyYAML reads 1:0:0:... as a base-60 integer, one multiplication a digit on a
    number that keeps growing: 400 KB of it took about 10 seconds."""
    text = "version: 1" + ":0" * 200_000 + "\ntasks: {}\n"
    started = time.monotonic()

    error = refused(text)

    assert time.monotonic() - started < 2
    assert error.problems[0].field == "version" and error.problems[0].line == 1


def test_a_file_of_many_small_values_is_read_quickly(demo_task):
    """The pure-Python parser took about 40 seconds for a megabyte of small values."""
    text = "version: 1\ntasks: {}\n" + "".join(f"k{i}: [1, 2]\n" for i in range(20_000))
    started = time.monotonic()

    error = refused(text)

    assert time.monotonic() - started < 4
    assert error.problems[0].field == "k0" and "unknown field" in error.problems[0].message


def test_a_file_of_very_many_values_is_refused_before_they_are_built(demo_task):
    """A megabyte of one-digit numbers built 450,000 nodes: some 370 MB and 5 s."""
    text = "version: 1\ntasks: {}\nx: [" + ",".join(["1"] * (MAX_NODES + 10)) + "]\n"
    started = time.monotonic()

    error = refused(text)

    assert time.monotonic() - started < 3
    assert f"more than {MAX_NODES:,} values" in error.problems[0].message
    assert error.problems[0].line == 3


def test_a_file_naming_too_many_things_is_refused_before_any_is_looked_up(demo_task):
    """Each task, grant, rule and trigger costs queries and a form: a megabyte of small
    tasks took minutes. Past MAX_ITEMS the file is refused, naming where."""
    body = "".join(
        f"  t{i}:\n    name: x\n    objective_template: y\n" for i in range(MAX_ITEMS + 1)
    )
    text = "version: 1\ntasks:\n" + body
    started = time.monotonic()

    error = refused(text)

    assert time.monotonic() - started < 3
    [problem] = error.problems
    assert f"more than {MAX_ITEMS:,}" in problem.message
    assert problem.field == f"tasks.t{MAX_ITEMS}" and problem.line == 2 + 3 * MAX_ITEMS + 1


def test_a_rule_list_past_the_limit_is_refused_too(make_task):
    task = make_task([{"answer": "done"}], tools=["email_send"])
    data = yaml.safe_load(export())
    data["tasks"][task.slug]["grants"]["email_send"]["rules"] = [
        {"effect": "deny", "expression": f"args.to == '{i}'"} for i in range(MAX_ITEMS)
    ]

    error = refused(yaml.safe_dump(data))

    assert f"more than {MAX_ITEMS:,}" in error.problems[0].message


def test_an_export_past_the_limit_says_to_export_fewer(make_task):
    task = make_task([{"answer": "done"}], tools=["email_send"])
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.bulk_create(
        GrantRule(grant=grant, effect="deny", expression=f"args.to == '{i}'")
        for i in range(MAX_ITEMS)
    )
    with pytest.raises(AsCodeError, match="export fewer tasks"):
        tasks_export()


# Round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("odd", ["a\x85b", "a\u2028b", "a\u2029b", "ends\x85"])
def test_text_with_a_unicode_line_break_round_trips(make_task, alice, odd):
    """YAML reads NEL and the Unicode line and paragraph separators as line breaks: a
    plain scalar holding one came back as a space."""
    make_task([{"answer": "done"}], description=odd, instructions=f"one\n{odd}\n")
    before = database_dump()

    plan = tasks_import_plan(text=export(), user=alice)

    assert plan.diff == ["no changes"]
    assert database_dump() == before


def test_a_crlf_file_with_a_bom_reads_as_the_same_file(demo_task, alice):
    """Held: a file saved on Windows (CRLF, a byte-order mark) is the same file."""
    text = "\ufeff" + export().replace("\n", "\r\n")
    assert tasks_import_plan(text=text, user=alice).diff == ["no changes"]


# Held: what was tried and found shut ------------------------------------------------


@pytest.mark.parametrize(
    "text, said",
    [
        ('version: 1\na: &a ["x","x"]\nb: &b [*a,*a]\nc: [*b,*b]\n', "anchors and aliases"),
        ("version: 1\ntasks: !!python/object/apply:os.system [id]\n", "not YAML"),
        ("version: 1\ntasks: {<<: {x: 1}}\n", "a key must be text"),
        ("version: 1\ntasks: {? [a]\n : 1}\n", "a key must be text"),
        ("version: 1\ntasks: {on: {}}\n", "a key must be text"),
        ("version: 1\ntasks: " + "[" * 70 + "]" * 70 + "\n", "nested deeper"),
        ("version: 1\ntasks: !!binary aGk=\n", "must be a mapping"),
        ("version: 1\ntasks: {}\n---\nversion: 1\n", "not YAML"),
    ],
)
def test_yaml_tricks_are_refused(demo_task, text, said):
    before = database_dump()
    assert said in str(refused(text))
    assert database_dump() == before


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("confidence_threshold", ".nan", "must be a number"),
        ("confidence_threshold", ".inf", "must be a number"),
        ("max_spend", "'NaN'", "Enter a number"),
        ("max_steps", "2001-12-14", "must be a whole number"),
        ("four_eyes", "'yes'", "must be true or false"),
        ("name", "on", "must be text"),
        ("max_spend", "!!binary aGk=", "must be a number"),
    ],
)
def test_values_a_form_would_refuse_are_refused(demo_task, alice, field, value, said):
    text = export()
    line = next(x for x in text.splitlines() if x.startswith(f"    {field}:"))
    error = refused(text.replace(line + "\n", f"    {field}: {value}\n", 1), alice)
    assert any(said in p.message and p.field.endswith(field) for p in error.problems), error


def test_lowering_the_dial_first_does_not_let_a_grant_skip_the_second_person(make_task, alice):
    """Held: one file lowering the dial to Shadow and granting a read-only tool: a read
    call runs at every level, so the grant waits; the dial's way back up is governed."""
    task = make_task([{"answer": "done"}], tools=["email_send"], autonomy_level=2)
    data = yaml.safe_load(export())
    fields = data["tasks"][task.slug]
    fields["autonomy_level"] = 0
    fields["grants"]["ledger_invoices"] = {"rules": []}
    plan = tasks_import_plan(text=yaml.safe_dump(data), user=alice)

    result = tasks_import_apply(plan=plan, user=alice)

    task.refresh_from_db()
    assert task.autonomy_level == 0
    assert not task.grants.filter(tool__name="ledger_invoices").exists()
    assert [p.kind for p in result.pending] == ["config"]
    # Back up to Guarded: the dial waits for a second person.
    fields["autonomy_level"] = 2
    result = tasks_import_apply(
        plan=tasks_import_plan(text=yaml.safe_dump(data), user=alice), user=alice
    )
    task.refresh_from_db()
    assert task.autonomy_level == 0
    assert "autonomy" in [p.kind for p in result.pending]
    assert AutonomyChange.objects.filter(task=task, status="pending", to_level=2).exists()


def test_a_deny_rule_cannot_be_dropped_by_regranting_the_tool(make_task, alice):
    """Held: the grant removed in one file (narrowing, at once) and granted again bare
    in the next waits: the trail remembers the deny rule it had."""
    task = make_task([{"answer": "done"}], tools=["email_send"], autonomy_level=3)
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, effect="deny", expression="args.to == 'ceo'")
    data = yaml.safe_load(export())
    fields = data["tasks"][task.slug]
    del fields["grants"]["email_send"]
    tasks_import_apply(plan=tasks_import_plan(text=yaml.safe_dump(data), user=alice), user=alice)
    assert not ToolGrant.objects.filter(task=task).exists()

    fields["grants"]["email_send"] = {"rules": []}
    result = tasks_import_apply(
        plan=tasks_import_plan(text=yaml.safe_dump(data), user=alice), user=alice
    )

    assert not ToolGrant.objects.filter(task=task).exists()
    change = ConfigChange.objects.get(pk=result.pending[0].id)
    assert "deny `args.to == 'ceo'`" in change.summary


def test_a_deny_rule_turned_into_an_allow_waits(make_task, alice):
    """Held: the same expression with another effect is a removal and an addition; the
    removal of a deny rule waits for a second person, and the rule stays."""
    task = make_task([{"answer": "done"}], tools=["email_send"], autonomy_level=3)
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, effect="deny", expression="args.to == 'ceo'")
    text = export().replace("effect: deny", "effect: allow")

    result = tasks_import_apply(plan=tasks_import_plan(text=text, user=alice), user=alice)

    assert GrantRule.objects.filter(grant=grant, effect="deny").exists()
    assert [p.kind for p in result.pending] == ["config"]


def test_max_live_runs_on_an_existing_task_is_not_changed(demo_task, alice):
    """Held: the live-run cap is read-only on the admin's change page; a file cannot
    lift it."""
    Task.objects.filter(pk=demo_task.pk).update(max_live_runs=2)
    text = export().replace("max_live_runs: 2", "max_live_runs: null")
    error = refused(text, alice)
    assert error.problems[0].field.endswith("max_live_runs")


def test_a_manual_trigger_the_admin_cannot_make_is_refused(demo_task, alice):
    data = yaml.safe_load(export())
    data["tasks"]["reconcile-invoices"]["triggers"]["by hand"] = {"kind": "manual"}
    error = refused(yaml.safe_dump(data), alice)
    assert any(p.field.endswith("kind") for p in error.problems), error


def test_the_round_trip_of_the_demo_writes_nothing_even_when_applied_twice(demo_task, alice):
    """Held: no new TaskVersion, no trail event, no request."""
    text = export()
    before = database_dump()
    versions = TaskVersion.objects.count()
    for _ in range(2):
        result = tasks_import_apply(plan=tasks_import_plan(text=text, user=alice), user=alice)
        assert result.applied == [] and result.pending == []
    assert TaskVersion.objects.count() == versions
    assert database_dump() == before


def test_a_queue_password_is_in_no_error_nor_diff(make_task, alice):
    """Held: a file that keeps a queue's redacted URL and spoils the rest of its config
    is refused without the password in any message; a change is said redacted."""
    task = make_task([{"answer": "done"}])
    Trigger.objects.create(
        task=task,
        kind="queue",
        name="inbox",
        config={"transport": "redis", "url": "redis://u:hunter2@127.0.0.1:6379/0", "stream": "s"},
    )
    text = export()
    assert "hunter2" not in text
    spoiled = text.replace("transport: redis", "transport: amqp")
    error = refused(spoiled, alice)
    assert "hunter2" not in str(error)
    changed = text.replace("stream: s", "stream: t")
    plan = tasks_import_plan(text=changed, user=alice)
    assert "hunter2" not in "\n".join(plan.diff) and "stream" in "\n".join(plan.diff)
    tasks_import_apply(plan=plan, user=alice)
    assert Trigger.objects.get(task=task).config["url"] == "redis://u:hunter2@127.0.0.1:6379/0"


def test_a_spend_budget_is_exported_exactly(make_task, alice):
    task = make_task([{"answer": "done"}], max_spend=Decimal("0.0001"))
    text = export()
    assert "max_spend: '0.0001'" in text or "max_spend: 0.0001" in text
    assert tasks_import_plan(text=text, user=alice).diff == ["no changes"]
    assert Task.objects.get(pk=task.pk).max_spend == Decimal("0.0001")
