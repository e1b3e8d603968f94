"""Governed configuration (guarantee 9): every change to a task, its grants and their
rules, or a tool is recorded in a trail; a change that lets more run without a person
takes effect only when a second person confirms it, as raising the autonomy dial does.

A change arrives as the values wanted (``task_change_submit``, ``tool_change_submit``).
Each field, grant and rule that differs becomes one *operation*, holding the value it
replaces. Operations that narrow what runs unattended, or leave it as it was, apply at
once; those that widen it wait in one ``ConfigChange`` for a second person
(``config_change_decide``). Both are written in one transaction with the trail event that
describes them: a task's changes (grants and rules included) in the task's trail
(``tasks.autonomy.task_trail_uuid``), a tool's in the tool's (``tool_trail_uuid``).

What widens, and why, is in ``task_field_widening``, ``tool_field_widening``,
``grant_add_widening`` (with ``grant_rules_missing``) and ``rule_op_widening``; docs/
say it for operators. Writes made by the deployment's own code (``load_demo``, fixtures,
``tools_sync``, management commands) do not pass through here: whoever can run them can
write the database anyway; except ``import_tasks`` (tasks.as_code), which submits as the
person it names, so a file in version control is governed as the admin is.
They may record what they did (``tool_changes_record``, ``config_record``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.utils import timezone
from django.utils.text import capfirst

from agentops.runtime.gates import Verdict, gate_decide
from agentops.states import Transitions
from lineage.models import LineageEvent
from lineage.services import event_append
from tasks.autonomy import TRAIL_NAMESPACE, requests_withdraw, task_trail_uuid
from tasks.models import (
    AutonomyLevel,
    ConfigChange,
    GrantRule,
    SideEffect,
    Task,
    TaskVersion,
    Tool,
    ToolGrant,
)
from tasks.services import actor_for, task_version_current

CONFIG_CHANGE = Transitions(
    "configuration change",
    {
        "pending": {"applied", "rejected", "superseded"},
        "applied": set(),
        "rejected": set(),
        "superseded": set(),
    },
)

# The fields a person edits. The dial (autonomy_level) turns only through
# tasks.autonomy, where raising it has its own second person.
TASK_FIELDS = (
    "name",
    "slug",
    "description",
    "objective_template",
    "instructions",
    "input_schema",
    "example_input",
    "model",
    "self_check",
    "confidence_threshold",
    "approver_group",
    "four_eyes",
    "approval_timeout_minutes",
    "on_approval_expiry",
    "escalation_group",
    "step_down_rejections",
    "max_steps",
    "max_tokens",
    "max_seconds",
    "max_spend",
    "on_budget_breach",
    "loop_repeat_limit",
    "stall_limit",
    "on_loop",
    "model_max_attempts",
)
TOOL_FIELDS = (
    "name",
    "kind",
    "description",
    "input_schema",
    "side_effect",
    "idempotency",
    "always_approve",
    "retry_max_attempts",
    "retry_backoff_seconds",
    "available",
    "config",
    "timeout_seconds",
)
RULE_FIELDS = ("position", "effect", "expression", "description")
SIDE_EFFECT_RANK = {SideEffect.READ: 0, SideEffect.REVERSIBLE: 1, SideEffect.IRREVERSIBLE: 2}


class GovernanceError(Exception):
    """The change cannot be made or decided so; the message says why. Nothing was written."""


def tool_trail_uuid(tool: Tool | int) -> uuid.UUID:
    """A tool's own trail, hash-chained like a run's; it outlives the tool's row."""
    pk = tool.pk if isinstance(tool, Tool) else tool
    return uuid.uuid5(TRAIL_NAMESPACE, f"tool:{pk}")


def trail_for(change: ConfigChange) -> uuid.UUID:
    return task_trail_uuid(change.task) if change.task_id else tool_trail_uuid(change.tool_id)


def tool_name_pinned_by(name: str) -> str:
    """Why a tool may not take the name ``name`` ("" when it may): a task version names
    its tools by name, and a run pinned to it calls whichever tool bears that name, so a
    new or renamed tool taking it would be granted to those runs with no one's say."""
    candidates = TaskVersion.objects.filter(definition__tools__icontains=name).select_related(
        "task"
    )
    for version in candidates.only("number", "definition", "task__slug"):
        if name in version.definition.get("tools", []):
            return (
                f"{version.task.slug} v{version.number} names a tool {name!r}, and its runs "
                "would call this one: choose another name"
            )
    return ""


# Values ------------------------------------------------------------------------------


def value_plain(value: Any) -> Any:
    """A field's value as the trail and a pending change keep it: plain JSON."""
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, models.Model):
        return value.pk
    return value


