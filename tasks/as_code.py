"""Tasks as code: tasks, with their grants, rules, budgets, dial and triggers, written
to YAML and read back.

``tasks_export`` writes what is live. ``tasks_import_plan`` reads a file, refuses it
whole when anything in it is wrong (each problem with its line, column and field), and
says what would change; ``tasks_import_apply`` applies a plan in one transaction,
through the same doors the admin uses:

- a task's fields, grants and rules go through ``tasks.governance.task_change_submit``:
  what narrows applies, what widens waits for a second person (a ``ConfigChange``);
- the dial turns through ``tasks.autonomy.autonomy_request``: raising it above
  Supervised waits for a second person (an ``AutonomyChange``);
- a new task is made as the admin's add form makes one (at most Supervised, recorded
  with ``object_created``), then its grants and dial follow the two paths above;
- triggers are written as the trigger admin writes them (checked by its form, recorded
  in the task's trail): they are not governed as widening, there or here.

The checks are the admin's own forms (``TaskForm``, ``TriggerForm``) and the rule's own
``clean``, never a copy. A file is hostile input: at most ``MAX_BYTES``, one document,
no anchors or aliases, no duplicate or unknown keys, nothing nested deeper than
``MAX_DEPTH``, at most ``MAX_NODES`` values and ``MAX_ITEMS`` tasks, grants, rules and
triggers (counted before anything is built or looked up), no NUL, lone surrogate or
hidden line break (docs/tasks-as-code.md, "What is refused").

Secrets are never written: a webhook's signing secret stays in the database (a new
webhook gets a new one), and a password in a queue's URL is written redacted and, read
back redacted, keeps the one live.

The file is declarative for the tasks it names: a field left out takes the model's
default, a grant or trigger left out is removed. Tasks the file does not name are left
as they are (a file may hold one task). docs/tasks-as-code.md says it for operators.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import yaml
from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import DatabaseError, models, transaction
from django.db.models import QuerySet
from django.forms import modelform_factory

from agentops.strict_json import StrictJSONFormField
from tasks import governance
from tasks.admin import TaskForm
from tasks.autonomy import DialError, autonomy_request
from tasks.governance import RuleDraft, field_value, value_plain, value_shown, values_equal
from tasks.models import (
    AutonomyChange,
    AutonomyLevel,
    ConfigChange,
    GrantRule,
    Task,
    Tool,
    ToolGrant,
    Trigger,
)
from tasks.services import task_version_current
from triggers.admin import TriggerForm, trigger_recorded, value_said
from triggers.selectors import REDACTED, secret_fingerprint, url_redacted
from triggers.services import secret_new

FORMAT_VERSION = 1
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
# Each task, grant, rule and trigger costs queries and a form's checks (a few
# milliseconds), and an apply reads the file twice: a megabyte of small tasks took
# minutes. A file names at most this many of them together, counted before any is read.
MAX_ITEMS = 1000
# A number, date, boolean or null is short; a longer one is refused unread: PyYAML reads
# 1:0:0:... as a base-60 integer, one multiplication on a growing number a digit (400 KB
# of it took seconds). Text (a quoted or plain string) is not bounded by this.
MAX_SCALAR_CHARS = 100
# Values (each text, number, mapping and list) a file holds, counted while it is read as
# events, before anything is built: a megabyte of one-digit numbers built 450,000 nodes,
# some 370 MB and five seconds. A file of a megabyte of tasks as exported holds ~55,000.
MAX_NODES = 100_000
# libyaml's parser when PyYAML has it (about ten times faster: the pure-Python one took
# some forty seconds for a megabyte of small values); the same resolver and marks.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A file refused by libyaml and no larger than this is read again by the pure-Python
# reader (a second or two at most), whose faults name their field more often.
PRECISE_BYTES = 64 * 1024
NOTE = "import_tasks"

# A task's fields in the file: those a person changes (governance.TASK_FIELDS, the slug
# being the task's key), the dial, and the live-run cap.
TASK_FILE_FIELDS = (
    *(name for name in governance.TASK_FIELDS if name != "slug"),
    "autonomy_level",
    "max_live_runs",
)
TASK_REQUIRED = ("name", "objective_template")
GROUP_FIELDS = ("approver_group", "escalation_group")
TASK_KEYS = (*TASK_FILE_FIELDS, "grants", "triggers")
GRANT_KEYS = ("rules",)
RULE_KEYS = ("position", "effect", "expression", "description")
TRIGGER_FIELDS = ("kind", "enabled", "config", "input_mapping", "max_per_minute", "max_per_hour")

STR_TAG = "tag:yaml.org,2002:str"
# Characters YAML reads as line breaks besides \n and \r. Written as they are, in a
# plain scalar or a block, they come back as a space or a \n (a round trip would change
# the text), and many editors show no break: the file holds them only escaped, in
# double quotes (\N, \L, \P), as the export writes them.
UNICODE_BREAKS = ("\x85", "\u2028", "\u2029")


# Problems ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One fault of a file: where (1-based line and column), which field, what."""

    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
        }


