"""Governed configuration (guarantee 9): every change to a task, tool, grant or rule is in
a trail; a change that lets more run without a person waits for a second person, and
narrowing applies at once. Driven through the admin and the pages, over real HTTP, by
three personas: alice asks, bob confirms, oscar may do neither."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse

from lineage.models import LineageEvent
from lineage.services import chain_verify
from tasks.autonomy import task_trail_uuid
from tasks.governance import tool_trail_uuid
from tasks.models import ConfigChange, GrantRule, Task, Tool, ToolGrant

pytestmark = pytest.mark.django_db

EDITOR_PERMISSIONS = [
    "view_task",
    "change_task",
    "add_task",
    "delete_task",
    "view_tool",
    "change_tool",
    "add_tool",
    "delete_tool",
    "view_toolgrant",
    "add_toolgrant",
    "change_toolgrant",
    "delete_toolgrant",
    "view_grantrule",
    "add_grantrule",
    "change_grantrule",
    "delete_grantrule",
    "view_configchange",
]


def editor(username: str, permissions: list[str] = EDITOR_PERMISSIONS) -> User:
    """A member of staff who may edit tasks, tools and grants in the admin."""
    user = User.objects.create_user(username, f"{username}@example.com", "pw-123456789")
    user.is_staff = True
    user.save()
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="tasks", codename__in=permissions)
    )
    return User.objects.get(pk=user.pk)


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alice(db) -> Client:
    return logged_in(editor("alice"))


@pytest.fixture
def bob(db) -> Client:
    return logged_in(editor("bob"))


@pytest.fixture
def oscar(db) -> Client:
    """Logged in, with no right to change anything."""
    return logged_in(User.objects.create_user("oscar", "oscar@example.com", "pw-oscar-123"))


def form_data(page: Any) -> dict[str, Any]:
    """The admin page's form as it was filled in, inlines included, as a browser posts it."""
    forms = [page.context["adminform"].form]
    for inline in page.context["inline_admin_formsets"]:
        forms += [inline.formset.management_form, *inline.formset.forms]
    data = {}
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is None:
                continue
            if isinstance(value, bool):
                if value:
                    data[form[name].html_name] = "on"
                continue
            data[form[name].html_name] = value
    return data


def admin_post(client: Client, url: str, **changes: Any) -> Any:
    data = form_data(client.get(url))
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)  # an unticked box is not posted
        else:
            data[name] = "on" if value is True else value
    return client.post(url, data, follow=True)


def task_url(task: Task) -> str:
    return reverse("admin:tasks_task_change", args=[task.pk])


def grant_url(grant: ToolGrant) -> str:
    return reverse("admin:tasks_toolgrant_change", args=[grant.pk])


