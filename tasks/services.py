"""Writes for tasks and runs. Every change to a run's state goes through here, in one
transaction with the lineage events that describe it."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from agentops import states
from agentops.runtime import dispatch
from agentops.runtime.models import client_for, model_label_for
from agentops.runtime.tools import REGISTRY, arguments_errors
from lineage.services import event_append, events_append
from tasks.models import Run, RunStatus, Task, TaskVersion, Tool, Trigger

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RunStartError(Exception):
    """The run could not start; the message says what to fix. Nothing was written."""


def actor_for(user: AbstractBaseUser | None) -> str:
    return f"user:{user.get_username()}" if user is not None else "system"


# Tools -------------------------------------------------------------------------------


def tools_sync() -> list[Tool]:
    """Make a Tool row for every registered code tool; mark rows whose code is gone.

    The code declares the schema, description, side-effect class and idempotency; the
    operator's own setting (``always_approve``) is never overwritten."""
    synced = []
    with transaction.atomic():
        for spec in REGISTRY.values():
            tool, _ = Tool.objects.update_or_create(
                name=spec.name,
                defaults={
                    "kind": Tool.Kind.PYTHON,
                    "description": spec.description,
                    "input_schema": spec.input_schema,
                    "side_effect": spec.side_effect,
                    "idempotency": "key" if spec.idempotent else "none",
                    "available": True,
                },
            )
            synced.append(tool)
        Tool.objects.filter(kind=Tool.Kind.PYTHON, available=True).exclude(
            name__in=list(REGISTRY)
        ).update(available=False)
    return synced


def tools_sync_on_migrate(**kwargs: Any) -> None:
    tools_sync()


# Task versions -----------------------------------------------------------------------


def task_definition(task: Task) -> dict[str, Any]:
    """Everything a run of the task depends on, as plain JSON."""
    return {
        "slug": task.slug,
        "name": task.name,
        "objective_template": task.objective_template,
        "instructions": task.instructions,
        "input_schema": task.input_schema,
        "model": task.model,
        "max_steps": task.max_steps,
        "max_tokens": task.max_tokens,
        "max_seconds": task.max_seconds,
        "max_spend": str(task.max_spend) if task.max_spend is not None else None,
        "on_budget_breach": task.on_budget_breach,
        "loop_repeat_limit": task.loop_repeat_limit,
        "stall_limit": task.stall_limit,
        "on_loop": task.on_loop,
        "self_check": task.self_check,
        "confidence_threshold": task.confidence_threshold,
        # The gate weighs the agent's confidence in each call (a version made before it
        # did not, and runs as it did then).
        "confidence_gate": True,
        "model_max_attempts": task.model_max_attempts,
        "autonomy_level": task.autonomy_level,
        "tools": sorted(task.grants.values_list("tool__name", flat=True)),
        "rules": grant_rules(task),
    }


def grant_rules(task: Task) -> dict[str, list[dict[str, Any]]]:
    """Each granted tool's rules, in order, as the version pins them."""
    from tasks.models import GrantRule

    rules: dict[str, list[dict[str, Any]]] = {}
    for rule in GrantRule.objects.filter(grant__task=task).select_related("grant__tool"):
        rules.setdefault(rule.grant.tool.name, []).append(
            {"expression": rule.expression, "effect": rule.effect, "description": rule.description}
        )
    return rules


def task_version_current(*, task: Task, user: AbstractBaseUser | None = None) -> TaskVersion:
    """The version matching the task as it is now: the latest one, or a new one when the
    definition changed since."""
    definition = task_definition(task)
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    with transaction.atomic():
        latest = (
            TaskVersion.objects.select_for_update().filter(task=task).order_by("-number").first()
        )
        if latest is not None and latest.digest == digest:
            return latest
        return TaskVersion.objects.create(
            task=task,
            number=(latest.number + 1) if latest else 1,
            definition=definition,
            digest=digest,
            created_by=user if user is not None and user.is_authenticated else None,
        )


# Runs --------------------------------------------------------------------------------


def objective_render(template: str, run_input: dict[str, Any]) -> str:
    """Fill ``{field}`` with top-level input fields; a missing field is an error."""
    missing = [name for name in PLACEHOLDER.findall(template) if name not in run_input]
    if missing:
        raise RunStartError(
            f"the objective uses {', '.join('{' + m + '}' for m in missing)} "
            "but the input has no such field"
        )

    def fill(match: re.Match) -> str:
        value = run_input[match.group(1)]
        return value if isinstance(value, str) else json.dumps(value)

    return PLACEHOLDER.sub(fill, template)


