"""The admin refuses, when a task, a tool or a grant's rules are saved, what could only
fail later when a run starts: each error names the field and what is wrong, and
nothing is saved."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tasks.models import AutonomyLevel, GrantRule, Task, Tool, ToolGrant
from tasks.services import RunStartError, run_start

pytestmark = pytest.mark.django_db


def admin_form_data(page: Any) -> dict[str, Any]:
    """The admin page's form as it was filled in: the object's fields, and every inline's
    management form and rows, as a browser would post them back."""
    forms = [page.context["adminform"].form]
    for inline in page.context["inline_admin_formsets"]:
        forms += [inline.formset.management_form, *inline.formset.forms]
    data = {}
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is not None:
                data[form[name].html_name] = value
    return data


def task_post(client: Client, task: Task, **changes: Any) -> Any:
    url = reverse("admin:tasks_task_change", args=[task.pk])
    data = admin_form_data(client.get(url))
    data.update(changes)
    return client.post(url, data)


def errors_on(response: Any, field: str) -> list[str]:
    assert response.status_code == 200, "the form was accepted"
    return list(response.context["adminform"].form.errors.get(field, []))


def as_json(value: Any) -> str:
    return json.dumps(value)


# The task's input schema ------------------------------------------------------------


def test_a_task_input_schema_that_is_not_json_schema_is_refused_and_nothing_saved(
    demo_task, admin_client
):
    before = demo_task.input_schema
    response = task_post(admin_client, demo_task, input_schema=as_json({"type": "objekt"}))
    assert errors_on(response, "input_schema") == [
        'The input schema is not a valid JSON Schema (draft 2020-12): at type: "objekt" is '
        "not a JSON Schema type (use array, boolean, integer, null, number, object, string)"
    ]
    demo_task.refresh_from_db()
    assert demo_task.input_schema == before
    assert demo_task.versions.count() == 1


def test_a_task_input_schema_for_something_other_than_an_object_is_refused(demo_task, admin_client):
    response = task_post(admin_client, demo_task, input_schema=as_json({"type": "string"}))
    assert errors_on(response, "input_schema") == [
        'The input schema must have type "object", not "string": what it checks is always '
        "a JSON object"
    ]
    demo_task.refresh_from_db()
    assert demo_task.input_schema["type"] == "object"


def test_a_task_schema_saved_unchecked_is_named_as_the_task_s_when_a_run_starts(
    make_task, operator
):
    # Saved before the admin checked it, or from a shell: the run says which schema.
    task = make_task([], input_schema={"type": "objekt"})
    with pytest.raises(RunStartError) as error:
        run_start(task=task, run_input={}, user=operator)
    assert str(error.value) == (
        "the input does not match the task's schema: the schema the input must match is "
        'itself invalid (at type: "objekt" is not a JSON Schema type (use array, boolean, '
        "integer, null, number, object, string))"
    )
    assert "tool" not in str(error.value)


# The example input ------------------------------------------------------------------


def test_an_example_input_that_breaks_the_input_schema_is_refused_and_nothing_saved(
    demo_task, admin_client
):
    response = task_post(admin_client, demo_task, example_input=as_json({"batch": "November"}))
    assert errors_on(response, "example_input") == [
        "The example input does not match the input schema: batch: 'November' does not "
        "match '^[0-9]{4}-[0-9]{2}$'"
    ]
    demo_task.refresh_from_db()
    assert demo_task.example_input == {"batch": "2026-11"}

    good = task_post(admin_client, demo_task, example_input=as_json({"batch": "2026-12"}))
    assert good.status_code == 302
    demo_task.refresh_from_db()
    assert demo_task.example_input == {"batch": "2026-12"}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ('{"batch": "2026-11", "n": NaN}', "NaN is not a JSON number"),
        ('{"batch": "2026-11", "n": 1e999}', "1e999 is too large for a JSON number"),
        ('{"batch": "2026-11", "batch": "2026-12"}', 'the key "batch" appears twice'),
    ],
)
def test_an_example_input_that_is_not_strict_json_is_refused_not_a_500(
    demo_task, admin_client, raw, why
):
    response = task_post(admin_client, demo_task, example_input=raw)
    assert response.status_code == 200
    assert why in response.content.decode().replace("&quot;", '"')
    demo_task.refresh_from_db()
    assert demo_task.example_input == {"batch": "2026-11"}


def test_an_example_input_without_a_field_the_objective_uses_is_refused(make_task, admin_client):
    task = make_task([], objective_template="Add up {numbers}.")
    response = task_post(admin_client, task, example_input=as_json({"figures": [1, 2]}))
    assert errors_on(response, "example_input") == [
        "The example input has no field numbers, which the objective template uses as {numbers}"
    ]
    task.refresh_from_db()
    assert task.example_input == {}


def test_an_example_input_that_is_not_an_object_is_refused(demo_task, admin_client):
    response = task_post(admin_client, demo_task, example_input=as_json(["2026-11"]))
    assert errors_on(response, "example_input") == [
        'The example input must be a JSON object, like {"batch": "2026-11"}, not ["2026-11"]'
    ]


# The model --------------------------------------------------------------------------


def test_a_scripted_model_that_is_not_installed_is_refused_and_nothing_saved(
    demo_task, admin_client
):
    response = task_post(admin_client, demo_task, model="scripted:nope")
    [error] = errors_on(response, "model")
    assert error.startswith(
        "The model scripted:nope cannot run: no scripted model named 'nope' is installed "
        "(installed: "
    )
    assert "invoice-reconcile" in error
    demo_task.refresh_from_db()
    assert demo_task.model == "scripted:invoice-reconcile"

    # A server may serve any name: only a scripted model can be checked here.
    assert task_post(admin_client, demo_task, model="my-local-llama").status_code == 302
    demo_task.refresh_from_db()
    assert demo_task.model == "my-local-llama"


# The objective template -------------------------------------------------------------


def test_an_objective_template_with_an_unclosed_brace_is_refused_and_nothing_saved(
    demo_task, admin_client
):
    before = demo_task.objective_template
    response = task_post(admin_client, demo_task, objective_template="Use {batch")
    assert errors_on(response, "objective_template") == [
        "The objective template has a { at line 1, column 5 that is never closed: a "
        "placeholder is a field name in braces, like {batch}"
    ]
    response = task_post(admin_client, demo_task, objective_template="Use batch}.")
    assert errors_on(response, "objective_template") == [
        "The objective template has a } at line 1, column 10 that closes no {: a "
        "placeholder is a field name in braces, like {batch}"
    ]
    demo_task.refresh_from_db()
    assert demo_task.objective_template == before

    # Braces that pair up and hold no placeholder are text, as the objective renders them.
    template = 'Reconcile {batch}; answer as {"mismatches": [...]}.'
    assert task_post(admin_client, demo_task, objective_template=template).status_code == 302
    demo_task.refresh_from_db()
    assert demo_task.objective_template == template


def test_a_placeholder_that_is_no_property_of_the_input_schema_is_refused(demo_task, admin_client):
    response = task_post(admin_client, demo_task, objective_template="Reconcile {month}.")
    assert errors_on(response, "objective_template") == [
        "The objective template uses {month}, but month is not a property of the input "
        "schema (its properties: batch)"
    ]
    demo_task.refresh_from_db()
    assert "{batch}" in demo_task.objective_template


def test_a_placeholder_is_allowed_where_the_schema_lets_other_fields_come(make_task, admin_client):
    schema = {"type": "object", "properties": {"batch": {"type": "string"}}}
    task = make_task([], input_schema=schema, example_input={"batch": "b", "customer": "c"})
    response = task_post(admin_client, task, objective_template="Do {batch} for {customer}.")
    assert response.status_code == 302, errors_on(response, "objective_template")
    task.refresh_from_db()
    assert task.objective_template == "Do {batch} for {customer}."


# The autonomy level of a new task ---------------------------------------------------


def new_task_data(client: Client, **changes: Any) -> dict[str, Any]:
    data = admin_form_data(client.get(reverse("admin:tasks_task_add")))
    data.update(
        name="Summarise",
        slug="summarise",
        objective_template="Summarise the day.",
        model="scripted:invoice-reconcile",
        **changes,
    )
    return data


def test_a_new_task_above_supervised_is_refused_and_pointed_to_the_dial(admin_client):
    url = reverse("admin:tasks_task_add")
    response = admin_client.post(
        url, new_task_data(admin_client, autonomy_level=AutonomyLevel.AUTONOMOUS)
    )
    assert errors_on(response, "autonomy_level") == [
        "A new task cannot start at 3 · Autonomous: the autonomy level of a new task is at "
        "most 1 · Supervised. Save the task, then raise it with the autonomy dial on the "
        "task's page, where a second person confirms it."
    ]
    assert not Task.objects.filter(slug="summarise").exists()

    response = admin_client.post(url, new_task_data(admin_client, autonomy_level=0))
    assert response.status_code == 302
    assert Task.objects.get(slug="summarise").autonomy_level == AutonomyLevel.SHADOW


# A tool's input schema --------------------------------------------------------------


def http_tool_data(**changes: Any) -> dict[str, Any]:
    data = {
        "name": "items_create",
        "kind": "http",
        "description": "Create an item.",
        "input_schema": as_json({"type": "object", "properties": {"id": {"type": "integer"}}}),
        "side_effect": "reversible",
        "idempotency": "none",
        "retry_max_attempts": "3",
        "retry_backoff_seconds": "0.5",
        "timeout_seconds": "5",
        "available": "on",
        "config": as_json(
            {
                "method": "POST",
                "url": "https://api.example.com/items",
                "allowed_hosts": ["api.example.com"],
            }
        ),
    }
    data.update(changes)
    return data


def test_a_tool_input_schema_that_is_not_json_schema_is_refused_and_nothing_saved(
    admin_client,
):
    bad = as_json({"type": "object", "properties": {"id": {"type": "integr"}}})
    response = admin_client.post("/admin/tasks/tool/add/", http_tool_data(input_schema=bad))
    assert errors_on(response, "input_schema") == [
        "The input schema is not a valid JSON Schema (draft 2020-12): at properties/id/type: "
        '"integr" is not a JSON Schema type (use array, boolean, integer, null, number, '
        "object, string)"
    ]
    assert not Tool.objects.filter(name="items_create").exists()

    assert admin_client.post("/admin/tasks/tool/add/", http_tool_data()).status_code == 302
    assert Tool.objects.filter(name="items_create").exists()


def test_a_tool_input_schema_that_is_not_an_object_is_refused(admin_client):
    response = admin_client.post("/admin/tasks/tool/add/", http_tool_data(input_schema="[1]"))
    assert errors_on(response, "input_schema") == [
        'The input schema must be a JSON object, like {"type": "object"}, not [1]'
    ]
    assert not Tool.objects.filter(name="items_create").exists()


def test_a_tool_input_schema_that_declares_the_confidence_argument_is_refused(admin_client):
    schema = as_json({"type": "object", "properties": {"_confidence": {"type": "number"}}})
    response = admin_client.post("/admin/tasks/tool/add/", http_tool_data(input_schema=schema))
    assert errors_on(response, "input_schema") == [
        "The input schema may not have a property named '_confidence': the engine adds it "
        "to every tool for the agent's confidence in the call."
    ]
    assert not Tool.objects.filter(name="items_create").exists()


# A grant's rules --------------------------------------------------------------------


def rules_post(client: Client, grant: ToolGrant, rows: list[tuple[str, str, str]]) -> Any:
    url = reverse("admin:tasks_toolgrant_change", args=[grant.pk])
    data = admin_form_data(client.get(url))
    for index, (position, effect, expression) in enumerate(rows):
        data.update(
            {
                f"rules-{index}-position": position,
                f"rules-{index}-effect": effect,
                f"rules-{index}-expression": expression,
                f"rules-{index}-description": "",
            }
        )
    data["rules-TOTAL_FORMS"] = str(len(rows))
    return client.post(url, data)


def rule_errors(response: Any) -> list[list[str]]:
    assert response.status_code == 200, "the form was accepted"
    [formset] = response.context["inline_admin_formsets"]
    return [list(form.errors.get("expression", [])) for form in formset.formset.forms]


def test_a_rule_calling_an_unknown_function_is_refused_and_nothing_saved(make_task, admin_client):
    grant = ToolGrant.objects.get(task=make_task([], tools=["test_pay"]))
    response = rules_post(admin_client, grant, [("0", "deny", "foo(args)")])
    [[error]] = rule_errors(response)
    assert error.startswith(
        "Expression of rule 1: foo() at line 1, column 1 is not a function CEL has here (it "
        "has all, bool, bytes, contains,"
    )
    assert GrantRule.objects.count() == 0

    rows = [("0", "deny", "has(args.to) && !args.to.endsWith('@example.com')")]
    rows.append(("1", "approve", "type(args.amount) == int && args.items.all(i, i > 0)"))
    assert rules_post(admin_client, grant, rows).status_code == 302
    assert GrantRule.objects.count() == 2


def test_a_rule_naming_a_bare_field_is_refused_with_the_args_it_should_use(make_task, admin_client):
    grant = ToolGrant.objects.get(task=make_task([], tools=["test_pay"]))
    response = rules_post(admin_client, grant, [("0", "approve", "amount > 1000")])
    assert rule_errors(response) == [
        [
            "Expression of rule 1: amount at line 1, column 1 is not a variable: the call's "
            "arguments are args, as in args.amount"
        ]
    ]
    assert GrantRule.objects.count() == 0


def test_a_rule_syntax_error_names_the_rule_and_where(make_task, admin_client):
    grant = ToolGrant.objects.get(task=make_task([], tools=["test_pay"]))
    rows = [
        ("2", "deny", 'args.to.endsWith("@example.com")'),
        ("1", "approve", "args.amount > 1000"),
        ("3", "deny", "args.to.endsWith("),
    ]
    response = rules_post(admin_client, grant, rows)
    assert rule_errors(response) == [
        [],
        [],
        [
            "Expression of rule 3: syntax error at line 1, column 18: the expression ends "
            "before it is complete, after `args.to.endsWith(`"
        ],
    ]
    assert GrantRule.objects.count() == 0


# The tool boundary (issue 11) --------------------------------------------------------


def test_a_tool_naming_one_of_agentops_own_secrets_is_refused_and_nothing_saved(admin_client):
    config = {
        "method": "GET",
        "url": "https://api.example.com/items",
        "allowed_hosts": ["api.example.com"],
        "headers": {"Authorization": "Bearer {secret:SECRET_KEY}", "X-Db": "{secret:PLAIN_ENV}"},
    }
    response = admin_client.post(
        "/admin/tasks/tool/add/", http_tool_data(config=as_json(config), side_effect="read")
    )
    errors = errors_on(response, "config")
    assert any("the secret SECRET_KEY is one of agentops' own settings" in e for e in errors)
    assert any("the secret PLAIN_ENV is not one a tool may read" in e for e in errors)
    assert not Tool.objects.filter(name="items_create").exists()


def test_an_mcp_tool_running_a_shell_is_refused_and_nothing_saved(admin_client):
    config = {"server": {"transport": "stdio", "command": ["sh", "-c", "id"]}, "tool": "x"}
    response = admin_client.post(
        "/admin/tasks/tool/add/", http_tool_data(kind="mcp", config=as_json(config))
    )
    assert errors_on(response, "config") == [
        "server: command: `sh -c id` is not a command MCP servers may run on this "
        "deployment's workers: its start must be one of AGENTOPS_MCP_COMMANDS"
    ]
    assert not Tool.objects.filter(name="items_create").exists()


def test_a_tool_schema_that_refers_to_a_file_is_refused_and_nothing_saved(admin_client):
    schema = {"type": "object", "properties": {"id": {"$ref": "file:///etc/passwd"}}}
    response = admin_client.post(
        "/admin/tasks/tool/add/", http_tool_data(input_schema=as_json(schema))
    )
    assert errors_on(response, "input_schema") == [
        "The input schema refers to 'file:///etc/passwd', outside itself: a $ref must point "
        "inside the schema (start with #), since no schema is ever fetched from a file or a URL"
    ]
    assert not Tool.objects.filter(name="items_create").exists()


def test_a_post_tool_declared_read_is_refused_and_nothing_saved(admin_client):
    response = admin_client.post("/admin/tasks/tool/add/", http_tool_data(side_effect="read"))
    assert errors_on(response, "side_effect") == [
        "A POST request can change what it is sent to, so the tool cannot be read-only (only "
        "GET or HEAD can be): declare it reversible or irreversible."
    ]
    assert not Tool.objects.filter(name="items_create").exists()