def field_value(obj: models.Model, name: str) -> Any:
    """The value of ``name`` on ``obj``, a foreign key as its id, plain JSON."""
    model_field = obj._meta.get_field(name)
    return value_plain(getattr(obj, model_field.attname))


def values_equal(model: type[models.Model], name: str, a: Any, b: Any) -> bool:
    model_field = model._meta.get_field(name)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(model_field, models.JSONField):
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return model_field.to_python(a) == model_field.to_python(b)


def value_shown(model: type[models.Model], name: str, value: Any) -> str:
    """A value as a person reads it in a summary line."""
    model_field = model._meta.get_field(name)
    if value is None or value == "":
        return "(none)" if isinstance(model_field, models.ForeignKey) else "(blank)"
    if isinstance(model_field, models.ForeignKey) and model_field.related_model is Group:
        group = Group.objects.filter(pk=value).first()
        return f"group {group.name!r}" if group else f"group #{value}"
    if isinstance(value, bool):
        return "on" if value else "off"
    if model_field.choices:
        return str(dict(model_field.flatchoices).get(value, value))
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:79] + "…"


def field_label(model: type[models.Model], name: str) -> str:
    return capfirst(str(model._meta.get_field(name).verbose_name))


# What widens -------------------------------------------------------------------------


def _raised(before: Any, after: Any, *, off: Any) -> bool:
    """A limit raised, or lifted (``off``: the value meaning no limit)."""
    if before == off:
        return False
    return after == off or after > before


def task_field_widening(name: str, before: Any, after: Any) -> str:
    """Why changing a task's field from ``before`` to ``after`` lets more run without a
    person ("" when it does not). Budgets and loop limits bound how much an unattended
    run may do, so raising them widens it; the objective, instructions, model and input
    schema change what the agent attempts, not what it may do unattended (every call
    still passes the grant, the rules and the gate), so they apply at once."""
    if name == "four_eyes" and before and not after:
        return "four eyes turned off: whoever started a run may approve its calls"
    if name == "approver_group" and before is not None and after != before:
        return "the approver group changed: other people may decide the task's approvals"
    if name == "escalation_group" and after is not None and after != before:
        return "the escalation group changed: other people may decide expired approvals"
    if name == "on_approval_expiry" and after == "escalate" and before != "escalate":
        return "expired approvals pass to the escalation group, who may approve them"
    if name == "confidence_threshold" and after < before:
        return "the confidence threshold lowered: more reversible calls run by themselves"
    if name == "self_check" and before and not after:
        return "the self-check turned off: no outcome is held for a person's review"
    if name == "step_down_rejections" and _raised(before, after, off=0):
        return "the dial steps down later after rejections, or never"
    # A budget left blank is no limit.
    budgets = ("max_steps", "max_tokens", "max_seconds", "max_spend")
    if (
        name in budgets
        and before is not None
        and (after is None or Decimal(str(after)) > Decimal(str(before)))
    ):
        return f"the budget '{field_label(Task, name)}' raised or lifted"
    if name in ("loop_repeat_limit", "stall_limit") and _raised(before, after, off=0):
        what = Task._meta.get_field(name).verbose_name
        return f"the {what} raised or turned off: a loop runs longer"
    return ""


def tool_field_widening(name: str, before: Any, after: Any) -> str:
    """Why changing a tool's field lets more run without a person ("" when it does not).
    The tool's config (what it reaches) and input schema (what arguments pass) cannot be
    proved narrower by looking, so any change to them is treated as widening."""
    if name == "side_effect" and SIDE_EFFECT_RANK[after] < SIDE_EFFECT_RANK[before]:
        return f"the side-effect class lowered from {before} to {after}: the gate holds it less"
    if name == "always_approve" and before and not after:
        return "'always approve' turned off: its calls no longer always wait for a person"
    if name == "available" and after and not before:
        return "the tool made available again"
    if name == "idempotency" and after == Tool.Idempotency.KEY and before != after:
        return "marked idempotent: an interrupted call is retried by itself, not shown to a person"
    if name == "kind" and after != before:
        return "the tool's kind changed"
    if name == "config" and after != before:
        return "the tool's config changed: what it reaches cannot be proved narrower"
    if name == "input_schema" and after != before:
        return "the input schema changed: what passes it cannot be proved narrower"
    return ""


