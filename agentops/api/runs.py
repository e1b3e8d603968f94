"""Runs: start (with an optional Idempotency-Key), read with steps, usage and trigger,
list with the runs page's filters, cancel. The same services and selectors as the
pages (tasks.services.run_start / run_cancel, tasks.selectors, tasks.run_list)."""

from __future__ import annotations

import datetime
import hashlib
import json
from decimal import Decimal
from typing import Any, Literal

from django.core.paginator import Paginator
from django.db import IntegrityError, transaction
from django.http import HttpRequest
from ninja import Field, Header, Query, Router, Schema, Status
from pydantic import ConfigDict

from agentops.api.auth import require
from agentops.api.errors import Problem, field_error, invalid, problems
from agentops.api.schemas import Text, not_found, run_uuid_parse
from agentops.bad_input import ID_MAX
from agentops.models import IdempotencyKey, TokenScope
from agentops.states import InvalidTransition
from tasks import selectors
from tasks.models import Run, RunStatus, Step, Task, Trigger
from tasks.run_list import filters_from
from tasks.services import RunStartError, run_cancel, run_start

router = Router(tags=["runs"])

# An Idempotency-Key: printable ASCII, as an HTTP header carries it.
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"


class UsageOut(Schema):
    steps: int
    tokens_in: int
    tokens_out: int
    spend: str = Field(description="Spend so far, a decimal in the model's price unit.")
    seconds: float


class TriggerOut(Schema):
    kind: str = Field(description="manual, cron, webhook, queue or email")
    id: int | None = Field(description="The trigger's id; null for a person's start.")
    name: str | None
    firing_key: str | None


class RunSummaryOut(Schema):
    id: str
    task: str = Field(description="The task's slug.")
    task_name: str
    task_version: int
    status: str
    started_by: str | None
    trigger: TriggerOut
    model: str
    usage: UsageOut
    created_at: datetime.datetime
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None


class StepOut(Schema):
    number: int
    kind: str
    status: str
    content: str
    tool: str
    arguments: Any = None
    result: Any = None
    error: str
    gate: str
    confidence: float | None
    tokens_in: int
    tokens_out: int
    duration_ms: int | None
    created_at: datetime.datetime
    finished_at: datetime.datetime | None


class RunOut(RunSummaryOut):
    input: dict[str, Any]
    objective: str
    outcome: str
    reason: str
    plan: Any = None
    confidence: float | None
    steps: list[StepOut] = Field(
        description="The run's latest steps (up to 100), in order; earlier ones with "
        "?steps_before=<number>."
    )
    earlier_steps: bool = Field(description="True when steps before the first shown exist.")


class RunPageOut(Schema):
    count: int
    page: int
    pages: int
    items: list[RunSummaryOut]


class RunStartIn(Schema):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    task: Text = Field(max_length=200, description="The task's slug.")
    input: dict[str, Any] = Field(
        default_factory=dict,
        description="The run's input: a JSON object matching the task's input schema.",
    )


class RunCancelIn(Schema):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    why: Text = Field("", max_length=300, description="Why, kept in the run's reason.")


class RunListQuery(Schema):
    status: Literal[tuple(RunStatus.values)] | None = None  # type: ignore[valid-type]
    started: Literal[tuple(Trigger.Kind.values)] | None = Field(  # type: ignore[valid-type]
        None, description="How the run started: its trigger's kind."
    )
    trigger: int | None = Field(None, ge=1, le=ID_MAX, description="A trigger's id.")
    task: Text | None = Field(None, max_length=200, description="A task's slug.")
    model: Text | None = Field(None, max_length=200)
    since: datetime.date | None = Field(None, description="Created on or after this day.")
    until: datetime.date | None = Field(None, description="Created on or before this day.")
    q: Text | None = Field(None, max_length=200, description="Text in the run's input.")
    page: int = Field(1, ge=1, le=1_000_000)