class AsCodeError(Exception):
    """The file is refused; ``problems`` says every fault found. Nothing was written."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


Path = tuple[str | int, ...]


def path_said(path: Path) -> str:
    said = ""
    for part in path:
        said += f"[{part}]" if isinstance(part, int) else (f".{part}" if said else part)
    return said


class Marks:
    """Where each value (and each mapping key) of the file starts."""

    def __init__(self) -> None:
        self.values: dict[Path, tuple[int, int]] = {}
        self.keys: dict[Path, tuple[int, int]] = {}

    def at(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """The mark of ``path`` (its key's with ``key``), else its nearest ancestor's."""
        while True:
            found = (self.keys if key else self.values).get(path) or self.values.get(path)
            if found or not path:
                return found or (1, 1)
            path = path[:-1]


class Problems:
    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.found: list[Problem] = []

    def add(self, path: Path, message: str, *, key: bool = False) -> None:
        line, column = self.marks.at(path, key=key)
        self.found.append(Problem(line, column, path_said(path), message))

    def raise_any(self) -> None:
        if self.found:
            raise AsCodeError(sorted(self.found, key=lambda p: (p.line, p.column, p.field)))


# Reading the file --------------------------------------------------------------------


def _mark_error(error: yaml.YAMLError, text: str = "") -> AsCodeError:
    """A YAML error at the line at fault: where the construct left open began (an
    unclosed bracket or quote) when the parser says so, else where it stopped; for a
    character no YAML holds (a control character), where it first is."""
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character
        character = chr(character) if isinstance(character, int) else str(character)
        at = text.find(character) if text and character else -1
        line = text.count("\n", 0, at) + 1 if at >= 0 else 1
        column = at - text.rfind("\n", 0, at) if at >= 0 else 1
        return AsCodeError(
            [Problem(line, column, "", f"not YAML: the character {character!r} is not allowed")]
        )
    context = getattr(error, "context_mark", None)
    problem = getattr(error, "problem_mark", None)
    mark = context or problem
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    said = " ".join(
        part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part
    )
    if context is not None and problem is not None and context.line != problem.line:
        said += f" (at line {problem.line + 1}, column {problem.column + 1})"
    return AsCodeError([Problem(line, column, "", f"not YAML: {said or error}")])


def _refused_at(event: yaml.Event, message: str) -> AsCodeError:
    """The file refused at ``event``'s place (1-based line and column)."""
    mark = event.start_mark
    return AsCodeError([Problem(mark.line + 1, mark.column + 1, "", message)])


def _node_read(text: str, loader: type) -> yaml.Node | None:
    """The document's node, its events read first: anchors and aliases are refused
    before anything is built from them (a "billion laughs" file expands aliases into
    more than memory holds), and so are nesting past MAX_DEPTH and more than MAX_NODES
    values."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise _refused_at(event, f"the file holds more than {MAX_NODES:,} values: split it")
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent) or anchor:
            raise _refused_at(
                event, "anchors and aliases (&, *) are not accepted: write the value out"
            )
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _refused_at(event, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
    return yaml.compose(text, Loader=loader)


def yaml_read(text: str) -> tuple[Any, Marks]:
    """The document and where each of its values starts; refused (AsCodeError) when it
    is too large, not YAML, more than one document, uses anchors or aliases, nests past
    MAX_DEPTH, repeats a key, or has a key that is not text."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise AsCodeError([Problem(1, 1, "", f"the file is {size:,} bytes; at most {MAX_BYTES:,}")])
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise AsCodeError([Problem(line, 1, "", "the file holds a NUL character")])
    try:
        # Text handed over by an API may hold a lone surrogate, which no reader takes.
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        line = text.count("\n", 0, error.start) + 1
        raise AsCodeError(
            [Problem(line, 1, "", "the file holds a lone surrogate: not text")]
        ) from None
    for mark in UNICODE_BREAKS:
        if mark in text:
            # YAML reads it as a line break that many editors and diffs show as none:
            # "a: x<NEL>max_steps: 999" reads as two fields and looks like one.
            line = text.count("\n", 0, text.index(mark)) + 1
            raise AsCodeError(
                [
                    Problem(
                        line,
                        1,
                        "",
                        f"the file holds U+{ord(mark):04X}, a line break many editors do not "
                        "show: write it escaped in double quotes (\\N, \\L or \\P)",
                    )
                ]
            )
    try:
        node = _node_read(text, LOADER)
    except yaml.YAMLError as error:
        if LOADER is yaml.SafeLoader or size > PRECISE_BYTES:
            raise _mark_error(error, text) from None
        # libyaml refuses some values outright (an escape of a lone surrogate) where the
        # pure-Python reader reads them and the checks below name their field: a small
        # file is read again by it, to say the fault as precisely as it can.
        try:
            node = _node_read(text, yaml.SafeLoader)
        except yaml.YAMLError as again:
            raise _mark_error(again, text) from None
    if node is None:
        raise AsCodeError([Problem(1, 1, "", "the file is empty: it starts with version: 1")])
    marks = Marks()
    problems = Problems(marks)
    _walk(node, (), marks, problems)
    problems.raise_any()
    try:
        # Built from the node already read and checked, not from a third reading.
        data = yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.YAMLError as error:  # a value that does not construct (a bad timestamp)
        raise _mark_error(error, text) from None
    return data, marks


def _walk(node: yaml.Node, path: Path, marks: Marks, problems: Problems) -> None:
    marks.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STR_TAG:
                line, column = key_mark
                problems.found.append(
                    Problem(line, column, path_said(path), "a key must be text (quote it)")
                )
                continue
            key = key_node.value
            child = (*path, key)
            if "\x00" in key:
                line, column = key_mark
                problems.found.append(Problem(line, column, path_said(path), NUL_SAID))
                continue
            if key in seen:
                line, column = key_mark
                problems.found.append(
                    Problem(
                        line,
                        column,
                        path_said(child),
                        f"duplicate key {key!r} (first at line {seen[key]})",
                    )
                )
                continue
            seen[key] = key_mark[0]
            marks.keys[child] = key_mark
            _walk(value_node, child, marks, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), marks, problems)
    else:
        fault = _scalar_fault(node)
        if fault:
            line, column = marks.values[path]
            problems.found.append(Problem(line, column, path_said(path), fault))


INT_LIMIT = 2**63  # the widest integer a database column here holds


NUL_SAID = (
    "the text holds a NUL character (an escape like \\0 or \\x00): the admin refuses it, "
    "and PostgreSQL cannot store it"
)


def _scalar_fault(node: yaml.ScalarNode) -> str:
    """What a value cannot be, found before it is built: text no database stores (a lone
    surrogate or a NUL, from an escape: the file's own bytes hold neither), an integer
    past any column (or past the digits Python reads), a date or binary value that does
    not build, or a value not text that is too long to be a number (built unread)."""
    if node.tag == STR_TAG:
        try:
            node.value.encode("utf-8")
        except UnicodeEncodeError:
            return "the text holds a lone surrogate (an escape like \\uD800): not storable"
        return NUL_SAID if "\x00" in node.value else ""
    if len(node.value) > MAX_SCALAR_CHARS:
        return (
            f"longer than {MAX_SCALAR_CHARS} characters for a number, date, true/false or "
            "null: quote it if it is text"
        )
    try:
        value = yaml.constructor.SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, OverflowError, TypeError) as error:
        return f"not a value YAML can read ({str(error).splitlines()[0][:200]})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        return f"the number is too large (at most {INT_LIMIT - 1})"
    return ""