def grant_add_widening(task: Task, tool: Tool, rules: Sequence[dict[str, Any]] = ()) -> str:
    """Why granting ``tool`` to ``task`` with ``rules`` lets more run without a person
    ("" when it does not). Two ways:

    - some call of it would run without a person at the task's level (read-only calls
      run at every level; judged whatever the level, not only at Guarded and above);
    - the tool was granted to the task before, and the new grant carries fewer rules
      than the last grant had when it was removed (``grant_rules_missing``). Removing a
      grant narrows and applies at once; without this, granting the tool again with no
      rules would drop a deny or approve rule with no second person, which removing the
      rule itself never does.

    A first grant of a tool that does not run unattended applies at once: it lets no
    call through that a rule ever stopped."""
    reasons = []
    decision = gate_decide(
        autonomy_level=task.autonomy_level,
        side_effect=tool.side_effect,
        always_approve=tool.always_approve,
        confidence=1.0,
    )
    if decision.verdict is Verdict.RUN:
        level = AutonomyLevel(task.autonomy_level).label
        reasons.append(
            f"granted at {level}, where its {tool.side_effect} calls run without a person"
        )
    removed = grant_rules_last_removed(task=task, tool=tool)
    if removed is not None:
        missing = grant_rules_missing(before=removed, after=rules)
        if missing:
            reasons.append("granted again with less than its last grant: " + "; ".join(missing))
    return "; ".join(reasons)


def grant_rules_last_removed(*, task: Task, tool: Tool) -> list[dict[str, Any]] | None:
    """The rules the task's last grant of the tool carried when it was removed, read
    back from the task's trail (the ``grant_remove`` operation records them); None when
    the task never had a grant of it removed. The trail, not a table: grants and rules
    are deleted with the grant, and the trail is what no one can change. A grant of
    another tool by the same name counts too: runs find their tools by name, and a
    tool deleted and made again is a new row (at worst a grant waits that need not)."""
    events = LineageEvent.objects.filter(
        run_uuid=task_trail_uuid(task), kind="config.changed"
    ).order_by("-seq")
    for event in events.only("payload", "canonical", "hash_version").iterator():
        body = event.body
        if not isinstance(body, dict):
            body = event.payload
        for op in reversed(body.get("changes") or []):
            if (
                isinstance(op, dict)
                and op.get("op") == "grant_remove"
                and (op.get("tool") == tool.pk or op.get("tool_name") == tool.name)
            ):
                return [rule_plain(rule) for rule in op.get("rules") or []]
    return None


def grant_rules_missing(
    *, before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]
) -> list[str]:
    """What a grant with rules ``after`` lets through that one with ``before`` did not,
    judged by effect and expression as written (an expression cannot be proved
    narrower by looking at it, as in ``rule_op_widening``): a deny rule not carried
    over; an approve rule carried over as neither approve nor deny; allow rules dropped
    (every call then allowed) or an allow rule that was not there (more calls match).
    Positions and descriptions do not change which calls match. Empty: no wider."""

    def expressions(rules: Sequence[dict[str, Any]], *effects: str) -> set[str]:
        return {rule["expression"] for rule in rules if rule["effect"] in effects}

    missing = [
        f"deny `{expression}`"
        for expression in sorted(expressions(before, "deny") - expressions(after, "deny"))
    ]
    missing += [
        f"approve `{expression}`"
        for expression in sorted(
            expressions(before, "approve") - expressions(after, "approve", "deny")
        )
    ]
    allows_before, allows_after = expressions(before, "allow"), expressions(after, "allow")
    if allows_before and not allows_after:
        missing.append("its allow rules (every call is allowed without them)")
    elif allows_before:
        missing += [
            f"allow `{expression}` added (more calls match one)"
            for expression in sorted(allows_after - allows_before)
        ]
    return missing


def rule_op_widening(op: dict[str, Any], untouched_allows: int) -> str:
    """Why a rule operation widens (see agentops.runtime.rules: deny wins over approve,
    approve over allow; where a grant has allow rules, a call must match one of them).
    ``untouched_allows``: the grant's allow rules this change leaves as they are."""
    kind = op["op"]
    if kind == "rule_add":
        if op["rule"]["effect"] == "allow" and op["allows_before"]:
            return "an allow rule added beside others: more calls match one"
        return ""
    if kind == "rule_remove":
        effect = op["before"]["effect"]
        if effect in ("deny", "approve"):
            return f"a {effect} rule removed"
        if not untouched_allows:
            return "the last allow rule removed: every call is allowed"
        return ""
    before, after = op["before"], op["after"]
    if before["expression"] == after["expression"]:
        if after["effect"] == before["effect"]:
            return ""  # position or description: neither changes which calls match
        if (before["effect"], after["effect"]) == ("approve", "deny"):
            return ""  # the calls it held for a person are refused now
        # allow -> approve or deny takes the rule out of the allow set, which can leave
        # none: every other call allowed. deny -> approve lets a person pass them.
        return f"a rule's effect changed from {before['effect']} to {after['effect']}"
    # A changed expression cannot be proved narrower by looking at it.
    return f"a {before['effect']} rule's expression changed"