def page_messages(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def decide(client: Client, change: ConfigChange, decision: str, **extra: str) -> Any:
    url = reverse("tasks:config_change_decide", args=[change.pk])
    return client.post(url, {"decision": decision, **extra}, follow=True)


def trail(uuid_: Any) -> list[LineageEvent]:
    return list(LineageEvent.objects.filter(run_uuid=uuid_).order_by("seq"))


def pending() -> ConfigChange:
    return ConfigChange.objects.get(status=ConfigChange.Status.PENDING)


def http_tool(**fields: Any) -> Tool:
    values = {
        "name": "items_create",
        "kind": Tool.Kind.HTTP,
        "description": "Create an item.",
        "input_schema": {"type": "object", "properties": {"id": {"type": "integer"}}},
        "side_effect": "irreversible",
        "config": {
            "method": "POST",
            "url": "https://api.example.com/items",
            "allowed_hosts": ["api.example.com"],
        },
        **fields,
    }
    return Tool.objects.create(**values)


# The attacks: one person widening alone ---------------------------------------------


def test_four_eyes_turned_off_waits_for_a_second_person(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    response = admin_post(alice, task_url(task), four_eyes=False)
    assert response.status_code == 200
    [warning] = [m for m in page_messages(response) if m.startswith("Saved, except")]
    assert "waits for a second person" in warning
    assert "Four eyes: on -&gt; off (four eyes turned off" in warning
    task.refresh_from_db()
    assert task.four_eyes is True
    change = pending()
    assert change.requested_by.username == "alice"

    # alice cannot confirm her own change, from this session or another one.
    refused = decide(alice, change, "confirm")
    assert "Not decided: a second person must confirm: you asked for this change." in (
        page_messages(refused)
    )
    refused = decide(logged_in(User.objects.get(username="alice")), change, "confirm")
    assert "a second person must confirm" in " ".join(page_messages(refused))
    task.refresh_from_db()
    assert task.four_eyes is True

    confirmed = decide(bob, change, "confirm")
    assert f"Confirmed: change #{change.pk} is applied." in page_messages(confirmed)
    task.refresh_from_db()
    assert task.four_eyes is False
    change.refresh_from_db()
    assert change.status == "applied" and change.decided_by.username == "bob"

    events = trail(task_trail_uuid(task))
    requested, confirmed_event = events[-2], events[-1]
    assert (requested.kind, requested.actor) == ("config.requested", "user:alice")
    assert requested.payload["changes"] == [
        {
            "op": "set",
            "field": "four_eyes",
            "before": True,
            "after": False,
            "why": "four eyes turned off: whoever started a run may approve its calls",
        }
    ]
    assert (confirmed_event.kind, confirmed_event.actor) == ("config.confirmed", "user:bob")
    assert confirmed_event.payload["requested_by"] == "user:alice"
    assert confirmed_event.at >= requested.at
    assert chain_verify(task_trail_uuid(task)).intact


@pytest.mark.parametrize(
    ("field", "start", "posted", "expected_line"),
    [
        ("approver_group", "finance", "", "Approver group: group 'finance' -> (none)"),
        ("approver_group", "finance", "other", "Approver group: group 'finance' -> group 'other'"),
        ("confidence_threshold", 0.7, "0.2", "Confidence threshold: 0.7 -> 0.2"),
        ("self_check", True, False, "Self check: on -> off"),
        ("max_steps", 30, "500", "Max steps: 30 -> 500"),
        ("max_tokens", 1000, "", "Max tokens: 1000 -> (blank)"),
        ("loop_repeat_limit", 3, "0", "Loop repeat limit: 3 -> 0"),
        ("step_down_rejections", 3, "0", "Step down rejections: 3 -> 0"),
    ],
)
def test_a_task_field_that_widens_waits_for_a_second_person(
    make_task, alice, bob, field, start, posted, expected_line
):
    groups = {name: Group.objects.create(name=name) for name in ("finance", "other")}
    initial = groups[start] if field == "approver_group" else start
    task = make_task([], **{field: initial})
    if field == "approver_group" and posted:
        posted = str(groups[posted].pk)
    admin_post(alice, task_url(task), **{field: posted})
    task.refresh_from_db()
    assert getattr(task, field) == initial
    change = pending()
    assert change.summary.startswith(expected_line + " (")

    decide(bob, change, "confirm")
    task.refresh_from_db()
    assert getattr(task, field) != initial


def test_lowering_a_tool_s_side_effect_class_waits_for_a_second_person(alice, bob):
    tool = http_tool()
    url = reverse("admin:tasks_tool_change", args=[tool.pk])
    response = admin_post(alice, url, side_effect="reversible")
    assert any("waits for a second person" in m for m in page_messages(response))
    tool.refresh_from_db()
    assert tool.side_effect == "irreversible"
    change = pending()
    assert change.tool == tool
    assert change.summary == (
        "Side effect: Irreversible -> Reversible (the side-effect class lowered from "
        "irreversible to reversible: the gate holds it less)"
    )

    assert decide(alice, change, "confirm").status_code == 200
    tool.refresh_from_db()
    assert tool.side_effect == "irreversible"
    decide(bob, change, "confirm")
    tool.refresh_from_db()
    assert tool.side_effect == "reversible"
    kinds = [event.kind for event in trail(tool_trail_uuid(tool))]
    assert kinds == ["config.requested", "config.confirmed"]
    assert chain_verify(tool_trail_uuid(tool)).intact


def test_always_approve_turned_off_waits_and_turned_on_applies_at_once(make_task, alice, bob):
    make_task([])  # the code tools are synced
    tool = Tool.objects.get(name="test_send")
    url = reverse("admin:tasks_tool_change", args=[tool.pk])
    admin_post(alice, url, always_approve=True)
    tool.refresh_from_db()
    assert tool.always_approve is True
    assert not ConfigChange.objects.exists()

    admin_post(alice, url, always_approve=False)
    tool.refresh_from_db()
    assert tool.always_approve is True
    decide(bob, pending(), "confirm")
    tool.refresh_from_db()
    assert tool.always_approve is False
    events = trail(tool_trail_uuid(tool))
    assert [event.kind for event in events] == [
        "config.changed",
        "config.requested",
        "config.confirmed",
    ]
    assert events[0].payload["summary"] == ["Always approve: off -> on"]
    assert events[0].actor == "user:alice"


def deny_rule_task(make_task, expression: str = "args.amount > 100", effect: str = "deny"):
    task = make_task([], tools=["test_pay"])
    grant = ToolGrant.objects.get(task=task)
    rule = GrantRule.objects.create(grant=grant, expression=expression, effect=effect)
    return task, grant, rule


def test_a_deny_rule_deleted_in_the_admin_waits_for_a_second_person(make_task, alice, bob):
    task, grant, rule = deny_rule_task(make_task)
    response = admin_post(alice, grant_url(grant), **{"rules-0-DELETE": "on"})
    assert any("a deny rule removed" in m for m in page_messages(response))
    assert GrantRule.objects.filter(pk=rule.pk).exists()

    decide(bob, pending(), "confirm")
    assert not GrantRule.objects.filter(pk=rule.pk).exists()
    version = task.versions.order_by("-number").first()
    assert version.definition["rules"] == {}
    assert chain_verify(task_trail_uuid(task)).intact


def test_a_deny_rule_s_expression_changed_waits_for_a_second_person(make_task, alice, bob):
    _task, grant, rule = deny_rule_task(make_task)
    admin_post(alice, grant_url(grant), **{"rules-0-expression": "args.amount > 1000000"})
    rule.refresh_from_db()
    assert rule.expression == "args.amount > 100"
    change = pending()
    assert change.summary == (
        "test_pay: rule deny `args.amount > 100` -> deny `args.amount > 1000000` "
        "(a deny rule's expression changed)"
    )
    decide(bob, change, "confirm")
    rule.refresh_from_db()
    assert rule.expression == "args.amount > 1000000"


def test_a_tool_granted_to_a_guarded_task_waits_for_a_second_person(make_task, alice, bob):
    task = make_task([], tools=["test_echo"], autonomy_level=2)
    note = Tool.objects.get(name="test_note")
    data = form_data(alice.get(task_url(task)))
    data["grants-1-tool"] = str(note.pk)
    data["grants-1-task"] = str(task.pk)
    response = alice.post(task_url(task), data, follow=True)
    assert any("grant test_note (granted at 2 · Guarded" in m for m in page_messages(response))
    assert list(task.grants.values_list("tool__name", flat=True)) == ["test_echo"]

    decide(bob, pending(), "confirm")
    assert sorted(task.grants.values_list("tool__name", flat=True)) == ["test_echo", "test_note"]
    assert task.versions.order_by("-number").first().definition["tools"] == [
        "test_echo",
        "test_note",
    ]


def test_a_grant_added_on_its_own_page_with_rules_waits_whole(make_task, alice, bob):
    task = make_task([], autonomy_level=2)
    pay = Tool.objects.get(name="test_pay")
    url = reverse("admin:tasks_toolgrant_add")
    response = alice.post(
        url,
        {
            "task": task.pk,
            "tool": pay.pk,
            "rules-TOTAL_FORMS": "1",
            "rules-INITIAL_FORMS": "0",
            "rules-0-position": "0",
            "rules-0-effect": "approve",
            "rules-0-expression": "args.amount > 10",
            "rules-0-description": "",
        },
        follow=True,
    )
    assert response.redirect_chain[-1][0] == reverse("tasks:detail", args=[task.slug])
    assert any("waits for a second person" in m for m in page_messages(response))
    assert not ToolGrant.objects.filter(task=task).exists()

    decide(bob, pending(), "confirm")
    grant = ToolGrant.objects.get(task=task)
    assert list(grant.rules.values_list("effect", "expression")) == [
        ("approve", "args.amount > 10")
    ]


def test_an_irreversible_tool_granted_at_supervised_applies_at_once(make_task, alice):
    task = make_task([])
    send = Tool.objects.get(name="test_send")
    data = form_data(alice.get(task_url(task)))
    data.update({"grants-0-tool": str(send.pk), "grants-0-task": str(task.pk)})
    alice.post(task_url(task), data)
    assert list(task.grants.values_list("tool__name", flat=True)) == ["test_send"]
    assert not ConfigChange.objects.exists()


def test_a_read_tool_granted_again_after_its_grant_was_removed_waits(make_task, alice, bob):
    """Removing a grant narrows (at once); granting the tool again would drop its deny
    rule with one person, so the new grant waits, whatever the dial."""
    task = make_task([], tools=["test_echo"])
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, expression="args.text == 'salaries'", effect="deny")
    admin_post(alice, task_url(task), **{"grants-0-DELETE": "on"})
    assert not task.grants.exists()

    data = form_data(alice.get(task_url(task)))
    data.update({"grants-0-tool": str(grant.tool_id), "grants-0-task": str(task.pk)})
    alice.post(task_url(task), data)
    assert not task.grants.exists()
    assert pending().summary.startswith("grant test_echo (granted at 1 · Supervised")


def grant_on_its_own_page(
    client: Client, task: Task, tool: Tool, rules: list[tuple[str, str]] = ()
) -> Any:
    """Grant ``tool`` to ``task`` on the grant's add page, with rules (effect, expression)."""
    data = {
        "task": task.pk,
        "tool": tool.pk,
        "rules-TOTAL_FORMS": str(len(rules)),
        "rules-INITIAL_FORMS": "0",
    }
    for index, (effect, expression) in enumerate(rules):
        data.update(
            {
                f"rules-{index}-position": str(index),
                f"rules-{index}-effect": effect,
                f"rules-{index}-expression": expression,
                f"rules-{index}-description": "",
            }
        )
    return client.post(reverse("admin:tasks_toolgrant_add"), data, follow=True)


def grant_remove_in_the_admin(client: Client, grant: ToolGrant) -> None:
    client.post(reverse("admin:tasks_toolgrant_delete", args=[grant.pk]), {"post": "yes"})
    assert not ToolGrant.objects.filter(pk=grant.pk).exists()  # narrowing: at once


@pytest.mark.parametrize(
    ("autonomy_level", "tool_name"), [(1, "test_pay"), (1, "test_send"), (2, "test_send")]
)
def test_a_deny_rule_is_not_dropped_by_removing_the_grant_and_granting_again(
    make_task, alice, bob, autonomy_level, tool_name
):
    """The review's side door: removing the grant narrows (at once), and a tool that
    would wait for a person at the task's level was granted again at once, without the
    deny rule. The grant's rules are part of what it allows: granted again with fewer,
    it waits for a second person, and no version pins the tool meanwhile."""
    task = make_task([], tools=[tool_name], autonomy_level=autonomy_level)
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, expression="args.amount > 1000", effect="deny")
    grant_remove_in_the_admin(alice, grant)

    data = form_data(alice.get(task_url(task)))
    data.update({"grants-0-tool": str(grant.tool_id), "grants-0-task": str(task.pk)})
    response = alice.post(task_url(task), data, follow=True)
    assert any("waits for a second person" in m for m in page_messages(response))
    assert not task.grants.exists()
    assert task.versions.order_by("-number").first().definition["tools"] == []
    change = pending()
    assert change.summary == (
        f"grant {tool_name} (granted again with less than its last grant: "
        "deny `args.amount > 1000`)"
    )

    refused = decide(alice, change, "confirm")
    assert "a second person must confirm" in " ".join(page_messages(refused))
    assert not task.grants.exists()
    decide(bob, change, "confirm")
    grant = ToolGrant.objects.get(task=task)
    assert not grant.rules.exists()
    assert task.versions.order_by("-number").first().definition["tools"] == [tool_name]
    assert chain_verify(task_trail_uuid(task)).intact