def json_fault(value: Any) -> str:
    """Why ``value`` is not plain JSON ("" when it is): YAML reads dates, binary and
    non-finite numbers that a JSON field cannot hold."""
    if value is None or isinstance(value, bool | int | str):
        return ""
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"{value} is not a number JSON holds"
    if isinstance(value, list):
        return next((fault for item in value if (fault := json_fault(item))), "")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"the key {key!r} is not text (quote it)"
            fault = json_fault(item)
            if fault:
                return fault
        return ""
    return f"a {type(value).__name__} is not JSON (quote it if it is text)"


# Types of the file's values ----------------------------------------------------------


def _type_fault(model_field: models.Field, value: Any) -> str:
    """Why ``value`` cannot be the value of ``model_field`` in the file ("" if it can);
    what the value may be beyond its type, the admin's form says."""
    if value is None:
        return "" if model_field.null else "must not be empty (null)"
    if isinstance(model_field, models.ForeignKey):
        return "" if isinstance(value, str) else "must be a group's name (text) or null"
    if isinstance(model_field, models.JSONField):
        return json_fault(value)
    if isinstance(model_field, models.BooleanField):
        return "" if isinstance(value, bool) else "must be true or false"
    if isinstance(model_field, models.IntegerField):
        return (
            ""
            if isinstance(value, int) and not isinstance(value, bool)
            else "must be a whole number"
        )
    if isinstance(model_field, models.FloatField):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return "" if ok else "must be a number"
    if isinstance(model_field, models.DecimalField):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return "must be a number (or text holding one, such as '2.50')"
        return ""
    if isinstance(model_field, models.CharField | models.TextField):
        return "" if isinstance(value, str) else "must be text (quote it)"
    return ""


def _mapping_fault(value: Any, what: str) -> str:
    return "" if isinstance(value, dict) else f"must be a mapping ({what})"