# Operations --------------------------------------------------------------------------


def rule_plain(rule: GrantRule | dict[str, Any]) -> dict[str, Any]:
    if isinstance(rule, dict):
        return {name: rule.get(name, 0 if name == "position" else "") for name in RULE_FIELDS}
    return {name: getattr(rule, name) for name in RULE_FIELDS}


def rule_shown(rule: dict[str, Any]) -> str:
    what = f" ({rule['description']})" if rule.get("description") else ""
    return f"{rule['effect']} `{rule['expression']}`{what}"


def op_line(model: type[models.Model], op: dict[str, Any]) -> str:
    """One operation as a person reads it: what, before -> after."""
    kind = op["op"]
    if kind == "set":
        name = op["field"]
        before = value_shown(model, name, op["before"])
        after = value_shown(model, name, op["after"])
        return f"{field_label(model, name)}: {before} -> {after}"
    tool = op.get("tool_name", "")
    if kind == "grant_add":
        rules = "; ".join(rule_shown(rule) for rule in op.get("rules", []))
        return f"grant {tool}" + (f" with rules: {rules}" if rules else "")
    if kind == "grant_remove":
        return f"remove the grant of {tool}" + (
            f" and its {len(op['rules'])} rule(s)" if op.get("rules") else ""
        )
    if kind == "rule_add":
        return f"{tool}: add rule {rule_shown(op['rule'])}"
    if kind == "rule_remove":
        return f"{tool}: remove rule {rule_shown(op['before'])}"
    if kind == "rule_change":
        return f"{tool}: rule {rule_shown(op['before'])} -> {rule_shown(op['after'])}"
    return kind


@dataclass(frozen=True)
class RuleDraft:
    """A rule as the form has it: for a rule that exists, its id."""

    position: int
    effect: str
    expression: str
    description: str = ""
    rule_id: int | None = None

    def plain(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "effect": self.effect,
            "expression": self.expression,
            "description": self.description,
        }


@dataclass
class Submission:
    """What a submitted change did: the operations applied at once, and the change that
    waits for a second person (None when nothing widened)."""

    applied: list[dict[str, Any]] = field(default_factory=list)
    held: ConfigChange | None = None
    new_grants: list[ToolGrant] = field(default_factory=list)

    @property
    def held_lines(self) -> list[str]:
        return self.held.summary.splitlines() if self.held else []


def _set_ops(
    obj: models.Model, names: Iterable[str], values: dict[str, Any], widening: Any
) -> list[dict[str, Any]]:
    model = type(obj)
    ops = []
    for name in names:
        if name not in values:
            continue
        before, after = field_value(obj, name), value_plain(values[name])
        if values_equal(model, name, before, after):
            continue
        why = widening(name, before, after)
        ops.append({"op": "set", "field": name, "before": before, "after": after, "why": why})
    return ops


def _rule_ops(
    task: Task,
    *,
    grants_removed: Sequence[int],
    rules_added: Sequence[tuple[int, RuleDraft]],
    rules_changed: Sequence[RuleDraft],
    rules_removed: Sequence[int],
) -> list[dict[str, Any]]:
    """The rule operations, each judged against the grant's rules as they stand."""
    grant_ids = {grant_id for grant_id, _ in rules_added}
    existing = {
        rule.pk: rule
        for rule in GrantRule.objects.filter(grant__task=task).select_related("grant__tool")
    }
    for rule_id in [*rules_removed, *(draft.rule_id for draft in rules_changed)]:
        if rule_id not in existing:
            raise GovernanceError(f"rule #{rule_id} is not one of {task.slug}'s rules")
    grants = {
        grant.pk: grant
        for grant in ToolGrant.objects.filter(task=task, pk__in=grant_ids).select_related("tool")
    }
    for grant_id in grant_ids - set(grants):
        raise GovernanceError(f"grant #{grant_id} is not one of {task.slug}'s grants")
    ops: list[dict[str, Any]] = []
    for rule_id in rules_removed:
        rule = existing[rule_id]
        if rule.grant_id in grants_removed:
            continue  # removed with its grant
        ops.append(
            {
                "op": "rule_remove",
                "grant": rule.grant_id,
                "tool_name": rule.grant.tool.name,
                "rule_id": rule_id,
                "before": rule_plain(rule),
            }
        )
    for draft in rules_changed:
        rule = existing[draft.rule_id]
        before, after = rule_plain(rule), draft.plain()
        if before == after or rule.grant_id in grants_removed:
            continue
        ops.append(
            {
                "op": "rule_change",
                "grant": rule.grant_id,
                "tool_name": rule.grant.tool.name,
                "rule_id": rule.pk,
                "before": before,
                "after": after,
            }
        )
    allows_by_grant: dict[int, list[int]] = {}
    for rule in existing.values():
        if rule.effect == "allow":
            allows_by_grant.setdefault(rule.grant_id, []).append(rule.pk)
    for grant_id, draft in rules_added:
        ops.append(
            {
                "op": "rule_add",
                "grant": grant_id,
                "tool_name": grants[grant_id].tool.name,
                "rule": draft.plain(),
                "allows_before": len(allows_by_grant.get(grant_id, [])),
            }
        )
    touched = {op["rule_id"] for op in ops if "rule_id" in op}
    for op in ops:
        untouched = [pk for pk in allows_by_grant.get(op["grant"], []) if pk not in touched]
        op["why"] = rule_op_widening(op, len(untouched))
    return ops


