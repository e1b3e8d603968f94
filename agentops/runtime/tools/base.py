from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

if TYPE_CHECKING:
    from tasks.models import Tool


@dataclass(frozen=True)
class ToolContext:
    """What a tool is told about the call it serves. A tool with idempotency ``key``
    must make a repeat with the same ``idempotency_key`` have no new effect."""

    run_id: uuid.UUID
    step_number: int
    idempotency_key: str


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    value: Any = None
    error: str = ""
    # Transient errors (timeouts, refused connections) may be retried; others go back
    # to the model so it can re-plan.
    transient: bool = False
    details: dict = field(default_factory=dict)


class ToolError(Exception):
    """Raised by a tool to report a failure the model should see and re-plan around."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ToolExecutor(Protocol):
    """One per tool kind. ``config_errors`` checks a tool's config when it is saved;
    ``validate`` checks a call's arguments before it fires; ``execute`` makes the call
    within ``tool.timeout_seconds``, resolving ``secret:NAME`` values at call time.

    A kind whose call is mostly waiting on I/O (http, mcp) may also have ``aexecute``
    (``AsyncToolExecutor``): the async worker then awaits it on its event loop, so the
    call holds no thread while it waits; a kind without one runs ``execute`` on the
    worker's bounded thread pool (``engine.waits.tool_execute``)."""

    def config_errors(self, config: dict) -> list[str]: ...

    def validate(self, tool: Tool, arguments: dict) -> list[str]: ...

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult: ...


class AsyncToolExecutor(ToolExecutor, Protocol):
    """A ToolExecutor with the optional ``aexecute``: ``execute`` awaited, the same call
    with the same checks, limits, timeout, errors and ``transient`` classing, differing
    only in its I/O. It runs on a loop many runs share, so it never blocks it: no
    blocking lookup, sleep, file or database access (what must block goes to a thread,
    ``asyncio.to_thread``)."""

    async def aexecute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult: ...


EXECUTORS = {
    "python": "agentops.runtime.tools.python.PythonExecutor",
    "http": "agentops.runtime.tools.http.HttpExecutor",
    "sql": "agentops.runtime.tools.sql.SqlExecutor",
    "email": "agentops.runtime.tools.email.EmailExecutor",
    "mcp": "agentops.runtime.tools.mcp.McpExecutor",
}


JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def retrieve_nothing(uri: str) -> Any:
    """A schema is checked with what it holds: jsonschema's default would fetch a ``$ref``
    to a file or a URL (read a worker's local file, reach a private address) and put what
    it found in a refusal the model and every user see."""
    raise NoSuchResource(ref=uri)


# The draft meta-schemas stay known (jsonschema adds them to any registry); nothing else is.
NO_RETRIEVAL = Registry(retrieve=retrieve_nothing)  # type: ignore[call-arg]
REFERENCE_KEYWORDS = ("$ref", "$dynamicRef")


def schema_reference_errors(schema: Any, *, name: str = "The schema") -> list[str]:
    """A ``$ref`` (or ``$dynamicRef``) anywhere in a schema must point inside it (start
    with ``#``): nothing outside is ever fetched, so any other would only fail later.
    Any key of that name with a text value counts, wherever it sits: a JSON pointer can
    make any part of a schema a schema."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in REFERENCE_KEYWORDS and isinstance(item, str):
                    if not item.startswith("#") and item not in found:
                        found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(schema)
    return [
        f"{name} refers to {reference!r}, outside itself: a $ref must point inside the "
        "schema (start with #), since no schema is ever fetched from a file or a URL"
        for reference in found
    ]


@functools.lru_cache(maxsize=512)
def validator_for(schema_json: str) -> Draft202012Validator | str:
    """A checked validator per distinct schema (building one costs far more than using
    it), or the reason the schema itself is invalid, naming where in it. A validator
    never fetches anything (``NO_RETRIEVAL``), and a schema that refers outside itself is
    refused before one is built."""
    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        return _schema_error_text(error)
    references = schema_reference_errors(schema, name="it")
    if references:
        return references[0]
    return Draft202012Validator(schema, registry=NO_RETRIEVAL)


def _schema_error_text(error: SchemaError) -> str:
    where = ("at " + "/".join(str(part) for part in error.path)) if error.path else "at the top"
    if error.path and error.path[-1] == "type" and not isinstance(error.instance, dict):
        # The meta-schema's own wording ("not valid under any of the given schemas")
        # does not say what a type may be.
        return (
            f"{where}: {json.dumps(error.instance)} is not a JSON Schema type "
            f"(use {', '.join(JSON_TYPES)})"
        )
    return f"{where}: {error.message}"


# The argument the engine adds to every tool, as the model sees it, for the agent's
# confidence in the call (agentops.runtime.gates); no tool may declare it itself.
CONFIDENCE_ARGUMENT = "_confidence"


def reserved_schema_errors(schema: Any) -> list[str]:
    """A tool's own schema may not declare the argument the engine adds to every tool."""
    if isinstance(schema, dict) and CONFIDENCE_ARGUMENT in (schema.get("properties") or {}):
        return [
            f"The input schema may not have a property named {CONFIDENCE_ARGUMENT!r}: the "
            "engine adds it to every tool for the agent's confidence in the call."
        ]
    return []


def schema_errors(schema: Any, *, name: str = "The schema") -> list[str]:
    """Why ``schema`` cannot check a JSON object (a call's arguments, a run's input): it
    is not a JSON object, not a valid JSON Schema (draft 2020-12), or its type is not
    object. Sentences that begin with ``name``; empty when it can. For the forms that
    save a schema."""
    if not isinstance(schema, dict):
        return [
            f'{name} must be a JSON object, like {{"type": "object"}}, not {json.dumps(schema)}'
        ]
    references = schema_reference_errors(schema, name=name)
    if references:
        return references
    reason = validator_for(json.dumps(schema, sort_keys=True))
    if isinstance(reason, str):
        return [f"{name} is not a valid JSON Schema (draft 2020-12): {reason}"]
    declared = schema.get("type", "object")
    if "object" not in (declared if isinstance(declared, list) else [declared]):
        return [
            f'{name} must have type "object", not {json.dumps(declared)}: what it checks is '
            "always a JSON object"
        ]
    return []


def arguments_errors(schema: dict, arguments: Any, *, whole: str = "the arguments") -> list[str]:
    """Every way ``arguments`` break ``schema``, as sentences naming the field (or
    ``whole`` when the fault is in the object itself, such as a missing property)."""
    validator = validator_for(json.dumps(schema or {"type": "object"}, sort_keys=True))
    if isinstance(validator, str):
        # Said of whichever schema was given (a tool's, a task's), so it names neither.
        return [f"the schema {whole} must match is itself invalid ({validator})"]
    messages = []
    try:
        found = sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))
    except Unresolvable as error:
        # A local $ref to nowhere ("#/$defs/missing"): nothing is fetched, and the text
        # names only the reference, never anything read.
        return [f"the schema {whole} must match has a $ref that leads nowhere ({error.ref!r})"]
    for error in found:
        where = "/".join(str(part) for part in error.path) or whole
        messages.append(f"{where}: {error.message}")
    return messages


def executor_for(tool: Tool) -> ToolExecutor:
    return executor_for_kind(tool.kind)


@functools.cache
def executor_for_kind(kind: str) -> ToolExecutor:
    from django.utils.module_loading import import_string

    try:
        return import_string(EXECUTORS[kind])()
    except (KeyError, ImportError):
        raise LookupError(f"no executor for tools of kind {kind!r}") from None