def _unknown_keys(problems: Problems, path: Path, value: dict, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            problems.add(
                (*path, key), f"unknown field (known: {', '.join(sorted(allowed))})", key=True
            )


# What is live, as the file has it ----------------------------------------------------


def _decimal_said(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return value


def task_as_code(task: Task) -> dict[str, Any]:
    """A task as the file holds it: plain values, groups by name, grants by tool name,
    triggers by name; no secret."""
    data: dict[str, Any] = {}
    for name in TASK_FILE_FIELDS:
        if name in GROUP_FIELDS:
            group = getattr(task, name)
            data[name] = group.name if group is not None else None
        else:
            data[name] = _decimal_said(getattr(task, name))
    grants: dict[str, Any] = {}
    for grant in task.grants.select_related("tool").order_by("tool__name"):
        grants[grant.tool.name] = {
            "rules": [
                {name: getattr(rule, name) for name in RULE_KEYS}
                for rule in grant.rules.order_by("position", "pk")
            ]
        }
    data["grants"] = grants
    triggers: dict[str, Any] = {}
    for trigger in task.triggers.order_by("name", "pk"):
        if trigger.name in triggers:
            raise AsCodeError(
                [
                    Problem(
                        1,
                        1,
                        f"tasks.{task.slug}.triggers.{trigger.name}",
                        f"the task has two triggers named {trigger.name!r}; a file names "
                        "each once: rename one in the admin, then export",
                    )
                ]
            )
        triggers[trigger.name] = trigger_as_code(trigger)
    data["triggers"] = triggers
    return data


def trigger_as_code(trigger: Trigger) -> dict[str, Any]:
    config = dict(trigger.config or {})
    if isinstance(config.get("url"), str):
        config["url"] = url_redacted(config["url"])
    return {
        "kind": trigger.kind,
        "enabled": trigger.enabled,
        "config": config,
        "input_mapping": trigger.input_mapping,
        "max_per_minute": trigger.max_per_minute,
        "max_per_hour": trigger.max_per_hour,
    }


class _Dumper(yaml.SafeDumper):
    """Text of several lines as a block (|), readable and diffable; PyYAML falls back to
    quoting when a block cannot hold it exactly."""


def _str_represent(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if any(mark in value for mark in UNICODE_BREAKS):
        return dumper.represent_scalar(STR_TAG, value, style='"')
    style = "|" if "\n" in value else None
    return dumper.represent_scalar(STR_TAG, value, style=style)


_Dumper.add_representer(str, _str_represent)


def tasks_export(*, tasks: QuerySet[Task] | None = None) -> str:
    """The tasks (all when None) as a YAML document ``tasks_import_plan`` reads back
    with no change: keys sorted, tasks by slug. Never a secret."""
    tasks = Task.objects.all() if tasks is None else tasks
    document = {
        task.slug: task_as_code(task)
        for task in tasks.select_related("approver_group", "escalation_group").order_by("slug")
    }
    count = sum(1 for _ in _items(document))
    if count > MAX_ITEMS:
        raise AsCodeError(
            [
                Problem(
                    1,
                    1,
                    "",
                    f"these tasks hold {count:,} tasks, grants, rules and triggers, and a file "
                    f"is read back with at most {MAX_ITEMS:,}: export fewer tasks at a time "
                    "(name their slugs)",
                )
            ]
        )
    body = yaml.dump(
        {"tasks": document},
        Dumper=_Dumper,
        sort_keys=True,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return (
        "# agentops tasks as code (docs/tasks-as-code.md). Import with\n"
        "#   manage.py import_tasks FILE [--apply --user USERNAME]\n"
        f"version: {FORMAT_VERSION}\n" + body
    )


# The plan ----------------------------------------------------------------------------


@dataclass
class TriggerPlan:
    """One trigger's part of a plan. ``values``: for "add", every field as the admin's
    form cleaned it; for "change", only the fields that change; for "remove", none."""

    name: str
    action: str  # "add", "change" or "remove"
    existing: Trigger | None
    values: dict[str, Any]
    lines: list[str]


@dataclass
class TaskPlan:
    """What importing does to one task. Built against the task as it was when planned."""

    slug: str
    existing: Task | None
    form_values: dict[str, Any]  # the admin form's cleaned values
    lines: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # governed fields that change
    grants_added: list[tuple[Tool, list[RuleDraft]]] = field(default_factory=list)
    grants_removed: list[int] = field(default_factory=list)
    rules_added: list[tuple[int, RuleDraft]] = field(default_factory=list)
    rules_changed: list[RuleDraft] = field(default_factory=list)
    rules_removed: list[int] = field(default_factory=list)
    autonomy_to: int | None = None
    triggers: list[TriggerPlan] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.lines)

    def permissions(self) -> set[str]:
        """What the admin would ask of a person making these changes."""
        needed: set[str] = set()
        # The task's own page: its add form for a new one (grants inline), its change
        # form for one that exists; the dial turns on the task page (change_task).
        task_form = "tasks.add_task" if self.existing is None else "tasks.change_task"
        if self.existing is None or self.values:
            needed.add(task_form)
        if self.autonomy_to is not None:
            needed.add("tasks.change_task")
        if self.grants_added:
            needed |= {task_form, "tasks.add_toolgrant"}
            if any(drafts for _, drafts in self.grants_added):
                needed.add("tasks.add_grantrule")
        if self.grants_removed:
            needed |= {task_form, "tasks.delete_toolgrant"}
        for ops, perm in (
            (self.rules_added, "add_grantrule"),
            (self.rules_changed, "change_grantrule"),
            (self.rules_removed, "delete_grantrule"),
        ):
            if ops:
                needed |= {"tasks.change_toolgrant", f"tasks.{perm}"}
        for trigger in self.triggers:
            needed.add(f"tasks.{trigger.action.replace('remove', 'delete')}_trigger")
            if trigger.action != "remove":  # a trigger starts runs: as the admin asks
                needed.add("tasks.start_run")
        return needed


@dataclass
class ImportPlan:
    """What importing a file would change; ``diff`` says it line by line."""

    text: str
    tasks: list[TaskPlan]
    untouched: list[str]  # live tasks the file does not name

    @property
    def has_changes(self) -> bool:
        return any(task.changed for task in self.tasks)

    @property
    def diff(self) -> list[str]:
        lines: list[str] = []
        for task in self.tasks:
            if not task.changed:
                continue
            lines.append(f"{'+' if task.existing is None else '~'} task {task.slug}")
            lines += [f"    {line}" for line in task.lines]
        if not lines:
            lines.append("no changes")
        if self.untouched:
            lines.append(f"(not in the file, left as they are: {', '.join(self.untouched)})")
        return lines

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.diff).encode()).hexdigest()

    def permissions(self) -> set[str]:
        return set().union(*(task.permissions() for task in self.tasks if task.changed))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON, for an API's answer."""
        return {
            "has_changes": self.has_changes,
            "diff": self.diff,
            "tasks": [
                {"slug": task.slug, "new": task.existing is None, "lines": task.lines}
                for task in self.tasks
                if task.changed
            ],
            "untouched": self.untouched,
        }


@dataclass(frozen=True)
class Pending:
    """A change that waits for a second person: ``kind`` "config" (a ConfigChange) or
    "autonomy" (an AutonomyChange), with its id."""

    task: str
    kind: str
    id: int
    lines: list[str]


@dataclass
class ImportResult:
    """What an import did: the changes applied, those that wait for a second person
    (with their ids), and what a person should know (a webhook's new secret)."""

    applied: list[str] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON, for an API's answer."""
        return {
            "applied": self.applied,
            "pending": [
                {"task": p.task, "kind": p.kind, "id": p.id, "lines": p.lines} for p in self.pending
            ],
            "notes": self.notes,
        }


def _task_form_class(*, new: bool) -> type[TaskForm]:
    """The admin's task form with the fields its page edits: a task's dial and live-run
    cap are read-only once it exists (TaskAdmin.get_readonly_fields); a new task may set
    the cap, which only bounds."""
    fields = [
        name for name in TASK_FILE_FIELDS if new or name not in ("autonomy_level", "max_live_runs")
    ]
    return modelform_factory(
        Task, form=TaskForm, fields=["slug", *fields], formfield_callback=_strict_json
    )


def _strict_json(db_field: models.Field, **kwargs: Any) -> Any:
    # The admin reads JSON strictly (tasks.admin.STRICT_JSON); so does the file.
    if isinstance(db_field, models.JSONField):
        kwargs["form_class"] = StrictJSONFormField
    return db_field.formfield(**kwargs)


def _form_datum(model_field: models.Field, value: Any) -> Any:
    """A file value as a browser would post it to the admin."""
    if value is None:
        return ""
    if isinstance(model_field, models.JSONField):
        return json.dumps(value)
    if isinstance(model_field, models.BooleanField):
        return "on" if value else ""
    return str(value)


def _model_default(model_field: models.Field) -> Any:
    default = model_field.get_default()
    return default if default is not None or model_field.null else ""


def _items(tasks: Any) -> Iterable[Path]:
    """The path of each task, grant, rule and trigger a file's ``tasks`` names, in the
    file's order (what is not a mapping or a list is left to the checks that say so)."""
    if not isinstance(tasks, dict):
        return
    for slug, task in tasks.items():
        yield ("tasks", slug)
        if not isinstance(task, dict):
            continue
        grants = task.get("grants")
        if isinstance(grants, dict):
            for tool, grant in grants.items():
                yield ("tasks", slug, "grants", tool)
                rules = grant.get("rules") if isinstance(grant, dict) else None
                if isinstance(rules, list):
                    for index in range(len(rules)):
                        yield ("tasks", slug, "grants", tool, "rules", index)
        triggers = task.get("triggers")
        if isinstance(triggers, dict):
            for name in triggers:
                yield ("tasks", slug, "triggers", name)


def tasks_import_plan(*, text: str, user: AbstractBaseUser | None = None) -> ImportPlan:
    """Read ``text`` and say what importing it would change. Raises AsCodeError with
    every fault found (nothing is written either way) and, when ``user`` is given,
    PermissionDenied when they may not make these changes in the admin."""
    if user is not None:
        # Before anything is read: a plan's diff, and its faults, say live values.
        user_may_see(user=user)
    data, marks = yaml_read(text)
    problems = Problems(marks)
    if not isinstance(data, dict):
        problems.add((), "the file is a mapping: version: 1, then tasks:")
        problems.raise_any()
    _unknown_keys(problems, (), data, ("version", "tasks"))
    version = data.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool)) or (
        version != FORMAT_VERSION
    ):
        problems.add(("version",), f"must be {FORMAT_VERSION} (this file format's version)")
    for count, where in enumerate(_items(data.get("tasks")), 1):
        if count > MAX_ITEMS:
            # Said alone and at once: nothing is looked up for a file this large.
            problems.found = []
            problems.add(
                where,
                f"the file names more than {MAX_ITEMS:,} tasks, grants, rules and triggers "
                "together: split it (a file may hold one task)",
                key=True,
            )
            problems.raise_any()
    tasks_data = data.get("tasks", {})
    if tasks_data is None:
        tasks_data = {}
    if not isinstance(tasks_data, dict):
        problems.add(("tasks",), "must be a mapping of task slug to task")
        tasks_data = {}
    plans = []
    for slug, task_data in tasks_data.items():
        plan = _task_plan(slug, task_data, problems)
        if plan is not None:
            plans.append(plan)
    problems.raise_any()
    untouched = list(
        Task.objects.exclude(slug__in=list(tasks_data))
        .order_by("slug")
        .values_list("slug", flat=True)
    )
    plan = ImportPlan(text=text, tasks=plans, untouched=untouched)
    if user is not None:
        user_check(user=user, plan=plan)
    return plan


