"""Tool executors behind one interface: validate the arguments, then execute with the
idempotency key, then return a ToolResult. Python tools are the first kind; http, sql,
email and mcp executors plug in beside it through ``EXECUTORS``."""

from __future__ import annotations

from agentops.runtime.tools.base import (
    ToolContext,
    ToolError,
    ToolResult,
    arguments_errors,
    executor_for,
    executor_for_kind,
)
from agentops.runtime.tools.python import REGISTRY, ToolSpec, tool

__all__ = [
    "REGISTRY",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "ToolSpec",
    "arguments_errors",
    "executor_for",
    "executor_for_kind",
    "tool",
]