def test_a_tool_granted_again_with_the_rules_it_had_applies_at_once(make_task, alice):
    task = make_task([], tools=["test_pay"])
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, expression="args.amount > 1000", effect="deny")
    GrantRule.objects.create(grant=grant, expression="args.to == 'x'", effect="approve")
    grant_remove_in_the_admin(alice, grant)

    # The same rules, the approve one made a deny (stricter), and one rule more.
    response = grant_on_its_own_page(
        alice,
        task,
        grant.tool,
        [("deny", "args.amount > 1000"), ("deny", "args.to == 'x'"), ("approve", "true")],
    )
    assert not any("waits" in m for m in page_messages(response))
    assert not ConfigChange.objects.exists()
    regrant = ToolGrant.objects.get(task=task)
    assert sorted(regrant.rules.values_list("effect", "expression")) == [
        ("approve", "true"),
        ("deny", "args.amount > 1000"),
        ("deny", "args.to == 'x'"),
    ]
    assert task.versions.order_by("-number").first().definition["tools"] == ["test_pay"]

    # Removed with those rules, the tool granted again with less waits: each rule counts.
    grant_remove_in_the_admin(alice, regrant)
    grant_on_its_own_page(alice, task, grant.tool, [("deny", "args.amount > 1000")])
    assert not task.grants.exists()
    assert pending().summary == (
        "grant test_pay with rules: deny `args.amount > 1000` (granted again with less "
        "than its last grant: deny `args.to == 'x'`; approve `true`)"
    )