def user_may_see(*, user: AbstractBaseUser) -> None:
    """As the admin: an active member of staff who may view tasks (``view_task``, or
    ``change_task``, which the admin takes for it)."""
    if not (user.is_active and getattr(user, "is_staff", False)):
        raise PermissionDenied(
            f"{user.get_username()} is not active staff: the admin would refuse them"
        )
    if not (user.has_perm("tasks.view_task") or user.has_perm("tasks.change_task")):
        raise PermissionDenied(
            f"{user.get_username()} may not make these changes: they need tasks.view_task or "
            "tasks.change_task, and may not see tasks without one"
        )


def user_check(*, user: AbstractBaseUser, plan: ImportPlan) -> None:
    """As the admin: an active member of staff holding each permission the changes need."""
    user_may_see(user=user)
    missing = sorted(perm for perm in plan.permissions() if not user.has_perm(perm))
    if missing:
        raise PermissionDenied(
            f"{user.get_username()} may not make these changes: they need {', '.join(missing)}"
        )


def _task_plan(slug: Any, data: Any, problems: Problems) -> TaskPlan | None:
    path: Path = ("tasks", slug)
    fault = _mapping_fault(data, "a task's fields")
    if fault:
        problems.add(path, fault)
        return None
    existing = (
        Task.objects.select_related("approver_group", "escalation_group").filter(slug=slug).first()
    )
    _unknown_keys(problems, path, data, TASK_KEYS)
    before = len(problems.found)
    for name in TASK_REQUIRED:
        if name not in data:
            problems.add(path, f"{name}: required", key=True)
    raw: dict[str, Any] = {}
    for name in TASK_FILE_FIELDS:
        model_field = Task._meta.get_field(name)
        value = data.get(name, _model_default(model_field) if name not in GROUP_FIELDS else None)
        fault = _type_fault(model_field, value)
        if fault:
            problems.add((*path, name), fault)
        raw[name] = value
    if len(problems.found) > before:
        return None
    # Groups by name, as a person picks them.
    form_data = {"slug": slug}
    for name in TASK_FILE_FIELDS:
        model_field = Task._meta.get_field(name)
        value = raw[name]
        if name in GROUP_FIELDS and value is not None:
            group = Group.objects.filter(name=value).first()
            if group is None:
                problems.add((*path, name), f"no group named {value!r}")
                continue
            value = group.pk
        form_data[name] = _form_datum(model_field, value)
    level = raw["autonomy_level"]
    if level not in AutonomyLevel.values:
        problems.add((*path, "autonomy_level"), f"must be one of {AutonomyLevel.values}")
        return None
    if existing is None:
        # A new task starts at most at Supervised, as the admin's add form makes it; a
        # higher level in the file is asked of the dial, where a second person confirms.
        form_data["autonomy_level"] = str(min(level, AutonomyLevel.SUPERVISED))
    # A fresh row for the form: it writes the cleaned values onto its instance.
    instance = Task.objects.get(pk=existing.pk) if existing is not None else Task()
    form = _task_form_class(new=existing is None)(data=form_data, instance=instance)
    if not form.is_valid():
        for name, messages in form.errors.items():
            where = (*path, name) if name in data else path
            for message in messages:
                problems.add(where, message, key=name not in data)
    if existing is None and form.cleaned_data.get("slug", slug) != slug:
        # The form trims it: made as "x", the file's "x " would be made again next time.
        problems.add(
            path, f"a slug has no spaces at its ends: write {form.cleaned_data['slug']!r}", key=True
        )
    plan = TaskPlan(slug=slug, existing=existing, form_values=form.cleaned_data)
    if form.errors:
        # The grants and triggers are still checked, so one reading says every fault.
        _grants_plan(plan, data.get("grants", {}), problems, (*path, "grants"))
        shaped = Task(slug=slug, input_schema=raw["input_schema"], pk=getattr(existing, "pk", None))
        _triggers_plan(plan, data.get("triggers", {}), problems, (*path, "triggers"), shaped)
        return None
    if existing is not None:
        _fields_diff(plan, raw, form, problems, path)
        if level != existing.autonomy_level:
            plan.autonomy_to = level
            plan.lines.append(
                f"autonomy_level: {value_shown(Task, 'autonomy_level', existing.autonomy_level)} → "
                f"{value_shown(Task, 'autonomy_level', level)}"
                + (
                    " (waits for a second person" + _already_waiting_dial(existing, level) + ")"
                    if level > max(existing.autonomy_level, 1)
                    else ""
                )
            )
    else:
        plan.lines.append(f"new task {raw['name']!r}")
        if level > AutonomyLevel.SUPERVISED:
            plan.autonomy_to = level
            plan.lines.append(
                f"autonomy_level: made at {AutonomyLevel.SUPERVISED.label}, then "
                f"{AutonomyLevel(level).label} asked of a second person"
            )
    _grants_plan(plan, data.get("grants", {}), problems, (*path, "grants"))
    # The triggers are checked against the task as the file leaves it (its input schema).
    shaped = Task(**{k: v for k, v in form.cleaned_data.items() if k in ("slug", "input_schema")})
    if existing is not None:
        shaped.pk = existing.pk
    _triggers_plan(plan, data.get("triggers", {}), problems, (*path, "triggers"), shaped)
    return plan