def _run_links(pointer: str) -> dict[str, Any]:
    """OpenAPI links from an answer holding a run's id at ``pointer`` to what can be
    done with the run next (clients and schemathesis's stateful tests follow them)."""
    run_id = {"run_id": f"$response.body#{pointer}"}
    return {
        name: {"operationId": operation, "parameters": run_id}
        for name, operation in (
            ("ReadRun", "runs_read"),
            ("CancelRun", "runs_cancel"),
            ("RunEvents", "lineage_events"),
            ("VerifyRun", "lineage_verify"),
            ("ExportRun", "lineage_export"),
        )
    }


def _usage(run: Run) -> dict[str, Any]:
    return {
        "steps": run.steps_used,
        "tokens_in": run.tokens_in,
        "tokens_out": run.tokens_out,
        "spend": str(Decimal(run.spend)),
        "seconds": run.seconds_used,
    }


def _summary(run: Run) -> dict[str, Any]:
    trigger = run.trigger
    return {
        "id": str(run.pk),
        "task": run.task.slug,
        "task_name": run.task.name,
        "task_version": run.task_version.number,
        "status": run.status,
        "started_by": run.started_by.get_username() if run.started_by else None,
        "trigger": {
            "kind": run.trigger_kind,
            "id": run.trigger_id,
            "name": trigger.name if trigger else None,
            "firing_key": run.firing_key,
        },
        "model": run.model_label,
        "usage": _usage(run),
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


def _step(step: Step) -> dict[str, Any]:
    return {
        "number": step.number,
        "kind": step.kind,
        "status": step.status,
        "content": step.content,
        "tool": step.tool_name,
        "arguments": step.arguments,
        "result": step.result,
        "error": step.error,
        "gate": step.gate,
        "confidence": step.confidence,
        "tokens_in": step.tokens_in,
        "tokens_out": step.tokens_out,
        "duration_ms": step.duration_ms,
        "created_at": step.created_at,
        "finished_at": step.finished_at,
    }


def run_out(run_id: Any, *, before: int | None = None) -> dict[str, Any]:
    """A run as the API shows it, read afresh (with the selectors the run page uses)."""
    run = selectors.run_for_detail(run_id)
    steps = selectors.steps_for_run(run, before=before, limit=selectors.STEPS_SHOWN)
    return {
        **_summary(run),
        "input": run.input,
        "objective": run.objective,
        "outcome": run.outcome,
        "reason": run.reason,
        "plan": run.plan,
        "confidence": run.confidence,
        "steps": [_step(step) for step in steps],
        "earlier_steps": bool(steps) and steps[0].number > 1,
    }


def _run_or_404(run_id: str) -> Run:
    try:
        return selectors.run_for_detail(run_uuid_parse(run_id))
    except Run.DoesNotExist:
        raise not_found("run") from None


@router.get(
    "/runs",
    response={200: RunPageOut, **problems(401, 403, 422, 429)},
    summary="List runs, newest first, filtered as the runs page filters",
    openapi_extra={"responses": {"200": {"links": _run_links("/items/0/id")}}},
)
def runs_list(request: HttpRequest, filters: Query[RunListQuery]):
    require(request, scope=TokenScope.READ, query=tuple(RunListQuery.model_fields))
    given = {
        name: value.isoformat() if isinstance(value, datetime.date) else str(value)
        for name, value in filters.dict(exclude={"page"}).items()
        if value is not None
    }
    found = filters_from(given)
    if found.refusals:
        # Each refusal named by its parameter: read one at a time, the filters say
        # which; one refused only together (since after until) is the period's start.
        errors, named = [], set()
        for name, value in given.items():
            for refusal in filters_from({name: value}).refusals:
                errors.append(field_error("query", name, refusal))
                named.add(refusal)
        errors += [
            field_error("query", "since", refusal)
            for refusal in found.refusals
            if refusal not in named
        ]
        raise invalid(errors)
    paginator = Paginator(selectors.runs_for_list(found), selectors.RUNS_PER_PAGE)
    start = (filters.page - 1) * selectors.RUNS_PER_PAGE
    rows = list(paginator.object_list[start : start + selectors.RUNS_PER_PAGE])
    return Status(
        200,
        {
            "count": paginator.count,
            "page": filters.page,
            "pages": paginator.num_pages if paginator.count else 0,
            "items": [_summary(run) for run in rows],
        },
    )


@router.get(
    "/runs/{run_id}",
    response={200: RunOut, **problems(401, 403, 404, 422, 429)},
    summary="Read a run with its steps, usage and trigger",
)
def runs_read(
    request: HttpRequest,
    run_id: str,
    steps_before: int | None = Query(None, ge=1, le=ID_MAX),
):
    require(request, scope=TokenScope.READ, query=("steps_before",))
    run = _run_or_404(run_id)
    return Status(200, run_out(run.pk, before=steps_before))


def _request_digest(body: RunStartIn) -> str:
    canonical = json.dumps({"task": body.task, "input": body.input}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replayed(record: IdempotencyKey, digest: str):
    if record.request_digest != digest or record.run_id is None:
        raise Problem(
            409,
            "idempotency-key-reused",
            "This Idempotency-Key was used before with a different request body: use a "
            "new key for a new run.",
        )
    return Status(200, run_out(record.run_id))


def _start(task: Task, body: RunStartIn, user) -> Run:
    try:
        return run_start(task=task, run_input=body.input, user=user)
    except RunStartError as error:
        raise invalid([field_error("body", "/input", str(error))]) from None


@router.post(
    "/runs",
    response={200: RunOut, 201: RunOut, **problems(400, 401, 403, 409, 422, 429)},
    summary="Start a run of a task",
    openapi_extra={
        "responses": {
            "200": {"links": _run_links("/id")},
            "201": {"links": _run_links("/id")},
        }
    },
    description="201 with the new run. With an Idempotency-Key, a retry by the same "
    "user with the same body answers 200 with the run the first request started; the "
    "same key with another body is a 409.",
)
def runs_start(
    request: HttpRequest,
    body: RunStartIn,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        pattern=KEY_PATTERN,
        description="Up to 200 printable ASCII characters.",
    ),
):
    who = require(request, scope=TokenScope.OPERATE, perms=("tasks.start_run",))
    task = Task.objects.filter(slug=body.task).first()
    if task is None:
        raise invalid([field_error("body", "/task", f"there is no task {body.task!r}")])
    if idempotency_key is None:
        return Status(201, run_out(_start(task, body, who.user).pk))
    digest = _request_digest(body)
    keys = IdempotencyKey.objects.filter(user=who.user, key=idempotency_key)
    record = keys.first()
    if record is not None:
        return _replayed(record, digest)
    try:
        # The key's row first, the run in the same transaction: a concurrent request
        # with the key waits on this INSERT (the unique constraint), then fails it and
        # answers with the run this one started.
        with transaction.atomic():
            record = IdempotencyKey.objects.create(
                user=who.user, key=idempotency_key, request_digest=digest
            )
            run = _start(task, body, who.user)
            record.run = run
            record.save(update_fields=["run"])
    except IntegrityError:
        record = keys.first()
        if record is None:
            raise
        return _replayed(record, digest)
    return Status(201, run_out(run.pk))


@router.post(
    "/runs/{run_id}/cancel",
    response={200: RunOut, **problems(400, 401, 403, 404, 409, 422, 429)},
    summary="Cancel a live run",
)
def runs_cancel(request: HttpRequest, run_id: str, body: RunCancelIn | None = None):
    who = require(request, scope=TokenScope.OPERATE, perms=("tasks.cancel_run",))
    run = _run_or_404(run_id)
    try:
        run_cancel(run=run, user=who.user, why=body.why if body else "")
    except InvalidTransition as error:
        raise Problem(409, "run-state", f"The run was not cancelled: {error}.") from None
    return Status(200, run_out(run.pk))