def test_a_tool_deleted_and_made_again_by_its_name_keeps_the_rules_it_had(make_task, alice):
    """Runs find their tools by name: a new tool under the old name is granted again."""
    task = make_task([])
    items = http_tool()
    grant = ToolGrant.objects.create(task=task, tool=items)
    GrantRule.objects.create(grant=grant, expression="args.id == 1", effect="deny")
    grant_remove_in_the_admin(alice, grant)
    alice.post(reverse("admin:tasks_tool_delete", args=[items.pk]), {"post": "yes"})
    assert not Tool.objects.filter(pk=items.pk).exists()

    again = http_tool()
    grant_on_its_own_page(alice, task, again)
    assert not task.grants.exists()
    assert "deny `args.id == 1`" in pending().summary


def test_a_first_grant_and_a_grant_that_had_no_rules_apply_at_once(make_task, alice):
    """Only rules a grant carried are carried over: an ordinary grant at Supervised of a
    tool that waits for a person there is not held, first time or again."""
    task = make_task([], tools=["test_pay"])
    send = Tool.objects.get(name="test_send")
    grant_on_its_own_page(alice, task, send)
    grant_remove_in_the_admin(alice, ToolGrant.objects.get(task=task, tool__name="test_pay"))
    grant_on_its_own_page(alice, task, Tool.objects.get(name="test_pay"))
    assert sorted(task.grants.values_list("tool__name", flat=True)) == ["test_pay", "test_send"]
    assert not ConfigChange.objects.exists()


@pytest.mark.parametrize(
    ("before", "after", "widens"),
    [
        ([("deny", "a")], [("deny", "a")], False),
        ([("deny", "a")], [("approve", "a")], True),  # a person may pass it now
        ([("deny", "a")], [("deny", "a "), ("deny", "b")], True),  # not provably the same
        ([("approve", "a")], [("deny", "a")], False),  # refused instead of held
        ([("approve", "a")], [], True),
        ([("allow", "a"), ("allow", "b")], [("allow", "a")], False),  # fewer calls match
        ([("allow", "a")], [], True),  # every call allowed
        ([("allow", "a")], [("allow", "a"), ("allow", "c")], True),
        ([], [("allow", "a"), ("deny", "b")], False),
    ],
)
def test_a_grant_s_rules_are_compared_with_the_last_removed_one_s(before, after, widens):
    from tasks.governance import grant_rules_missing

    def plain(rules):
        return [{"effect": e, "expression": x, "position": 0, "description": ""} for e, x in rules]

    assert bool(grant_rules_missing(before=plain(before), after=plain(after))) is widens


def test_a_pending_rule_change_goes_with_its_grant(make_task, alice, bob):
    """A change waiting for one of a grant's rules is closed when the grant is removed:
    it cannot be confirmed later, onto the grant as it is then or onto a new grant."""
    task, grant, _rule = deny_rule_task(make_task)
    admin_post(alice, grant_url(grant), **{"rules-0-DELETE": "on"})
    waiting = pending()
    grant_remove_in_the_admin(alice, grant)
    waiting.refresh_from_db()
    assert waiting.status == "superseded"
    assert waiting.reason == "the rule deny `args.amount > 100` of test_pay is gone"

    grant_on_its_own_page(alice, task, grant.tool, [("deny", "args.amount > 100")])
    regrant = ToolGrant.objects.get(task=task)
    response = decide(bob, waiting, "confirm")
    assert "Not decided: this change was already superseded." in page_messages(response)
    assert list(regrant.rules.values_list("effect", "expression")) == [
        ("deny", "args.amount > 100")
    ]
    superseded = [e for e in trail(task_trail_uuid(task)) if e.kind == "config.superseded"]
    assert [e.payload["change"] for e in superseded] == [waiting.pk]


# Rules: what narrows, what widens -----------------------------------------------------


