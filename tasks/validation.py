"""Checks on a task's definition for the forms that save it: each returns the sentences
that say what is wrong (empty when nothing is), so a definition that could only fail
when a run starts is refused when it is saved instead."""

from __future__ import annotations

import json
from typing import Any

from agentops.runtime.models import ModelNotConfigured, client_for
from agentops.runtime.models.base import SCRIPTED_PREFIX
from agentops.runtime.tools.base import arguments_errors, schema_errors
from tasks.models import AutonomyLevel
from tasks.services import PLACEHOLDER


def input_schema_errors(schema: Any) -> list[str]:
    """The run's input is checked against this schema, so it must be a valid JSON Schema
    of a JSON object. Empty means any JSON object."""
    if schema in (None, {}):
        return []
    return schema_errors(schema, name="The input schema")


def schema_closed_properties(schema: Any) -> list[str] | None:
    """The only fields an input can have: the properties a schema lists when it allows no
    other (``additionalProperties`` or ``unevaluatedProperties`` false); None when other
    fields may come."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return None
    if schema.get("additionalProperties") is False or schema.get("unevaluatedProperties") is False:
        return list(schema["properties"])
    return None


def objective_template_errors(template: str, input_schema: Any) -> list[str]:
    """The template renders as ``objective_render`` does: ``{name}`` (PLACEHOLDER) takes
    the input field ``name``, and every other character is kept as it is. So a brace
    that opens or closes nothing is a placeholder gone wrong, and a placeholder is
    refused when no input could have the field: the schema allows only the properties
    it lists, and ``name`` is not one of them."""
    errors = [
        f"The objective template has {problem}: a placeholder is a field name in braces, "
        "like {batch}"
        for problem in _unbalanced_braces(template)
    ]
    properties = schema_closed_properties(input_schema)
    if properties is not None:
        listed = ", ".join(properties) or "none"
        errors += [
            f"The objective template uses {{{name}}}, but {name} is not a property of the "
            f"input schema (its properties: {listed})"
            for name in dict.fromkeys(PLACEHOLDER.findall(template))
            if name not in properties
        ]
    return errors


def _unbalanced_braces(text: str) -> list[str]:
    opened: list[tuple[int, int]] = []
    problems = []
    for line_number, line in enumerate(text.splitlines(), 1):
        for column, character in enumerate(line, 1):
            if character == "{":
                opened.append((line_number, column))
            elif character == "}" and opened:
                opened.pop()
            elif character == "}":
                problems.append(f"a }} at line {line_number}, column {column} that closes no {{")
    problems += [
        f"a {{ at line {line_number}, column {column} that is never closed"
        for line_number, column in opened
    ]
    return problems


def example_input_errors(example: Any, *, input_schema: Any, template: str) -> list[str]:
    """The example pre-fills the Run form, so it must be an input a run can start with:
    a JSON object that matches the schema and has every field the objective uses.
    Empty (the default) means no example, and is not checked."""
    if example in (None, {}):
        return []
    if not isinstance(example, dict):
        return [
            'The example input must be a JSON object, like {"batch": "2026-11"}, '
            f"not {json.dumps(example)}"
        ]
    errors = []
    if not input_schema_errors(input_schema):
        errors += [
            f"The example input does not match the input schema: {message}"
            for message in arguments_errors(input_schema, example, whole="the example input")
        ]
    errors += [
        f"The example input has no field {name}, which the objective template uses as {{{name}}}"
        for name in dict.fromkeys(PLACEHOLDER.findall(template))
        if name not in example
    ]
    return errors


def model_errors(model: str) -> list[str]:
    """Only a scripted model can be checked here: it must name an installed script. A
    model on an OpenAI-compatible server may have any name the server knows."""
    if not model.startswith(SCRIPTED_PREFIX):
        return []
    try:
        client_for(model)
    except ModelNotConfigured as error:
        return [f"The model {model} cannot run: {error}"]
    return []


def new_task_autonomy_errors(level: int) -> list[str]:
    """A new task starts at Supervised or below: raising the dial takes a second person,
    which the task page asks for and the admin cannot."""
    if level <= AutonomyLevel.SUPERVISED:
        return []
    return [
        f"A new task cannot start at {AutonomyLevel(level).label}: the autonomy level of a "
        f"new task is at most {AutonomyLevel.SUPERVISED.label}. Save the task, then raise "
        "it with the autonomy dial on the task's page, where a second person confirms it."
    ]


def tool_side_effect_errors(*, kind: str, config: Any, side_effect: str) -> list[str]:
    """A tool declared read-only runs without a person at every autonomy level, so it
    must be one that cannot change anything: an http tool only with GET or HEAD, and no
    header or query parameter that asks for another method (the executor refuses the call
    too, whatever saved it). For the forms that save a tool."""
    if kind != "http":
        return []
    from agentops.runtime.tools.http import side_effect_errors

    return [
        message[:1].upper() + message[1:] + "."
        for message in side_effect_errors(config, side_effect)
    ]
