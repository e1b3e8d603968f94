"""``manage.py tools_check``: check every stored tool as the admin would check it when
saved, and say which ones a call would now refuse and why. For an upgrade that fenced the
tool boundary (secrets a tool may read, MCP commands, schemas, the own database, a read
method): a tool saved before is refused at call time, and this lists them ahead of it.

Exits with status 1 when any tool has a problem, so a deployment script can stop on it.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agentops.runtime.tools import executor_for_kind
from agentops.runtime.tools.base import reserved_schema_errors, schema_errors
from tasks.models import Tool
from tasks.validation import tool_side_effect_errors


def tool_problems(tool: Tool) -> list[str]:
    """Every reason a call of ``tool`` would be refused for its definition alone."""
    problems = [
        *schema_errors(tool.input_schema or {"type": "object"}, name="input schema"),
        *reserved_schema_errors(tool.input_schema),
    ]
    if tool.kind != Tool.Kind.PYTHON:
        try:
            problems += [
                f"config: {problem}"
                for problem in executor_for_kind(tool.kind).config_errors(tool.config or {})
            ]
        except LookupError as error:
            problems.append(str(error))
    problems += [
        f"side effect: {problem}"
        for problem in tool_side_effect_errors(
            kind=tool.kind, config=tool.config or {}, side_effect=tool.side_effect
        )
    ]
    return problems


class Command(BaseCommand):
    help = (
        "Check every stored tool as the admin checks one when it is saved; list those a "
        "call would refuse, and why. Exits 1 if any."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        failing = 0
        tools = Tool.objects.order_by("name")
        for tool in tools:
            problems = tool_problems(tool)
            if not problems:
                continue
            failing += 1
            self.stdout.write(f"{tool.name} ({tool.kind}):")
            for problem in problems:
                self.stdout.write(f"  - {problem}")
        if failing:
            raise CommandError(
                f"{failing} of {len(tools)} tools would be refused when called; fix each as "
                "said (docs/guide.md, section 6, for secrets and MCP commands)"
            )
        self.stdout.write(self.style.SUCCESS(f"All {len(tools)} tools pass the checks."))