def _fields_diff(plan: TaskPlan, raw: dict, form: Any, problems: Problems, path: Path) -> None:
    task = plan.existing
    for name in TASK_FILE_FIELDS:
        if name == "autonomy_level":
            continue
        before = field_value(task, name)
        if name in GROUP_FIELDS:
            group = getattr(task, name)
            if (group.name if group else None) == raw[name]:
                continue
        elif values_equal(Task, name, before, value_plain(raw[name])):
            # As written, it is what is live: the form's trimming does not make a change.
            continue
        if name == "max_live_runs":
            problems.add(
                (*path, name),
                f"is {before} live, and no page changes it yet (it is not governed): "
                "leave it as exported",
            )
            continue
        after = value_plain(form.cleaned_data[name])
        if values_equal(Task, name, before, after):
            continue
        plan.values[name] = form.cleaned_data[name]
        why = governance.task_field_widening(name, before, after)
        plan.lines.append(
            f"{name}: {value_shown(Task, name, before)} → {value_shown(Task, name, after)}"
            + (f" (waits for a second person{_already_waiting(task, name, after)})" if why else "")
        )


def _already_waiting(task: Task, name: str, after: Any) -> str:
    """Whether a change asking the same waits already: importing again asks anew (the
    governance supersedes the older request), which the person should know."""
    for change in ConfigChange.objects.filter(task=task, status=ConfigChange.Status.PENDING):
        for op in change.operations:
            if (
                op["op"] == "set"
                and op["field"] == name
                and values_equal(Task, name, op["after"], after)
            ):
                return f"; change #{change.pk} asks it already, and this asks again"
    return ""


def _already_waiting_dial(task: Task, level: int) -> str:
    change = AutonomyChange.objects.filter(
        task=task, status=AutonomyChange.Status.PENDING, to_level=level
    ).first()
    return f"; autonomy change #{change.pk} asks it already, and this asks again" if change else ""


def _rules_read(value: Any, problems: Problems, path: Path) -> list[dict[str, Any]] | None:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, "must be a list of rules")
        return None
    rules = []
    all_ok = True
    for index, rule in enumerate(value):
        where = (*path, index)
        ok = True
        if not isinstance(rule, dict):
            problems.add(where, "must be a mapping: effect, expression, description, position")
            all_ok = False
            continue
        _unknown_keys(problems, where, rule, RULE_KEYS)
        plain = {
            "position": rule.get("position", index),
            "effect": rule.get("effect"),
            "expression": rule.get("expression"),
            "description": rule.get("description", ""),
        }
        for name, value_ in plain.items():
            fault = _type_fault(GrantRule._meta.get_field(name), value_)
            if value_ is None and name in ("effect", "expression"):
                fault = "required"
            if fault:
                problems.add((*where, name), fault, key=name not in rule)
                ok = all_ok = False
        if not ok:
            continue
        try:
            # The rule's own checks, as the grant's page runs them (its clean parses the
            # CEL expression), the grant being the one thing not known yet.
            GrantRule(**plain).full_clean(exclude=["grant"])
        except ValidationError as error:
            for name, messages in error.message_dict.items():
                for message in messages:
                    problems.add((*where, name), message, key=name not in rule)
            all_ok = False
            continue
        rules.append(plain)
    return rules if all_ok else None


def _grants_plan(plan: TaskPlan, grants: Any, problems: Problems, path: Path) -> None:
    if grants is None:
        grants = {}
    if not isinstance(grants, dict):
        problems.add(path, "must be a mapping of tool name to grant")
        return
    wanted: dict[str, tuple[Tool, list[dict[str, Any]]]] = {}
    for tool_name, grant in grants.items():
        where = (*path, tool_name)
        tool = Tool.objects.filter(name=tool_name).first()
        if tool is None:
            problems.add(where, f"no tool named {tool_name!r}", key=True)
            continue
        if grant is None:
            grant = {}
        if not isinstance(grant, dict):
            problems.add(where, "must be a mapping (rules: [...])")
            continue
        _unknown_keys(problems, where, grant, GRANT_KEYS)
        rules = _rules_read(grant.get("rules", []), problems, (*where, "rules"))
        if rules is not None:
            wanted[tool_name] = (tool, rules)
    live = {}
    if plan.existing is not None:
        live = {
            grant.tool.name: grant
            for grant in plan.existing.grants.select_related("tool").prefetch_related("rules")
        }
    for name, grant in sorted(live.items()):
        if name not in grants:
            plan.grants_removed.append(grant.pk)
            count = len(grant.rules.all())
            plan.lines.append(f"- grant {name}" + (f" and its {count} rule(s)" if count else ""))
    for name, (tool, rules) in sorted(wanted.items()):
        drafts = [RuleDraft(**rule) for rule in rules]
        if name not in live:
            plan.grants_added.append((tool, drafts))
            # Judged as the governance will judge it, at the task's level now (a new
            # task's, once it is made: the result says).
            waits = plan.existing is not None and governance.grant_add_widening(
                plan.existing, tool, rules
            )
            plan.lines.append(
                f"+ grant {name}"
                + (" with " + "; ".join(governance.rule_shown(r) for r in rules) if rules else "")
                + (" (waits for a second person)" if waits else "")
            )
            continue
        _rules_diff(plan, live[name], rules)


