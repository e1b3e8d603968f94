"""Python function tools, declared in code:

    @tool(schema={...}, side_effect="read")
    def ledger_invoices(ctx: ToolContext, *, batch: str) -> dict: ...

and synced to Tool rows (tasks.services.tools_sync) so operators can grant them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentops.runtime.tools.base import (
    ToolContext,
    ToolError,
    ToolResult,
    arguments_errors,
    reserved_schema_errors,
    schema_reference_errors,
)

if TYPE_CHECKING:
    from tasks.models import Tool

SIDE_EFFECTS = ("read", "reversible", "irreversible")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    function: Callable[..., Any]
    description: str
    input_schema: dict
    side_effect: str
    idempotent: bool


REGISTRY: dict[str, ToolSpec] = {}


def tool(
    *,
    schema: dict,
    side_effect: str,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a function as a tool. It is called as ``function(ctx, **arguments)``."""
    if side_effect not in SIDE_EFFECTS:
        raise ValueError(f"side_effect must be one of {SIDE_EFFECTS}, not {side_effect!r}")

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        tool_name = name or function.__name__
        if not TOOL_NAME.fullmatch(tool_name):
            raise ValueError(
                f"tool name {tool_name!r}: use 1 to 64 letters, digits, underscores or "
                "hyphens (the model sees this name)"
            )
        reserved = reserved_schema_errors(schema) + schema_reference_errors(
            schema, name="the schema"
        )
        if reserved:
            raise ValueError(f"tool {tool_name!r}: {reserved[0]}")
        existing = REGISTRY.get(tool_name)
        if existing and existing.function.__qualname__ != function.__qualname__:
            raise ValueError(f"two functions register the tool name {tool_name!r}")
        REGISTRY[tool_name] = ToolSpec(
            name=tool_name,
            function=function,
            description=description or inspect.getdoc(function) or "",
            input_schema=schema,
            side_effect=side_effect,
            idempotent=idempotent,
        )
        return function

    return register


class PythonExecutor:
    def config_errors(self, config: dict) -> list[str]:
        return []  # a code tool's contract is its decorator

    def validate(self, tool: Tool, arguments: dict) -> list[str]:
        return arguments_errors(tool.input_schema, arguments)

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        spec = REGISTRY.get(tool.name)
        if spec is None:
            return ToolResult(ok=False, error=f"the code for tool {tool.name!r} is not installed")
        try:
            value = spec.function(context, **arguments)
        except ToolError as error:
            return ToolResult(ok=False, error=str(error), transient=error.transient)
        except Exception as error:  # a tool's bug is reported to the model, not raised
            return ToolResult(ok=False, error=f"{type(error).__name__}: {error}")
        return ToolResult(ok=True, value=value)
