"""Grant rules in CEL, and secrets kept out of the record."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from agentops.runtime.engine import Outcome
from agentops.runtime.rules import RuleError, RuleSpec, RuleVerdict, rule_check, rules_evaluate
from approvals.models import ApprovalKind
from lineage.models import LineageEvent
from tasks.models import GrantRule, RunStatus, StepStatus, Tool, ToolGrant
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def paying_task(make_task, rules, *, calls):
    task = make_task(
        [{"calls": [("test_pay", call)]} for call in calls] + [{"content": "done"}],
        tools=["test_pay"],
        autonomy_level=3,
        self_check=False,
    )
    grant = ToolGrant.objects.get(task=task)
    for position, (effect, expression) in enumerate(rules):
        GrantRule.objects.create(
            grant=grant, position=position, effect=effect, expression=expression
        )
    return task


def test_a_deny_rule_refuses_the_call_and_names_the_rule(make_task, operator):
    task = paying_task(
        make_task,
        [("deny", '!args.to.endsWith("@example.com")')],
        calls=[{"amount": 5, "to": "eve@evil.test"}, {"amount": 5, "to": "bob@example.com"}],
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    first, second = run.steps.filter(kind="tool").order_by("number")
    assert first.status == StepStatus.REFUSED
    assert first.error == 'denied by rule 1 `!args.to.endsWith("@example.com")`'
    assert second.status == StepStatus.SUCCEEDED
    assert EFFECTS == {"pay:bob@example.com:5": 1}


def test_an_approve_rule_holds_a_call_an_autonomous_task_would_make(make_task, operator):
    task = paying_task(
        make_task, [("approve", "args.amount > 1000")], calls=[{"amount": 5000, "to": "a@b.c"}]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval = run.approvals.get()
    assert approval.kind == ApprovalKind.ACTION
    assert approval.gate == "rule 1 `args.amount > 1000` requires a person's approval"
    assert EFFECTS == {}


def test_allow_rules_make_a_list_a_call_must_be_on(make_task, operator):
    task = paying_task(
        make_task,
        [("allow", "args.amount <= 100")],
        calls=[{"amount": 50, "to": "a@b.c"}, {"amount": 500, "to": "a@b.c"}],
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    small, large = run.steps.filter(kind="tool").order_by("number")
    assert small.status == StepStatus.SUCCEEDED
    assert large.status == StepStatus.REFUSED
    assert large.error.startswith("no allow rule matched the arguments")


def test_a_rule_that_cannot_be_evaluated_denies_rather_than_allows(make_task, operator):
    task = paying_task(
        make_task, [("deny", "args.currency != 'EUR'")], calls=[{"amount": 1, "to": "a@b.c"}]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.steps.get(kind="tool").status == StepStatus.REFUSED
    assert EFFECTS == {}


def test_a_denial_by_a_rule_that_cannot_be_evaluated_says_why(make_task, operator):
    task = paying_task(
        make_task, [("deny", "args.currency != 'EUR'")], calls=[{"amount": 1, "to": "a@b.c"}]
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.steps.get(kind="tool").error == (
        "denied by rule 1 `args.currency != 'EUR'`, as it could not be evaluated: "
        "no field 'currency'"
    )


def test_a_rule_calling_an_unknown_function_is_not_mistaken_for_an_ordinary_deny(
    make_task, operator
):
    # Saved without the check (from a shell, or before the check existed).
    task = paying_task(make_task, [("deny", "foo(args)")], calls=[{"amount": 1, "to": "a@b.c"}])
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.REFUSED
    assert step.error == (
        "denied by rule 1 `foo(args)`, as it could not be evaluated: no function named foo"
    )
    assert EFFECTS == {}


def test_approve_and_allow_rules_that_cannot_be_evaluated_say_why():
    arguments = {"amount": 5, "to": "a@b.c"}
    approve = rules_evaluate([RuleSpec(1, "args.limit < args.amount", "approve")], arguments)
    assert approve == RuleVerdict(
        "approve",
        "rule 1 `args.limit < args.amount` requires a person's approval, as it could not "
        "be evaluated: no field 'limit'",
    )
    allows = [RuleSpec(1, "args.amount", "allow", "small"), RuleSpec(2, "args.amount < 3", "allow")]
    assert rules_evaluate(allows, arguments) == RuleVerdict(
        "deny",
        "no allow rule matched the arguments (rule 1 `args.amount` (small), as it could not "
        "be evaluated: it gave int 5, not true or false; rule 2 `args.amount < 3`)",
    )


def test_a_rule_that_does_not_compile_is_refused_at_save_with_where(make_task):
    task = make_task([], tools=["test_pay"])
    rule = GrantRule(grant=ToolGrant.objects.get(task=task), effect="deny", expression="args.x >")
    with pytest.raises(ValidationError) as error:
        rule.full_clean()
    assert error.value.message_dict["expression"] == [
        "syntax error at line 1, column 9: the expression ends before it is complete, "
        "after `args.x >`"
    ]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "args.to.endswith('@example.com')",
            "endswith() at line 1, column 9 is not a function CEL has here "
            "(did you mean endsWith()?)",
        ),
        ("args.x >> 3", "syntax error at line 1, column 9: unexpected `>` after `args.x >`"),
        (
            "args.x = 3",
            "syntax error at line 1, column 8: `=` cannot stand here, after `args.x` "
            "(compare with ==)",
        ),
        (
            "args.to == 'a",
            "syntax error at line 1, column 12: a string opens after `args.to ==` and is "
            "never closed",
        ),
    ],
)
def test_a_rule_that_cannot_be_checked_is_refused_at_save_with_the_reason(expression, message):
    with pytest.raises(RuleError) as error:
        rule_check(expression)
    assert str(error.value) == message


def test_the_admin_shows_a_rule_compile_error_and_saves_nothing(make_task, admin_client):
    task = make_task([], tools=["test_pay"])
    grant = ToolGrant.objects.get(task=task)
    url = reverse("admin:tasks_toolgrant_change", args=[grant.pk])
    response = admin_client.post(
        url,
        {
            "task": task.pk,
            "tool": grant.tool.pk,
            "rules-TOTAL_FORMS": "1",
            "rules-INITIAL_FORMS": "0",
            "rules-0-position": "0",
            "rules-0-effect": "deny",
            "rules-0-expression": "args.amount >",
            "rules-0-description": "",
        },
    )
    assert response.status_code == 200
    assert (
        "Expression of rule 1: syntax error at line 1, column 14: the expression ends before "
        "it is complete, after `args.amount &gt;`"
    ) in response.content.decode()
    assert GrantRule.objects.count() == 0


def test_rules_are_pinned_in_the_task_version(make_task, operator):
    task = paying_task(
        make_task, [("approve", "args.amount > 10")], calls=[{"amount": 1, "to": "x"}]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run.task_version.definition["rules"] == {
        "test_pay": [{"expression": "args.amount > 10", "effect": "approve", "description": ""}]
    }


def test_a_secret_never_appears_in_a_step_or_the_trail(make_task, operator, monkeypatch):
    monkeypatch.setenv("TEST_API_TOKEN", "tok-7f3a9c")
    Tool.objects.filter(name="test_leaky").update(config={"token": "secret:TEST_API_TOKEN"})
    task = make_task(
        [{"calls": [("test_leaky", {"text": "hi"})]}, {"content": "done"}],
        tools=["test_leaky"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert run.status == RunStatus.SUCCEEDED
    step = run.steps.get(kind="tool")
    assert step.result == {"said": "hi: token is [secret:TEST_API_TOKEN]"}
    for payload in LineageEvent.objects.filter(run_uuid=run.pk).values_list("payload", flat=True):
        assert "tok-7f3a9c" not in str(payload)
