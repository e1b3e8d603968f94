"""``manage.py mcp_import PREFIX (--stdio "COMMAND ARGS" | --url URL [--allow-private])``:
list a Model Context Protocol server's tools and make one Tool row per tool, named
``PREFIX_<tool>``, so that each can be granted (and gated) on its own.

A tool is imported as read-only only when the server's annotations say so *and* the
operator agrees with ``--accept-read-only``: annotations are the server's claim, not a
guarantee. Everything else is irreversible until the operator lowers it in the admin.
Re-importing updates a row's schema, description and config and keeps what the operator
set: side effect, idempotency, always-approve, timeout and retries.

A server at a URL is fenced as an http tool is: its rows name the URL's host as their
only ``allowed_hosts``, and a host that resolves to a private, loopback or other
non-public address is refused unless ``--allow-private`` is given (the rows then carry
``allow_private``), here and at every call.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from agentops.runtime.secrets import SecretMissing, config_resolve, secret_errors, secret_names
from agentops.runtime.tools.base import (
    CONFIDENCE_ARGUMENT,
    reserved_schema_errors,
    schema_reference_errors,
)
from agentops.runtime.tools.mcp import (
    HTTP,
    STDIO,
    McpRefused,
    McpUnavailable,
    ServerTool,
    config_errors,
    server_errors,
    tools_list,
)
from tasks.models import SideEffect, Tool

NAME_LIMIT = 64
# What a re-import takes from the server; every other field is the operator's.
SERVER_FIELDS = ("description", "input_schema", "config", "available")
PREFIX_RULE = re.compile(r"[A-Za-z0-9_-]{1,48}")
NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
# Header and variable names that usually carry a credential.
CREDENTIAL_NAME = re.compile(r"auth|token|key|secret|password|cookie", re.IGNORECASE)


@dataclass
class Decision:
    """What the import does with one server tool, and why."""

    tool: ServerTool
    name: str
    config: dict
    side_effect: str
    side_effect_why: str
    idempotency: str
    idempotency_why: str
    existing: Tool | None = None
    skip: str = ""
    renamed: bool = False  # the server's name had to change to fit the Tool name rule


def tool_name_for(prefix: str, server_name: str) -> str:
    """``PREFIX_<tool>`` in the Tool name rule: letters, digits, _ and -, at most 64."""
    return NOT_IN_NAME.sub("_", f"{prefix}_{server_name}")[:NAME_LIMIT]


def side_effect_for(tool: ServerTool, *, accept_read_only: bool) -> tuple[str, str]:
    if tool.read_only and accept_read_only:
        return SideEffect.READ, "the server marks it read-only and --accept-read-only was given"
    if tool.read_only:
        return (
            SideEffect.IRREVERSIBLE,
            "the server marks it read-only, but --accept-read-only was not given",
        )
    return SideEffect.IRREVERSIBLE, "the server does not mark it read-only"


def idempotency_for(tool: ServerTool) -> tuple[str, str]:
    if tool.idempotent:
        return Tool.Idempotency.KEY, "the server marks it idempotent"
    return Tool.Idempotency.NONE, "the server does not mark it idempotent"


def schema_problem(schema: dict) -> str:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        return f"its input schema is invalid: {error.message}"
    references = schema_reference_errors(schema, name="its input schema")
    if references:
        return references[0]
    if reserved_schema_errors(schema):
        return (
            f"its input schema has a property named {CONFIDENCE_ARGUMENT!r}, which agentops "
            "adds to every tool for the agent's confidence in the call"
        )
    return ""


def url_host(url: str) -> str:
    """The host of ``url``, or "" if it has none (server_errors then says what is wrong)."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def pairs_parse(values: list[str], option: str, example: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"{option} must be NAME=VALUE, like {example}, not {value!r}")
        pairs[key.strip()] = rest
    return pairs