def _supersede_stale(target: Task | Tool, *, keys: set[tuple], actor: str) -> list[int]:
    """Inside a transaction: close the target's pending changes that no longer apply, or
    that touch what a newer request (``keys``) asks for. Returns their ids."""
    pending = ConfigChange.objects.select_for_update().filter(
        status=ConfigChange.Status.PENDING,
        **({"task": target} if isinstance(target, Task) else {"tool": target}),
    )
    closed = []
    for change in pending:
        stale = change_staleness(change)
        overlap = keys & {op_key(op) for op in change.operations}
        if not stale and not overlap:
            continue
        why = stale or "a newer request asks to change the same thing"
        _status_move(change, to=ConfigChange.Status.SUPERSEDED, reason=why)
        event_append(
            run_uuid=trail_for(change),
            kind="config.superseded",
            actor=actor,
            payload={"change": change.pk, "reason": why},
        )
        closed.append(change.pk)
    return closed


def op_key(op: dict[str, Any]) -> tuple:
    """What an operation touches: two requests touching the same thing do not both wait."""
    if op["op"] == "set":
        return ("field", op["field"])
    if op["op"] in ("grant_add", "grant_remove"):
        return ("grant", op["tool_name"])
    if op["op"] == "rule_add":
        return ("rule_add", op["grant"], json.dumps(op["rule"], sort_keys=True))
    return ("rule", op["rule_id"])


def _status_move(change: ConfigChange, *, to: str, reason: str = "", user=None) -> None:
    CONFIG_CHANGE.check(change.status, to)
    change.status = to
    change.reason = reason
    change.decided_at = timezone.now()
    change.decided_by = user
    change.save(update_fields=["status", "reason", "decided_at", "decided_by"])


# Applying ----------------------------------------------------------------------------


def op_apply(target: Task | Tool, op: dict[str, Any]) -> ToolGrant | None:
    """Write one operation. The caller holds the target's row lock."""
    kind = op["op"]
    if kind == "set":
        model_field = type(target)._meta.get_field(op["field"])
        value = op["after"]
        if value is not None and not isinstance(model_field, models.JSONField):
            value = model_field.to_python(value)
        setattr(target, model_field.attname, value)
        target.save(update_fields=[op["field"], "updated_at"])
    elif kind == "grant_add":
        grant = ToolGrant.objects.create(task=target, tool_id=op["tool"])
        for rule in op.get("rules", []):
            GrantRule.objects.create(grant=grant, **rule_plain(rule))
        return grant
    elif kind == "grant_remove":
        ToolGrant.objects.filter(pk=op["grant"]).delete()  # its rules go with it
    elif kind == "rule_add":
        GrantRule.objects.create(grant_id=op["grant"], **rule_plain(op["rule"]))
    elif kind == "rule_remove":
        GrantRule.objects.filter(pk=op["rule_id"]).delete()
    elif kind == "rule_change":
        GrantRule.objects.filter(pk=op["rule_id"]).update(**rule_plain(op["after"]))
    return None


def op_staleness(target: Task | Tool, op: dict[str, Any]) -> str:
    """Why ``op`` no longer applies to the target as it is now ("" when it does)."""
    model = type(target)
    kind = op["op"]
    if kind == "set":
        now = field_value(target, op["field"])
        if not values_equal(model, op["field"], now, op["before"]):
            return (
                f"{field_label(model, op['field'])} is now {value_shown(model, op['field'], now)}, "
                f"not {value_shown(model, op['field'], op['before'])} as when it was asked"
            )
        return ""
    if kind == "grant_add":
        if ToolGrant.objects.filter(task=target, tool_id=op["tool"]).exists():
            return f"{op['tool_name']} was granted meanwhile"
        tool = Tool.objects.filter(pk=op["tool"]).first()
        if tool is None:
            return f"the tool {op['tool_name']} is gone"
        if (tool.side_effect, tool.always_approve) != (
            op.get("side_effect", tool.side_effect),
            op.get("always_approve", tool.always_approve),
        ):
            return f"the tool {op['tool_name']}'s side effect or 'always approve' changed"
        return ""
    if kind in ("grant_remove", "rule_add"):
        if not ToolGrant.objects.filter(pk=op["grant"], task=target).exists():
            return f"the grant of {op['tool_name']} is gone"
        return ""
    rule = GrantRule.objects.filter(pk=op["rule_id"], grant__task=target).first()
    if rule is None:
        return f"the rule {rule_shown(op['before'])} of {op['tool_name']} is gone"
    if rule_plain(rule) != op["before"]:
        return (
            f"the rule {rule_shown(op['before'])} of {op['tool_name']} was changed meanwhile "
            f"(it is {rule_shown(rule_plain(rule))})"
        )
    return ""