def _rules_diff(plan: TaskPlan, grant: ToolGrant, wanted: list[dict[str, Any]]) -> None:
    """Pair the file's rules with the grant's: the same in every field first, then the
    same effect and expression (a changed position or description), and what is left is
    removed or added. A rule's expression is never edited in place: the change is a
    removal and an addition, each judged by the governance as such."""
    left = list(grant.rules.all())
    unmatched = []
    for rule in wanted:
        same = next((r for r in left if governance.rule_plain(r) == rule), None)
        if same is not None:
            left.remove(same)
        else:
            unmatched.append(rule)
    added = []
    for rule in unmatched:
        similar = next(
            (r for r in left if (r.effect, r.expression) == (rule["effect"], rule["expression"])),
            None,
        )
        if similar is None:
            added.append(rule)
            continue
        left.remove(similar)
        plan.rules_changed.append(RuleDraft(**rule, rule_id=similar.pk))
        plan.lines.append(
            f"~ {grant.tool.name}: rule {governance.rule_shown(governance.rule_plain(similar))} "
            f"(position {similar.position}) → {governance.rule_shown(rule)} "
            f"(position {rule['position']})"
        )
    for rule in left:
        plan.rules_removed.append(rule.pk)
        plan.lines.append(
            f"- {grant.tool.name}: rule {governance.rule_shown(governance.rule_plain(rule))}"
        )
    for rule in added:
        plan.rules_added.append((grant.pk, RuleDraft(**rule)))
        plan.lines.append(f"+ {grant.tool.name}: rule {governance.rule_shown(rule)}")


def _json_same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _trigger_fault_at(where: Path, field_name: str, message: str, data: dict) -> tuple[Path, str]:
    """Where a trigger form's fault points in the file: ``config/expression: ...`` at
    the config's ``expression``, when the file has it there."""
    head, _, rest = message.partition(": ")
    parts = head.split("/")
    if rest and parts[0] == field_name:
        path: Path = (*where, *parts)
        value: Any = data
        for part in parts:
            if not isinstance(value, dict) or part not in value:
                return (*where, field_name) if field_name in data else where, message
            value = value[part]
        return path, rest
    return ((*where, field_name) if field_name in data else where), message


def _trigger_form_class(*, new: bool) -> type[TriggerForm]:
    # As the trigger admin: a trigger's task and kind are fixed once it is made; the task
    # is the one the file names it under.
    fields = [
        name for name in TriggerForm.Meta.fields if name != "task" and (new or name != "kind")
    ]
    return modelform_factory(Trigger, form=TriggerForm, fields=fields)


def _triggers_plan(
    plan: TaskPlan, triggers: Any, problems: Problems, path: Path, task: Task
) -> None:
    if triggers is None:
        triggers = {}
    if not isinstance(triggers, dict):
        problems.add(path, "must be a mapping of trigger name to trigger")
        return
    live: dict[str, Trigger] = {}
    if plan.existing is not None:
        for trigger in plan.existing.triggers.order_by("name", "pk"):
            if trigger.name in live:
                problems.add(
                    path,
                    f"the task has two triggers named {trigger.name!r}, and a file names "
                    "each once: rename one in the admin first",
                )
            live.setdefault(trigger.name, trigger)
    for name, data in triggers.items():
        where = (*path, name)
        fault = _mapping_fault(data, "kind, enabled, config, input_mapping, limits")
        if fault:
            problems.add(where, fault)
            continue
        _unknown_keys(problems, where, data, TRIGGER_FIELDS)
        values: dict[str, Any] = {}
        ok = True
        for field_name in TRIGGER_FIELDS:
            model_field = Trigger._meta.get_field(field_name)
            value = data.get(field_name, _model_default(model_field))
            if field_name == "kind" and "kind" not in data:
                problems.add(where, "kind: required (cron, webhook, queue or email)", key=True)
                ok = False
                continue
            fault = _type_fault(model_field, value)
            if field_name == "config" and not fault and not isinstance(value, dict):
                fault = "must be a mapping"
            if fault:
                problems.add((*where, field_name), fault)
                ok = False
            values[field_name] = value
        if not ok:
            continue
        existing = live.get(name)
        url = values["config"].get("url")
        if isinstance(url, str) and REDACTED in url:
            live_url = (existing.config or {}).get("url") if existing is not None else None
            if isinstance(live_url, str) and url_redacted(live_url) == url:
                values["config"] = {**values["config"], "url": live_url}  # keeps its password
            else:
                problems.add(
                    (*where, "config", "url"),
                    f"the URL's password is redacted ({REDACTED}): name it as "
                    "{secret:NAME}, read from the environment",
                )
                continue
        if existing is not None and values["kind"] != existing.kind:
            problems.add(
                (*where, "kind"),
                f"a trigger's kind is fixed once made (it is {existing.kind}): give the "
                "new one another name, and leave this one out to remove it",
            )
            continue
        # A fresh row for the form, which writes the cleaned values onto its instance.
        instance = Trigger.objects.get(pk=existing.pk) if existing is not None else Trigger()
        instance.task = task
        form_data = {
            "name": name,
            **{
                f: _form_datum(Trigger._meta.get_field(f), values[f])
                for f in TRIGGER_FIELDS
                if existing is None or f != "kind"
            },
        }
        form = _trigger_form_class(new=existing is None)(data=form_data, instance=instance)
        if not form.is_valid():
            for field_name, messages in form.errors.items():
                for message in messages:
                    target, said = _trigger_fault_at(where, field_name, message, data)
                    problems.add(target, said, key=target == where)
            continue
        cleaned = {f: form.cleaned_data[f] for f in TRIGGER_FIELDS if f in form.cleaned_data}
        if existing is None and form.cleaned_data["name"] != name:
            # The admin trims a name; kept as written, "hook " would sit beside "hook".
            problems.add(
                where,
                f"a trigger's name has no spaces at its ends: write {form.cleaned_data['name']!r}",
                key=True,
            )
            continue
        if existing is None:
            values.update(cleaned)  # as the admin saves them
            plan.triggers.append(TriggerPlan(name, "add", None, values, []))
            said = f"+ trigger {name!r} ({values['kind']}"
            said += ", disabled)" if not values["enabled"] else ")"
            if values["kind"] == Trigger.Kind.WEBHOOK:
                said += ": a new signing secret is made"
            plan.lines.append(said)
            continue
        changes, changed = [], {}
        for field_name in TRIGGER_FIELDS[1:]:
            before = getattr(existing, field_name)
            # As written, it is what is live: the form's trimming does not make a change.
            if _json_same(before, values[field_name]) or _json_same(before, cleaned[field_name]):
                continue
            changed[field_name] = after = cleaned[field_name]
            changes.append(f"{field_name}: {value_said(before)} → {value_said(after)}")
        if changes:
            plan.triggers.append(TriggerPlan(name, "change", existing, changed, changes))
            plan.lines += [f"~ trigger {name!r}: {line}" for line in changes]
    for name, trigger in sorted(live.items()):
        if name in triggers:
            continue
        if trigger.firings.exists():
            problems.add(
                path,
                f"the trigger {name!r} is left out, but it has firings (the record of what "
                "it started): it cannot be removed. Keep it with enabled: false",
            )
            continue
        plan.triggers.append(TriggerPlan(name, "remove", trigger, {}, []))
        plan.lines.append(f"- trigger {name!r} ({trigger.kind})")


