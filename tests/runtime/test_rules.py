"""Grant rules in CEL, and secrets kept out of the record."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from agentops.runtime.engine import Outcome
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


def test_a_rule_that_does_not_compile_is_refused_at_save(make_task):
    task = make_task([], tools=["test_pay"])
    rule = GrantRule(grant=ToolGrant.objects.get(task=task), effect="deny", expression="args.x >")
    with pytest.raises(ValidationError) as error:
        rule.full_clean()
    assert "does not compile" in str(error.value)


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
    assert "does not compile" in response.content.decode()
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