def rule_rows(client: Client, grant: ToolGrant, rows: list[tuple[str, str]]) -> Any:
    data = form_data(client.get(grant_url(grant)))
    start = int(data["rules-INITIAL_FORMS"])
    for offset, (effect, expression) in enumerate(rows):
        index = start + offset
        data.update(
            {
                f"rules-{index}-position": "0",
                f"rules-{index}-effect": effect,
                f"rules-{index}-expression": expression,
                f"rules-{index}-description": "",
                f"rules-{index}-grant": str(grant.pk),
            }
        )
    data["rules-TOTAL_FORMS"] = str(start + len(rows))
    return client.post(grant_url(grant), data, follow=True)


def test_rules_that_narrow_apply_at_once_and_an_extra_allow_waits(make_task, alice):
    task = make_task([], tools=["test_pay"])
    grant = ToolGrant.objects.get(task=task)
    rule_rows(alice, grant, [("deny", "args.to == 'mallory'"), ("allow", "args.amount < 50")])
    assert grant.rules.count() == 2
    assert not ConfigChange.objects.exists()

    rule_rows(alice, grant, [("allow", "args.amount < 5000")])
    assert grant.rules.count() == 2
    assert pending().summary == (
        "test_pay: add rule allow `args.amount < 5000` (an allow rule added beside others: "
        "more calls match one)"
    )
    [changed] = [e for e in trail(task_trail_uuid(task)) if e.kind == "config.changed"]
    assert changed.payload["summary"] == [
        "test_pay: add rule deny `args.to == 'mallory'`",
        "test_pay: add rule allow `args.amount < 50`",
    ]


def test_the_last_allow_rule_removed_waits_one_of_two_applies(make_task, alice):
    _task, grant, first = deny_rule_task(make_task, "args.amount < 50", effect="allow")
    second = GrantRule.objects.create(grant=grant, expression="args.to == 'bob'", effect="allow")
    admin_post(alice, grant_url(grant), **{"rules-1-DELETE": "on"})
    assert list(grant.rules.values_list("pk", flat=True)) == [first.pk]
    assert not ConfigChange.objects.exists()

    admin_post(alice, grant_url(grant), **{"rules-0-DELETE": "on"})
    assert list(grant.rules.values_list("pk", flat=True)) == [first.pk]
    assert "the last allow rule removed" in pending().summary
    assert not GrantRule.objects.filter(pk=second.pk).exists()


def test_both_allow_rules_removed_in_one_save_wait(make_task, alice):
    _task, grant, _first = deny_rule_task(make_task, "args.amount < 50", effect="allow")
    GrantRule.objects.create(grant=grant, expression="args.to == 'bob'", effect="allow")
    admin_post(alice, grant_url(grant), **{"rules-0-DELETE": "on", "rules-1-DELETE": "on"})
    assert grant.rules.count() == 2
    assert pending().summary.count("the last allow rule removed") == 2


def test_a_rule_made_stricter_or_described_applies_at_once(make_task, alice):
    _task, grant, rule = deny_rule_task(make_task, effect="approve")
    admin_post(alice, grant_url(grant), **{"rules-0-effect": "deny"})
    admin_post(alice, grant_url(grant), **{"rules-0-description": "big payments"})
    rule.refresh_from_db()
    assert (rule.effect, rule.description) == ("deny", "big payments")
    assert not ConfigChange.objects.exists()


# Narrowing, and a save that does both -------------------------------------------------


def test_narrowing_applies_at_once_and_is_recorded_with_before_and_after(make_task, alice):
    task = make_task([], tools=["test_pay"])
    response = admin_post(
        alice, task_url(task), four_eyes=True, confidence_threshold="0.9", max_steps="10"
    )
    assert not any("waits" in m for m in page_messages(response))
    task.refresh_from_db()
    assert (task.four_eyes, task.confidence_threshold, task.max_steps) == (True, 0.9, 10)
    [event] = trail(task_trail_uuid(task))
    assert (event.kind, event.actor) == ("config.changed", "user:alice")
    assert {
        change["field"]: (change["before"], change["after"]) for change in event.payload["changes"]
    } == {"four_eyes": (False, True), "confidence_threshold": (0.7, 0.9), "max_steps": (30, 10)}
    assert chain_verify(task_trail_uuid(task)).intact