def run_start(
    *,
    task: Task,
    run_input: dict[str, Any],
    user: AbstractBaseUser | None = None,
    trigger_kind: str = Trigger.Kind.MANUAL,
    firing_key: str | None = None,
    trigger: Trigger | None = None,
    firing_payload: Any = None,
) -> Run:
    """Validate the input, pin the task's current version, queue the run. A run a
    trigger starts names it (``trigger``, its kind, the firing's key and what arrived,
    ``firing_payload``), on the run and in its first event; ``triggers.services.
    trigger_fire`` is the only caller that passes them."""
    if trigger is not None:
        trigger_kind = trigger.kind
    if not isinstance(run_input, dict):
        raise RunStartError("the input must be a JSON object")
    errors = arguments_errors(task.input_schema or {"type": "object"}, run_input, whole="the input")
    if errors:
        raise RunStartError("the input does not match the task's schema: " + "; ".join(errors))
    objective = objective_render(task.objective_template, run_input)
    try:
        label = model_label_for(task.model)
        client_for(label)
    except Exception as error:
        raise RunStartError(str(error)) from error
    if task.max_spend is not None and price_for(label) is None:
        raise RunStartError(
            f"the task has a spend budget but the model {label!r} has no price: add one "
            "under Model prices in the admin"
        )
    unavailable = list(task.tools.filter(available=False).values_list("name", flat=True))
    if unavailable:
        raise RunStartError(f"granted tools whose code is not installed: {', '.join(unavailable)}")

    with transaction.atomic():
        version = task_version_current(task=task, user=user)
        run = Run.objects.create(
            id=uuid.uuid4(),
            task=task,
            task_version=version,
            trigger=trigger,
            trigger_kind=trigger_kind,
            firing_key=firing_key,
            started_by=user if user is not None and user.is_authenticated else None,
            input=run_input,
            objective=objective,
            model_label=label,
            queued_at=timezone.now(),
        )
        event_append(
            run_uuid=run.id,
            kind="run.queued",
            actor=f"trigger:{trigger.pk}" if trigger is not None else actor_for(user),
            payload={
                "task": task.slug,
                "task_version": version.number,
                "definition_digest": version.digest,
                "trigger": trigger_kind,
                "firing_key": firing_key,
                **(
                    {
                        "trigger_id": trigger.pk,
                        "trigger_name": trigger.name,
                        "firing": firing_payload,
                    }
                    if trigger is not None
                    else {}
                ),
                "input": run_input,
                "objective": objective,
                "model": label,
            },
        )
        dispatch.enqueue(run.id)
    return run


def run_transition(
    *,
    run: Run,
    to: str,
    actor: str,
    reason: str | None = None,
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> Run:
    """Move the run to ``to`` if the table allows it and nobody moved it first.

    A conditional UPDATE on the old status is the claim: zero rows changed means another
    actor won, and ``InvalidTransition`` rolls the caller's transaction back."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("run_transition must run inside a transaction")
    states.RUN.check(run.status, to)
    now = timezone.now()
    changes: dict[str, Any] = {"status": to, **fields}
    if reason is not None:
        changes["reason"] = reason
    if to == RunStatus.RUNNING and run.started_at is None:
        changes["started_at"] = now
    if to == RunStatus.QUEUED:
        changes["queued_at"] = now
    if states.RUN.terminal(to):
        changes["finished_at"] = now
        changes["lease_owner"] = ""
        changes["lease_expires_at"] = None
    updated = Run.objects.filter(pk=run.pk, status=run.status).update(**changes)
    if updated != 1:
        current = Run.objects.filter(pk=run.pk).values_list("status", flat=True).first()
        raise states.InvalidTransition(
            f"the run is {current or 'gone'} now, not {run.status}: it was changed meanwhile"
        )
    previous = run.status
    for name, value in changes.items():
        setattr(run, name, value)
    event_append(
        run_uuid=run.pk,
        kind=f"run.{to}",
        actor=actor,
        payload={"from": previous, **({"reason": reason} if reason else {}), **(payload or {})},
    )
    if states.RUN.terminal(to):
        from lineage.anchoring import run_seal_on_commit

        run_seal_on_commit(run_uuid=run.pk)  # signed outside the database once committed
    return run


def run_cancel(*, run: Run, user: AbstractBaseUser, why: str = "") -> Run:
    """Cancel a live run: a worker stops at its next commit, pending approvals close. The
    run's reason says who cancelled it, and why when they said."""
    from approvals.services import approvals_cancel_for_run

    reason = f"cancelled by {user.get_username()}" + (f": {why.strip()}" if why.strip() else "")
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run.pk)
        if not run.is_live:
            raise states.InvalidTransition(f"the run has already ended ({run.status})")
        run_transition(run=run, to=RunStatus.CANCELLED, actor=actor_for(user), reason=reason)
        approvals_cancel_for_run(run=run, actor=actor_for(user))
    return run