class Command(BaseCommand):
    help = (
        "Import the tools of an MCP server (a stdio command or a streamable HTTP URL) as "
        "Tool rows named PREFIX_<tool>, one per server tool."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="the start of every imported tool's name")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--stdio",
            metavar="COMMAND",
            help='the command that runs the server over stdio, like "python -m mcp_server_time" '
            "(a first word python means this worker's own interpreter)",
        )
        where.add_argument(
            "--url", help="the server's streamable HTTP endpoint, like http://host/mcp"
        )
        parser.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="with --url: a header for every request; name credentials as {secret:NAME}, "
            "read from the environment at call time (repeatable)",
        )
        parser.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="with --stdio: an environment variable for the server; secret:NAME reads it "
            "from the worker's environment at call time (repeatable)",
        )
        parser.add_argument(
            "--allow-private",
            action="store_true",
            help="with --url: let the tools reach a server whose host is a private, loopback "
            "or other non-public address (as an http tool's allow_private); without it such a "
            "server is refused",
        )
        parser.add_argument(
            "--accept-read-only",
            action="store_true",
            help="import tools the server marks read-only as read (they then run without a "
            "person at every autonomy level); without it every tool is irreversible",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="show what would be imported; write nothing"
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            help="seconds to wait for the server to start and list its tools (default 30)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        prefix = options["prefix"]
        if not PREFIX_RULE.fullmatch(prefix):
            raise CommandError(
                f"the prefix {prefix!r} must be 1 to 48 letters, digits, underscores or hyphens"
            )
        if not options["timeout"] > 0:
            raise CommandError(f"--timeout must be a positive number, not {options['timeout']:g}")
        server = self.server_config(options)
        try:
            resolved, secrets = config_resolve(server)
        except SecretMissing as error:
            raise CommandError(f"cannot reach the server: {error}") from None
        try:
            listed = tools_list(
                resolved, timeout=options["timeout"], describe_as=server, secrets=secrets
            )
        except McpRefused as error:
            hint = "" if options["allow_private"] else "; to import it, pass --allow-private"
            raise CommandError(f"{error}{hint}; nothing was imported") from None
        except McpUnavailable as error:
            raise CommandError(f"{error}; nothing was imported") from None
        if not listed:
            self.stdout.write("The server lists no tools; nothing was imported.")
            return
        decisions = self.decide(
            prefix, server, listed, accept_read_only=options["accept_read_only"]
        )
        for decision in decisions:
            self.stdout.write(self.line(decision, dry_run=options["dry_run"]))
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was written.")
            return
        written = self.write(decisions)
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {written} tool{'s' if written != 1 else ''} from the server."
            )
        )

    def server_config(self, options: dict[str, Any]) -> dict[str, Any]:
        """The ``server`` part of the rows' config, as stored (secrets by name)."""
        headers = pairs_parse(options["header"], "--header", "Authorization=Bearer {secret:TOKEN}")
        env = pairs_parse(options["env"], "--env", "API_KEY=secret:API_KEY")
        if options["stdio"] is not None:
            if headers:
                raise CommandError("--header goes with --url; a stdio server takes --env")
            if options["allow_private"]:
                raise CommandError("--allow-private goes with --url; a stdio server has no address")
            try:
                command = shlex.split(options["stdio"])
            except ValueError as error:
                raise CommandError(f"--stdio cannot be split into words: {error}") from None
            if not command:
                raise CommandError('--stdio needs a command, like "python -m mcp_server_time"')
            server: dict[str, Any] = {"transport": STDIO, "command": command}
            if env:
                server["env"] = env
        else:
            if env:
                raise CommandError("--env goes with --stdio; an HTTP server takes --header")
            server = {"transport": HTTP, "url": options["url"]}
            if headers:
                server["headers"] = headers
            host = url_host(options["url"])
            if host:
                server["allowed_hosts"] = [host]
            if options["allow_private"]:
                server["allow_private"] = True
        problems = server_errors(server) + secret_errors(server)
        if problems:
            raise CommandError("; ".join(problems).replace("url: ", "--url: "))
        for name, value in {**headers, **env}.items():
            if CREDENTIAL_NAME.search(name) and not secret_names(value):
                self.stderr.write(
                    f"note: {name} is stored in the database as given; name a credential as "
                    "{secret:NAME} (or secret:NAME) to have it read from the environment instead"
                )
        return server

    def decide(
        self, prefix: str, server: dict, listed: list[ServerTool], *, accept_read_only: bool
    ) -> list[Decision]:
        decisions: dict[str, Decision] = {}
        existing = {
            tool.name: tool
            for tool in Tool.objects.filter(
                name__in=[tool_name_for(prefix, tool.name) for tool in listed]
            )
        }
        for tool in listed:
            name = tool_name_for(prefix, tool.name)
            if name in decisions:
                raise CommandError(
                    f"the server's tools {decisions[name].tool.name!r} and {tool.name!r} both "
                    f"become {name!r}; nothing was imported"
                )
            row = existing.get(name)
            if row is not None and row.kind != Tool.Kind.MCP:
                raise CommandError(
                    f"a {row.get_kind_display().lower()} tool is already named {name!r}; choose "
                    "another prefix; nothing was imported"
                )
            side_effect, side_effect_why = side_effect_for(tool, accept_read_only=accept_read_only)
            idempotency, idempotency_why = idempotency_for(tool)
            config = {"server": server, "tool": tool.name, "annotations": tool.annotations}
            problems = config_errors(config)
            decisions[name] = Decision(
                tool=tool,
                name=name,
                config=config,
                side_effect=side_effect,
                side_effect_why=side_effect_why,
                idempotency=idempotency,
                idempotency_why=idempotency_why,
                existing=row,
                skip=schema_problem(tool.input_schema) or "; ".join(problems),
                renamed=name != f"{prefix}_{tool.name}",
            )
        return list(decisions.values())

    def line(self, decision: Decision, *, dry_run: bool) -> str:
        """One line per tool: what the import does with it, and why."""
        renamed = f" (the server's {decision.tool.name!r})" if decision.renamed else ""
        if decision.skip:
            return f"skip {decision.name}{renamed}: {decision.skip}"
        row = decision.existing
        if row is None:
            verb = "would create" if dry_run else "create"
            return (
                f"{verb} {decision.name}{renamed}: {decision.side_effect} "
                f"({decision.side_effect_why}); idempotency {decision.idempotency} "
                f"({decision.idempotency_why})"
            )
        verb = "would update" if dry_run else "update"
        line = f"{verb} {decision.name}{renamed}: schema, description and config from the server"
        line += f"; side effect {row.side_effect} kept"
        if row.side_effect != decision.side_effect:
            line += f" (the operator's; a new import would choose {decision.side_effect}: "
            line += f"{decision.side_effect_why})"
        line += f"; idempotency {row.idempotency} kept"
        if row.idempotency != decision.idempotency:
            line += f" (the operator's; {decision.idempotency_why})"
        if row.always_approve:
            line += "; always approve kept"
        return line

    def write(self, decisions: list[Decision]) -> int:
        """Write the tools, and record in each tool's trail what the import changed (the
        deployment's own command, so nothing waits for a second person)."""
        from tasks.governance import tool_changes_record, tool_name_pinned_by, tool_snapshot

        written = 0
        with transaction.atomic():
            for decision in decisions:
                if decision.skip:
                    continue
                if decision.existing is None and (why := tool_name_pinned_by(decision.name)):
                    raise CommandError(f"{decision.name}: {why}; nothing was imported")
                before = tool_snapshot(decision.existing) if decision.existing else None
                row = decision.existing or Tool(
                    name=decision.name,
                    kind=Tool.Kind.MCP,
                    side_effect=decision.side_effect,
                    idempotency=decision.idempotency,
                )
                row.description = decision.tool.description
                row.input_schema = decision.tool.input_schema
                row.config = decision.config
                row.available = True
                try:
                    row.full_clean()
                except ValidationError as error:
                    raise CommandError(
                        f"{decision.name}: {'; '.join(error.messages)}; nothing was imported"
                    ) from None
                if decision.existing is None:
                    row.save()
                else:  # the operator's own fields are not written back
                    row.save(update_fields=[*SERVER_FIELDS, "updated_at"])
                tool_changes_record(tool=row, before=before, actor="command:mcp_import")
                written += 1
        return written