# Applying ----------------------------------------------------------------------------


def tasks_import_apply(*, plan: ImportPlan, user: AbstractBaseUser) -> ImportResult:
    """Apply ``plan`` as ``user``, in one transaction: the file is read again against
    what is live now, and refused if that changed what it would do (plan again). What
    widens waits for a second person; the result names each such change's id."""
    if user is None or not user.is_authenticated:
        raise PermissionDenied("an import is made by a person: name the user")
    result = ImportResult()
    try:
        with transaction.atomic():
            # Each task named is locked, so nothing moves between the check and the write.
            list(
                Task.objects.select_for_update()
                .filter(slug__in=[task.slug for task in plan.tasks])
                .values_list("pk", flat=True)
            )
            fresh = tasks_import_plan(text=plan.text, user=user)
            if fresh.digest != plan.digest:
                raise AsCodeError(
                    [Problem(1, 1, "", "what is live changed since this plan was made: plan again")]
                )
            for task_plan in fresh.tasks:
                if task_plan.changed:
                    _task_apply(task_plan, user=user, result=result)
    except (governance.GovernanceError, DialError) as error:
        raise AsCodeError([Problem(1, 1, "", f"nothing was applied: {error}")]) from None
    except DatabaseError as error:
        # The transaction is rolled back whole; said as any refusal is. One cause known:
        # a firing arriving between the check and the removal of its trigger
        # (ProtectedError). The first line only: a database's detail can quote values.
        said = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise AsCodeError(
            [
                Problem(
                    1, 1, "", f"nothing was applied: the database refused it ({said}): plan again"
                )
            ]
        ) from None
    return result


def _task_apply(plan: TaskPlan, *, user: AbstractBaseUser, result: ImportResult) -> None:
    task = plan.existing
    if task is None:
        # As the admin's add form: made with its fields, at most Supervised, recorded.
        values = {k: v for k, v in plan.form_values.items()}
        task = Task.objects.create(**values)
        governance.object_created(target=task, user=user, note=NOTE)
        result.applied.append(f"{task.slug}: made")
    reason = f"{NOTE} by {user.get_username()}"
    # Lowering the dial first: a grant is then judged at the level it will run at.
    # Raising it last: a grant applied withdraws the dial's waiting requests.
    lowering = plan.autonomy_to is not None and plan.autonomy_to < task.autonomy_level
    if lowering:
        autonomy_request(task=task, to_level=plan.autonomy_to, user=user, reason=reason)
        result.applied.append(f"{task.slug}: autonomy_level → {plan.autonomy_to}")
        task.refresh_from_db()
    submission = governance.task_change_submit(
        task=task,
        user=user,
        values=plan.values,
        grants_added=plan.grants_added,
        grants_removed=plan.grants_removed,
        rules_added=plan.rules_added,
        rules_changed=plan.rules_changed,
        rules_removed=plan.rules_removed,
        note=NOTE,
    )
    result.applied += [f"{task.slug}: {governance.op_line(Task, op)}" for op in submission.applied]
    if submission.held is not None:
        result.pending.append(
            Pending(task.slug, "config", submission.held.pk, submission.held_lines)
        )
    task.refresh_from_db()
    if plan.autonomy_to is not None and not lowering and plan.autonomy_to != task.autonomy_level:
        change = autonomy_request(task=task, to_level=plan.autonomy_to, user=user, reason=reason)
        if change.status == change.Status.PENDING:
            result.pending.append(
                Pending(
                    task.slug,
                    "autonomy",
                    change.pk,
                    [f"autonomy_level: {change.from_level} → {change.to_level}"],
                )
            )
        else:
            result.applied.append(f"{task.slug}: autonomy_level → {change.to_level}")
    for trigger_plan in plan.triggers:
        _trigger_apply(trigger_plan, task=task, user=user, result=result)
    task_version_current(task=task, user=user)


def _trigger_apply(
    plan: TriggerPlan, *, task: Task, user: AbstractBaseUser, result: ImportResult
) -> None:
    """As the trigger admin writes a trigger, and recorded as it records one. Triggers are
    not governed as widening (there is no second person for them, there or here)."""
    if plan.action == "remove":
        trigger = plan.existing
        trigger_recorded(trigger=trigger, user=user, what=f"deleted ({NOTE})")
        trigger.delete()
        result.applied.append(f"{task.slug}: trigger {plan.name!r} removed")
        return
    if plan.action == "add":
        trigger = Trigger(task=task, name=plan.name, **{k: plan.values[k] for k in TRIGGER_FIELDS})
        if trigger.kind == Trigger.Kind.WEBHOOK:
            trigger.secret = secret_new()
        trigger.save()
        trigger_recorded(
            trigger=trigger,
            user=user,
            what=f"added ({NOTE}): config {value_said(trigger.config)}, mapping "
            f"{trigger.input_mapping!r}, enabled {trigger.enabled}, limits "
            f"{trigger.max_per_minute}/min {trigger.max_per_hour}/h",
        )
        result.applied.append(f"{task.slug}: trigger {plan.name!r} added")
        if trigger.secret:
            result.notes.append(
                f"{task.slug}: the webhook {plan.name!r} has a new signing secret "
                f"(fingerprint {secret_fingerprint(trigger.secret)}); it is never exported "
                "or printed: rotate it on the trigger's admin page to see one"
            )
        return
    # Only what changed is written: the fields the file left as they are stay so.
    trigger = Trigger.objects.select_for_update().get(pk=plan.existing.pk)
    for name, value in plan.values.items():
        setattr(trigger, name, value)
    trigger.save(update_fields=[*plan.values, "updated_at"])
    trigger_recorded(trigger=trigger, user=user, what=f"changed ({NOTE}): " + "; ".join(plan.lines))
    result.applied += [f"{task.slug}: trigger {plan.name!r}: {line}" for line in plan.lines]