# Prices ------------------------------------------------------------------------------


def price_for(model_label: str) -> tuple[Decimal, Decimal] | None:
    """(input, output) price per million tokens; scripted models are free unless priced."""
    from tasks.models import ModelPrice

    row = ModelPrice.objects.filter(model=model_label).first()
    if row is not None:
        return row.input_per_million, row.output_per_million
    if model_label.startswith("scripted:"):
        return Decimal(0), Decimal(0)
    return None


# Steps -------------------------------------------------------------------------------


def step_create(
    *,
    run: Run,
    number: int,
    event: str,
    payload: dict[str, Any],
    actor: str = "engine",
    **fields: Any,
):
    """Record a new step and the lineage event that describes it."""
    entry = {"number": number, "event": event, "payload": payload, **fields}
    return steps_create(run=run, entries=[entry], actor=actor)[0]


def steps_create(*, run: Run, entries: list[dict[str, Any]], actor: str = "engine") -> list:
    """Record new steps and the lineage events that describe them, in order: one INSERT
    for the steps, one for the events. Each entry is a step's fields, its ``number``
    among them, plus the ``event``'s kind and its ``payload``."""
    from tasks.models import Step

    steps, events = steps_built(run=run, entries=entries, actor=actor)
    if transaction.get_connection().features.can_return_rows_from_bulk_insert:
        Step.objects.bulk_create(steps)
    else:  # SQLite before 3.35 cannot return the new rows' ids from one INSERT
        for step in steps:
            step.save(force_insert=True)
    events_append(run_uuid=run.pk, events=events)
    return steps


def steps_built(
    *, run: Run, entries: list[dict[str, Any]], actor: str = "engine"
) -> tuple[list, list[tuple[str, str, dict[str, Any]]]]:
    """``steps_create``'s steps (unsaved) and events, ``(kind, actor, payload)``."""
    from tasks.models import Step

    steps, events = [], []
    for entry in entries:
        fields = dict(entry)
        event, payload = fields.pop("event"), fields.pop("payload")
        steps.append(Step(run=run, **fields))
        events.append((event, actor, {"step": fields["number"], **payload}))
    return steps, events


def step_transition(*, step, to: str, event: str, payload: dict[str, Any], **fields: Any):
    """Move a tool step to ``to``: a conditional UPDATE on its old status, and the event.

    Zero rows changed means another worker recorded this step first; the caller's
    transaction rolls back with ``InvalidTransition``."""
    if not step_transition_if_unchanged(step=step, to=to, event=event, payload=payload, **fields):
        raise states.InvalidTransition(f"step #{step.number} was changed meanwhile")
    return step


def step_moved(step, to: str, fields: dict[str, Any]) -> None:
    """A step's committed move to ``to`` with ``fields``, on the object in memory."""
    step.status = to
    for name, value in fields.items():
        setattr(step, name, value)


def step_transition_if_unchanged(
    *, step, to: str, event: str, payload: dict[str, Any], **fields: Any
) -> bool:
    """``step_transition`` that reports, instead of raising, a step whose status in the
    database is no longer ``step.status``: it then changes nothing and returns False."""
    from tasks.models import Step

    states.STEP.check(step.status, to)
    updated = Step.objects.filter(pk=step.pk, status=step.status).update(status=to, **fields)
    if updated != 1:
        return False
    step_moved(step, to, fields)
    event_append(
        run_uuid=step.run_id, kind=event, actor="engine", payload={"step": step.number, **payload}
    )
    return True