def test_one_save_applies_what_narrows_and_holds_what_widens(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    response = admin_post(alice, task_url(task), four_eyes=False, max_steps="10")
    task.refresh_from_db()
    assert (task.four_eyes, task.max_steps) == (True, 10)
    [warning] = [m for m in page_messages(response) if "waits" in m]
    assert "Max steps" not in warning
    assert pending().operations[0]["field"] == "four_eyes"


def test_a_grant_deleted_in_the_admin_is_recorded(make_task, alice):
    task = make_task([], tools=["test_pay"])
    grant = ToolGrant.objects.get(task=task)
    GrantRule.objects.create(grant=grant, expression="args.amount > 1", effect="deny")
    url = reverse("admin:tasks_toolgrant_delete", args=[grant.pk])
    alice.post(url, {"post": "yes"})
    assert not ToolGrant.objects.filter(pk=grant.pk).exists()
    [event] = trail(task_trail_uuid(task))
    assert event.payload["summary"] == ["remove the grant of test_pay and its 1 rule(s)"]
    assert task.versions.order_by("-number").first().definition["tools"] == []


# Going around the gate ----------------------------------------------------------------


def test_a_grant_s_tool_cannot_be_swapped_in_place(make_task, alice):
    task = make_task([], tools=["test_send"])
    echo = Tool.objects.get(name="test_echo")
    response = admin_post(alice, task_url(task), **{"grants-0-tool": str(echo.pk)})
    assert response.context["inline_admin_formsets"][0].formset.forms[0].errors["tool"] == [
        "A grant's tool cannot be changed: remove this grant and grant the other tool in a new row."
    ]
    assert list(task.grants.values_list("tool__name", flat=True)) == ["test_send"]
    assert not LineageEvent.objects.filter(run_uuid=task_trail_uuid(task)).exists()


def test_a_grant_cannot_be_moved_to_another_task(make_task, alice):
    task, other = make_task([], tools=["test_send"]), make_task([], autonomy_level=3)
    grant = ToolGrant.objects.get(task=task)
    admin_post(alice, grant_url(grant), task=str(other.pk))
    grant.refresh_from_db()
    assert grant.task == task


def test_a_pending_change_cannot_be_edited_or_deleted_in_the_admin(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    url = reverse("admin:tasks_configchange_change", args=[change.pk])
    assert alice.post(url, {"operations": "[]", "status": "applied"}).status_code == 403
    delete = reverse("admin:tasks_configchange_delete", args=[change.pk])
    assert alice.post(delete, {"post": "yes"}).status_code == 403
    change.refresh_from_db()
    assert change.status == "pending" and change.operations[0]["after"] is False


def test_the_admin_action_confirms_as_the_second_person_only(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    url = reverse("admin:tasks_configchange_changelist")
    data = {"action": "confirm_selected", "_selected_action": [str(change.pk)]}
    response = alice.post(url, data, follow=True)
    assert any("a second person must confirm" in m for m in page_messages(response))
    assert Task.objects.get(pk=task.pk).four_eyes is True
    bob.post(url, data)
    assert Task.objects.get(pk=task.pk).four_eyes is False


def test_a_change_that_no_longer_applies_is_refused_with_the_reason(make_task, alice, bob):
    task = make_task([], confidence_threshold=0.7)
    admin_post(alice, task_url(task), confidence_threshold="0.3")
    change = pending()
    Task.objects.filter(pk=task.pk).update(confidence_threshold=0.8)  # some other path
    response = decide(bob, change, "confirm")
    assert (
        "Not decided: it no longer applies: Confidence threshold is now 0.8, not 0.7 as when "
        "it was asked. Reject it, and ask again from the object as it is now."
    ) in page_messages(response)
    assert Task.objects.get(pk=task.pk).confidence_threshold == 0.8
    change.refresh_from_db()
    assert change.status == "pending"


def test_a_later_change_to_the_same_field_supersedes_the_pending_one(make_task, alice, bob):
    task = make_task([], confidence_threshold=0.7)
    admin_post(alice, task_url(task), confidence_threshold="0.3")
    change = pending()
    admin_post(bob, task_url(task), confidence_threshold="0.9")  # narrows: at once
    change.refresh_from_db()
    assert change.status == "superseded"
    assert change.reason.startswith("Confidence threshold is now 0.9")
    response = decide(bob, change, "confirm")
    assert "Not decided: this change was already superseded." in page_messages(response)
    assert Task.objects.get(pk=task.pk).confidence_threshold == 0.9


# Who may decide -----------------------------------------------------------------------


def test_an_outsider_cannot_decide(make_task, alice, oscar):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    assert decide(oscar, change, "confirm").status_code == 403
    assert decide(oscar, change, "reject").status_code == 403
    page = oscar.get(reverse("tasks:config_change", args=[change.pk]))
    assert "Deciding it takes tasks.change_task." in page.content.decode()
    assert pending() == change


def test_confirming_a_grant_takes_the_right_to_add_grants(make_task, alice):
    task = make_task([], autonomy_level=2)
    echo = Tool.objects.get(name="test_echo")
    data = form_data(alice.get(task_url(task)))
    data.update({"grants-0-tool": str(echo.pk), "grants-0-task": str(task.pk)})
    alice.post(task_url(task), data)
    carol = logged_in(editor("carol", ["change_task", "view_task"]))
    assert decide(carol, pending(), "confirm").status_code == 403
    assert not task.grants.exists()


def test_the_requester_may_withdraw_and_the_trail_says_so(make_task, alice):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    page = alice.get(reverse("tasks:config_change", args=[change.pk])).content.decode()
    assert "Saved, waits for a second person" in page
    assert "Confirm and apply" not in page and "Withdraw" in page
    decide(alice, change, "reject", reason="asked by mistake")
    change.refresh_from_db()
    assert change.status == "rejected"
    last = trail(task_trail_uuid(task))[-1]
    assert (last.kind, last.actor, last.payload["reason"]) == (
        "config.rejected",
        "user:alice",
        "asked by mistake",
    )


def test_a_bad_decision_changes_nothing(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    response = decide(bob, change, "apply")
    assert response.status_code == 400
    assert "Not decided: decision: choose confirm or reject." in page_messages(response)
    response = decide(bob, change, "reject", reason="a\x00b")
    assert response.status_code == 400
    assert page_messages(response) == [
        "Not decided: reason: a NUL character cannot be stored or searched for; remove it."
    ]
    response = decide(bob, change, "reject", reason="x" * 2001)
    assert page_messages(response) == ["Not decided: reason: longer than 2,000 characters (2,001)."]
    missing = bob.post(reverse("tasks:config_change_decide", args=[change.pk + 100]))
    assert missing.status_code == 404
    huge = bob.post(reverse("tasks:config_change_decide", args=[2**63]))
    assert huge.status_code == 400
    assert bob.get(reverse("tasks:config_change", args=[2**63])).status_code == 400
    assert bob.get(reverse("tasks:config_changes"), {"tool": "a\x00"}).status_code == 400
    assert bob.get(reverse("tasks:tool_trail", args=["a\x00"])).status_code == 400
    assert pending() == change


# Where people see it -------------------------------------------------------------------


def test_the_task_page_and_the_waiting_list_show_the_change(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    detail = bob.get(reverse("tasks:detail", args=[task.slug])).content.decode()
    assert reverse("tasks:changes", args=[task.slug]) in detail
    panel = bob.get(reverse("tasks:changes", args=[task.slug]), headers={"HX-Request": "true"})
    text = panel.content.decode()
    assert 'id="config-changes"' in text and "<html" not in text
    assert "Four eyes: on -&gt; off" in text and "waits for a second person" in text
    waiting = bob.get(reverse("tasks:config_changes")).content.decode()
    assert f"#{change.pk}" in waiting
    page = bob.get(reverse("tasks:config_change", args=[change.pk])).content.decode()
    assert "Confirm and apply" in page
    admin_list = bob.get(reverse("admin:tasks_configchange_changelist")).content.decode()
    assert f"task {task.slug}" in admin_list


def test_every_change_is_in_the_trail_and_the_trail_verifies(make_task, alice, bob):
    task = make_task([], tools=["test_pay"], four_eyes=True)
    grant = ToolGrant.objects.get(task=task)
    admin_post(alice, task_url(task), instructions="Pay only known payees.")
    rule_rows(alice, grant, [("deny", "args.to == 'mallory'")])
    admin_post(alice, task_url(task), four_eyes=False)
    decide(bob, pending(), "confirm")
    admin_post(bob, grant_url(grant), **{"rules-0-DELETE": "on"})
    decide(alice, pending(), "reject", reason="keep the rule")
    events = trail(task_trail_uuid(task))
    assert [(event.kind, event.actor) for event in events] == [
        ("config.changed", "user:alice"),
        ("config.changed", "user:alice"),
        ("config.requested", "user:alice"),
        ("config.confirmed", "user:bob"),
        ("config.requested", "user:bob"),
        ("config.rejected", "user:alice"),
    ]
    assert events[0].payload["changes"][0] == {
        "op": "set",
        "field": "instructions",
        "before": "",
        "after": "Pay only known payees.",
        "why": "",
    }
    assert all(event.at for event in events)
    assert chain_verify(task_trail_uuid(task)).intact


def test_a_task_and_a_tool_made_and_deleted_in_the_admin_are_recorded(alice):
    url = reverse("admin:tasks_tool_add")
    data = {
        "name": "items_list",
        "kind": "http",
        "description": "List items.",
        "input_schema": json.dumps({"type": "object"}),
        "side_effect": "read",
        "idempotency": "none",
        "retry_max_attempts": "3",
        "retry_backoff_seconds": "0.5",
        "timeout_seconds": "5",
        "available": "on",
        "config": json.dumps(
            {
                "method": "GET",
                "url": "https://api.example.com/items",
                "allowed_hosts": ["api.example.com"],
            }
        ),
    }
    response = alice.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    tool = Tool.objects.get(name="items_list")
    alice.post(reverse("admin:tasks_tool_delete", args=[tool.pk]), {"post": "yes"})
    assert not Tool.objects.filter(name="items_list").exists()
    events = trail(tool_trail_uuid(tool))
    assert [event.kind for event in events] == ["config.created", "config.deleted"]
    created = {change["field"]: change["after"] for change in events[0].payload["changes"]}
    assert created["side_effect"] == "read"
    assert chain_verify(tool_trail_uuid(tool)).intact


def test_a_tool_may_not_take_a_name_a_task_version_pins(make_task, alice):
    """Runs find their tools by the names their version pins: a tool renamed or made
    under such a name would be called by those runs, granted by no one."""
    from tasks.services import task_version_current

    task = make_task([], tools=["test_echo"])
    task_version_current(task=task)
    tool = http_tool(name="items_list", side_effect="irreversible")
    url = reverse("admin:tasks_tool_change", args=[tool.pk])
    response = admin_post(alice, url, name="test_echo")
    assert response.context["adminform"].form.errors["name"] == [
        f"{task.slug} v1 names a tool 'test_echo', and its runs would call this one: "
        "choose another name"
    ]
    tool.refresh_from_db()
    assert tool.name == "items_list"


def test_a_group_that_approves_for_a_task_cannot_be_deleted(make_task):
    from django.db.models import ProtectedError

    group = Group.objects.create(name="finance")
    make_task([], approver_group=group)
    with pytest.raises(ProtectedError):
        group.delete()


def test_a_grant_waiting_while_its_tool_was_lowered_is_refused(make_task, alice, bob):
    task = make_task([], autonomy_level=3)
    tool = http_tool()
    data = form_data(alice.get(task_url(task)))
    data.update({"grants-0-tool": str(tool.pk), "grants-0-task": str(task.pk)})
    alice.post(task_url(task), data)
    change = pending()
    Tool.objects.filter(pk=tool.pk).update(always_approve=True)
    response = decide(bob, change, "confirm")
    assert (
        "Not decided: it no longer applies: the tool items_create's side effect or 'always "
        "approve' changed. Reject it, and ask again from the object as it is now."
    ) in page_messages(response)
    assert not task.grants.exists()


def test_a_write_by_the_deployment_s_code_is_recorded_in_the_tool_s_trail(make_task, bob):
    from tasks.governance import tool_changes_record, tool_snapshot

    tool = http_tool()
    before = tool_snapshot(tool)
    Tool.objects.filter(pk=tool.pk).update(description="Create an item, idempotently.")
    tool.refresh_from_db()
    tool_changes_record(tool=tool, before=before, actor="command:mcp_import")
    tool_changes_record(tool=tool, before=tool_snapshot(tool), actor="command:mcp_import")
    [event] = trail(tool_trail_uuid(tool))
    assert (event.kind, event.actor) == ("config.changed", "command:mcp_import")
    assert event.payload["summary"] == [
        "Description: Create an item. -> Create an item, idempotently."
    ]
    response = bob.get(reverse("tasks:tool_trail", args=[tool.name]))
    assert response.status_code == 303
    assert response["Location"] == reverse("runs:lineage:run", args=[tool_trail_uuid(tool)])


def test_a_new_task_is_made_at_once_and_a_read_tool_granted_with_it_waits(make_task, alice):
    make_task([])  # the code tools are synced
    url = reverse("admin:tasks_task_add")
    data = form_data(alice.get(url))
    echo, send = Tool.objects.get(name="test_echo"), Tool.objects.get(name="test_send")
    data.update(
        {
            "name": "Summarise",
            "slug": "summarise",
            "objective_template": "Summarise the day.",
            "model": "scripted:invoice-reconcile",
            "grants-TOTAL_FORMS": "2",
            "grants-0-tool": str(echo.pk),
            "grants-1-tool": str(send.pk),
        }
    )
    response = alice.post(url, data, follow=True)
    assert any("grant test_echo (granted at 1 · Supervised" in m for m in page_messages(response))
    task = Task.objects.get(slug="summarise")
    assert list(task.grants.values_list("tool__name", flat=True)) == ["test_send"]
    kinds = [event.kind for event in trail(task_trail_uuid(task))]
    assert kinds == ["config.created", "config.changed", "config.requested"]


def test_a_change_whose_requester_is_gone_cannot_be_confirmed(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    User.objects.filter(username="alice").delete()
    response = decide(bob, change, "confirm")
    assert any("has no account any more" in m for m in page_messages(response))
    assert Task.objects.get(pk=task.pk).four_eyes is True


def test_the_admin_page_of_a_task_says_what_of_it_waits(make_task, alice, bob):
    task = make_task([], four_eyes=True)
    admin_post(alice, task_url(task), four_eyes=False)
    change = pending()
    page = bob.get(task_url(task))
    assert page_messages(page) == [
        f'<a href="/tasks/changes/{change.pk}/">Change #{change.pk}</a> waits for a second '
        "person: Four eyes: on -&gt; off (four eyes turned off: whoever started a run may "
        "approve its calls)"
    ]
    assert bob.get(reverse("admin:tasks_task_change", args=["²"])).status_code == 302


@pytest.mark.parametrize(
    ("before", "after", "widens"),
    [
        (("deny", "args.a > 1"), ("approve", "args.a > 1"), True),  # a person may pass it
        (("approve", "args.a > 1"), ("deny", "args.a > 1"), False),
        (("allow", "args.a > 1"), ("deny", "args.a > 1"), True),  # may leave no allow rule
        (("deny", "args.a > 1"), ("deny", "args.a > 2"), True),  # cannot be proved narrower
        (("deny", "args.a > 1"), ("deny", "args.a > 0"), True),  # nor this one, looking
        (("allow", "args.a > 1"), ("allow", "args.a > 1"), False),
    ],
)
def test_a_rule_edit_widens_unless_it_provably_narrows(before, after, widens):
    from tasks.governance import rule_op_widening

    def plain(rule):
        return {"position": 0, "effect": rule[0], "expression": rule[1], "description": ""}

    op = {"op": "rule_change", "before": plain(before), "after": plain(after)}
    assert bool(rule_op_widening(op, untouched_allows=1)) is widens


def test_a_tool_granted_while_a_dial_raise_waits_withdraws_the_raise(make_task, alice, bob):
    """Otherwise: ask to raise the dial with harmless tools, grant a reversible tool at
    Supervised (where it waits for a person, so at once), and the second person's
    confirmation of the dial would let it run unattended at Guarded."""
    from tasks.autonomy import autonomy_request
    from tasks.models import AutonomyChange

    task = make_task([], tools=["test_echo"])
    alice_user = User.objects.get(username="alice")
    raise_request = autonomy_request(task=task, to_level=2, user=alice_user, reason="clean")
    note = Tool.objects.get(name="test_note")
    data = form_data(alice.get(task_url(task)))
    data.update({"grants-1-tool": str(note.pk), "grants-1-task": str(task.pk)})
    alice.post(task_url(task), data)
    assert sorted(task.grants.values_list("tool__name", flat=True)) == ["test_echo", "test_note"]
    raise_request.refresh_from_db()
    assert raise_request.status == AutonomyChange.Status.WITHDRAWN
    changed = [e for e in trail(task_trail_uuid(task)) if e.kind == "config.changed"][-1]
    assert changed.payload["dial_requests_withdrawn"] == [raise_request.pk]
    response = bob.post(
        reverse("tasks:autonomy_decide", args=[raise_request.pk]), {"decision": "confirm"}
    )
    assert Task.objects.get(pk=task.pk).autonomy_level == 1
    assert response.status_code in (303, 400)