def change_staleness(change: ConfigChange) -> str:
    target = change.target
    target.refresh_from_db()
    for op in change.operations:
        stale = op_staleness(target, op)
        if stale:
            return stale
    return ""


def _ops_recorded(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Operations as the trail keeps them (the judging's scratch values left out)."""
    return [{key: value for key, value in op.items() if key != "allows_before"} for op in ops]


def _submit(
    *,
    target: Task | Tool,
    ops: list[dict[str, Any]],
    user: AbstractBaseUser | None,
    note: str = "",
) -> Submission:
    """Inside a transaction holding the target's lock: apply what does not widen, hold
    what does, record both."""
    model = type(target)
    trail = task_trail_uuid(target) if model is Task else tool_trail_uuid(target)
    actor = actor_for(user)
    at_once = [op for op in ops if not op["why"]]
    widening = [op for op in ops if op["why"]]
    submission = Submission()
    for op in at_once:
        grant = op_apply(target, op)
        if grant is not None:
            submission.new_grants.append(grant)
        submission.applied.append(op)
    if at_once:
        withdrawn = dial_requests_withdraw(target, at_once)
        event_append(
            run_uuid=trail,
            kind="config.changed",
            actor=actor,
            payload={
                "target": _target_label(target),
                "changes": _ops_recorded(at_once),
                "summary": [op_line(model, op) for op in at_once],
                **({"note": note} if note else {}),
                **({"dial_requests_withdrawn": withdrawn} if withdrawn else {}),
            },
        )
    keys = {op_key(op) for op in widening}
    superseded = _supersede_stale(target, keys=keys, actor=actor)
    if widening:
        change = ConfigChange.objects.create(
            **({"task": target} if model is Task else {"tool": target}),
            operations=_ops_recorded(widening),
            summary="\n".join(f"{op_line(model, op)} ({op['why']})" for op in widening),
            requested_by=user if user is not None and user.is_authenticated else None,
        )
        event_append(
            run_uuid=trail,
            kind="config.requested",
            actor=actor,
            payload={
                "target": _target_label(target),
                "change": change.pk,
                "changes": change.operations,
                "summary": change.summary.splitlines(),
                "superseded": superseded,
            },
        )
        submission.held = change
    if model is Task and at_once:
        task_version_current(task=target, user=user)
    return submission


def dial_requests_withdraw(target: Task | Tool, ops: list[dict[str, Any]]) -> list[int]:
    """A grant is judged at the task's level now; a request to raise the dial, waiting,
    was asked of the toolset as it was. Confirming it after a tool was granted would let
    the new tool run unattended at a level its second person never saw with it: so a
    grant withdraws the task's waiting dial requests. Returns their ids."""
    if not isinstance(target, Task) or not any(op["op"] == "grant_add" for op in ops):
        return []
    return requests_withdraw(target)


def _target_label(target: Task | Tool) -> str:
    return f"task {target.slug}" if isinstance(target, Task) else f"tool {target.name}"


def task_change_submit(
    *,
    task: Task,
    user: AbstractBaseUser | None,
    values: dict[str, Any] | None = None,
    grants_added: Sequence[tuple[Tool, Sequence[RuleDraft]]] = (),
    grants_removed: Sequence[int] = (),
    rules_added: Sequence[tuple[int, RuleDraft]] = (),
    rules_changed: Sequence[RuleDraft] = (),
    rules_removed: Sequence[int] = (),
    note: str = "",
) -> Submission:
    """Change a task, its grants and their rules as one request: what narrows (or leaves
    unattended work as it was) applies now; what widens waits for a second person.

    ``values``: field name -> wanted value (a foreign key as the object or its id).
    ``grants_added``: tools to grant, each with the rules it starts with.
    ``grants_removed``: grant ids. ``rules_added``: (grant id, rule). ``rules_changed``:
    rules with their ids. ``rules_removed``: rule ids."""
    values = values or {}
    unknown = set(values) - set(TASK_FIELDS)
    if unknown:
        raise GovernanceError(
            f"these are not fields a person changes here: {', '.join(sorted(unknown))}"
            + (" (the dial turns on the task's page)" if "autonomy_level" in unknown else "")
        )
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=task.pk)
        ops = _set_ops(task, TASK_FIELDS, values, task_field_widening)
        granted = dict(ToolGrant.objects.filter(task=task).values_list("pk", "tool_id"))
        for grant_id in grants_removed:
            if grant_id not in granted:
                raise GovernanceError(f"grant #{grant_id} is not one of {task.slug}'s grants")
            grant = ToolGrant.objects.select_related("tool").get(pk=grant_id)
            ops.append(
                {
                    "op": "grant_remove",
                    "grant": grant_id,
                    "tool": grant.tool_id,
                    "tool_name": grant.tool.name,
                    "rules": [rule_plain(rule) for rule in grant.rules.all()],
                    "why": "",
                }
            )
        for tool, drafts in grants_added:
            if tool.pk in granted.values():
                raise GovernanceError(f"{tool.name} is already granted to {task.slug}")
            ops.append(
                {
                    "op": "grant_add",
                    "tool": tool.pk,
                    "tool_name": tool.name,
                    "rules": [draft.plain() for draft in drafts],
                    "side_effect": tool.side_effect,
                    "always_approve": tool.always_approve,
                    "why": grant_add_widening(task, tool, [draft.plain() for draft in drafts]),
                }
            )
        ops += _rule_ops(
            task,
            grants_removed=grants_removed,
            rules_added=rules_added,
            rules_changed=rules_changed,
            rules_removed=rules_removed,
        )
        if not ops:
            return Submission()
        return _submit(target=task, ops=ops, user=user, note=note)


def tool_change_submit(
    *, tool: Tool, user: AbstractBaseUser | None, values: dict[str, Any], note: str = ""
) -> Submission:
    """Change a tool: what narrows applies now; what widens waits for a second person."""
    unknown = set(values) - set(TOOL_FIELDS)
    if unknown:
        raise GovernanceError(
            f"these are not fields a person changes here: {', '.join(sorted(unknown))}"
        )
    with transaction.atomic():
        tool = Tool.objects.select_for_update().get(pk=tool.pk)
        if values.get("name", tool.name) != tool.name:
            pinned = tool_name_pinned_by(values["name"])
            if pinned:
                raise GovernanceError(pinned)
        ops = _set_ops(tool, TOOL_FIELDS, values, tool_field_widening)
        if not ops:
            return Submission()
        return _submit(target=tool, ops=ops, user=user, note=note)


# Made, removed, or written by the deployment -----------------------------------------


def config_record(
    *,
    target: Task | Tool,
    kind: str,
    actor: str,
    changes: list[dict[str, Any]] | None = None,
    note: str = "",
) -> None:
    """Record, in the target's trail, a change made without a second person's say:
    ``kind`` is ``config.created``, ``config.deleted``, or ``config.changed`` for a write
    by the deployment's own code (``tools_sync``, ``mcp_import``). Inside the caller's
    transaction, with the write it describes."""
    trail = task_trail_uuid(target) if isinstance(target, Task) else tool_trail_uuid(target)
    model = type(target)
    payload: dict[str, Any] = {"target": _target_label(target)}
    if changes:
        payload["changes"] = changes
        payload["summary"] = [op_line(model, op) for op in changes]
    if note:
        payload["note"] = note
    event_append(run_uuid=trail, kind=kind, actor=actor, payload=payload)


def tool_snapshot(tool: Tool) -> dict[str, Any]:
    """A tool's governed fields, to compare after a write by the deployment's code."""
    return {name: field_value(tool, name) for name in TOOL_FIELDS}


def tool_changes_record(
    *, tool: Tool, before: dict[str, Any] | None, actor: str, note: str = ""
) -> None:
    """Record in the tool's trail what a write by the deployment's own code did to it
    (``tools_sync`` from the code's declarations, ``mcp_import`` from a server): a new
    tool with all its fields, or the fields that differ from ``before``
    (``tool_snapshot`` taken before the write). Nothing is recorded when nothing changed.
    Call it inside the transaction that wrote the tool."""
    if before is None:
        object_created(target=tool, user=None, actor=actor, note=note)
        return
    changes = [
        {"op": "set", "field": name, "before": before[name], "after": field_value(tool, name)}
        for name in TOOL_FIELDS
        if not values_equal(Tool, name, before[name], field_value(tool, name))
    ]
    if changes:
        config_record(target=tool, kind="config.changed", actor=actor, changes=changes, note=note)


def object_created(
    *, target: Task | Tool, user: AbstractBaseUser | None, actor: str = "", note: str = ""
) -> None:
    """Record a new task or tool with every field a person sets. A new task starts at
    most at Supervised (TaskForm), granting nothing; its grants are changes like any."""
    names = (*TASK_FIELDS, "autonomy_level") if isinstance(target, Task) else TOOL_FIELDS
    config_record(
        target=target,
        kind="config.created",
        actor=actor or actor_for(user),
        note=note,
        changes=[
            {"op": "set", "field": name, "before": None, "after": field_value(target, name)}
            for name in names
        ],
    )


def object_deleted(*, target: Task | Tool, user: AbstractBaseUser | None) -> None:
    """Record, before it goes, a task or tool deleted: nothing runs with it after."""
    note = "deleted"
    if isinstance(target, Task) and target.grants.exists():
        note += " with its grants of " + ", ".join(
            target.grants.values_list("tool__name", flat=True)
        )
    config_record(target=target, kind="config.deleted", actor=actor_for(user), note=note)


def grant_delete(*, grant: ToolGrant, user: AbstractBaseUser | None) -> Submission:
    """Remove a grant (with its rules): narrowing, so at once, recorded."""
    return task_change_submit(task=grant.task, user=user, grants_removed=[grant.pk])


# Deciding ----------------------------------------------------------------------------


def decide_permissions(change: ConfigChange) -> list[str]:
    """What confirming needs: the right to change the object, as the dial's confirmation
    does (``tasks.change_task``), and the right to make the grant or rule edits it holds."""
    if change.tool_id:
        return ["tasks.change_tool"]
    needed = {"tasks.change_task"}
    for op in change.operations:
        if op["op"] == "grant_add":
            needed.add("tasks.add_toolgrant")
        elif op["op"].startswith("rule_"):
            needed.add("tasks.change_toolgrant")
    return sorted(needed)


def may_decide(change: ConfigChange, user: AbstractBaseUser) -> bool:
    return user.is_authenticated and user.has_perms(decide_permissions(change))


def config_change_decide(
    *, change: ConfigChange, user: AbstractBaseUser, confirm: bool, reason: str = ""
) -> ConfigChange:
    """A second person confirms (applies) or rejects a change that widens. The person who
    asked may reject (withdraw) it, never confirm it. A change that no longer applies is
    refused with the reason, and stays as it was."""
    if not may_decide(change, user):
        raise PermissionDenied(
            "deciding this change takes the permissions " + ", ".join(decide_permissions(change))
        )
    target_model = Task if change.task_id else Tool
    with transaction.atomic():
        # The target's row first, then the change's: the order a submission takes.
        target = target_model.objects.select_for_update().get(pk=change.task_id or change.tool_id)
        change = ConfigChange.objects.select_for_update().get(pk=change.pk)
        if change.status != ConfigChange.Status.PENDING:
            raise GovernanceError(f"this change was already {change.status}")
        actor = actor_for(user)
        trail = trail_for(change)
        if not confirm:
            _status_move(change, to=ConfigChange.Status.REJECTED, reason=reason.strip(), user=user)
            event_append(
                run_uuid=trail,
                kind="config.rejected",
                actor=actor,
                payload={"change": change.pk, "reason": change.reason},
            )
            return change
        if change.requested_by_id is None:
            # Whoever asked has no account now, so a second person cannot be told apart.
            raise GovernanceError(
                "the person who asked for it has no account any more, so no second person "
                "can be told apart from them: reject it, and ask again"
            )
        if change.requested_by_id == user.pk:
            raise GovernanceError("a second person must confirm: you asked for this change")
        for op in change.operations:
            stale = op_staleness(target, op)
            if stale:
                raise GovernanceError(
                    f"it no longer applies: {stale}. Reject it, and ask again from the "
                    "object as it is now"
                )
        for op in change.operations:
            op_apply(target, op)
        withdrawn = dial_requests_withdraw(target, change.operations)
        _status_move(change, to=ConfigChange.Status.APPLIED, user=user)
        event_append(
            run_uuid=trail,
            kind="config.confirmed",
            actor=actor,
            payload={
                "target": _target_label(target),
                "change": change.pk,
                "requested_by": actor_for(change.requested_by) if change.requested_by_id else None,
                "changes": change.operations,
                "summary": change.summary.splitlines(),
                **({"dial_requests_withdrawn": withdrawn} if withdrawn else {}),
            },
        )
        if target_model is Task:
            task_version_current(task=target, user=user)
        # What this made stale goes too: confirming one of them later would apply it
        # over values nobody saw.
        _supersede_stale(target, keys=set(), actor=actor)
    return change
