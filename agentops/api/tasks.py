"""Tasks: list, read with the current definition, create, and change as a new version.

A new task is checked by the admin's own form (tasks.admin.TaskForm, which applies
tasks.validation) and recorded as the admin records it (governance.object_created,
then its first version). A change goes through the governed path only
(tasks.governance.task_change_submit): what narrows applies at once and makes a new
version; what lets more run without a person waits for a second person, answered 202
with the waiting change's id.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.forms.models import model_to_dict, modelform_factory
from django.http import HttpRequest
from ninja import Field, Router, Schema, Status
from pydantic import ConfigDict

from agentops.api.auth import require
from agentops.api.errors import Problem, field_error, invalid, problems
from agentops.api.schemas import Text, not_found, slug_or_404
from agentops.models import TokenScope
from tasks import governance, selectors
from tasks.admin import TaskForm
from tasks.models import ConfigChange, Task, Tool, ToolGrant
from tasks.services import task_definition, task_version_current

router = Router(tags=["tasks"])

# What the API sets on a task: the governed fields (governance.TASK_FIELDS) but the
# groups, which are chosen in the admin. The dial (autonomy_level) is set only when a
# task is made (at most Supervised); after, it turns on the task's page.
EDITABLE = tuple(
    name for name in governance.TASK_FIELDS if name not in ("approver_group", "escalation_group")
)
JSON_FIELDS = ("input_schema", "example_input")
SMALL = 32_767  # a PositiveSmallIntegerField's ceiling on every database
LARGE = 2_147_483_647


class TaskSummaryOut(Schema):
    slug: str
    name: str
    description: str
    autonomy_level: int
    model: str
    tools: int = Field(description="How many tools it is granted.")
    live_runs: int
    updated_at: datetime.datetime


class PendingChangeOut(Schema):
    id: int
    status: str
    summary: list[str]
    created_at: datetime.datetime


class TaskOut(Schema):
    slug: str
    name: str
    description: str
    autonomy_level: int
    version: int | None = Field(description="The number of the task's latest version.")
    definition: dict[str, Any] = Field(
        description="Everything a run depends on, as the next run would pin it."
    )
    example_input: dict[str, Any]
    approver_group: str | None
    four_eyes: bool
    pending_changes: list[PendingChangeOut] = Field(
        description="Changes that wait for a second person."
    )
    updated_at: datetime.datetime


class TaskFieldsIn(Schema):
    """The fields, each optional: what is left out keeps its default (on create) or its
    value (on change). Checked as the admin checks them."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    name: Text | None = Field(None, max_length=200)
    description: Text | None = Field(None, max_length=100_000)
    objective_template: Text | None = Field(None, max_length=100_000)
    instructions: Text | None = Field(None, max_length=100_000)
    input_schema: dict[str, Any] | None = None
    example_input: dict[str, Any] | None = None
    model: Text | None = Field(None, max_length=200)
    self_check: bool | None = None
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    four_eyes: bool | None = None
    approval_timeout_minutes: int | None = Field(None, ge=1, le=LARGE)
    on_approval_expiry: Text | None = Field(None, max_length=10)
    step_down_rejections: int | None = Field(None, ge=0, le=SMALL)
    max_steps: int | None = Field(None, ge=1, le=10_000)
    max_tokens: int | None = Field(None, ge=0, le=LARGE)
    max_seconds: int | None = Field(None, ge=0, le=LARGE)
    max_spend: Decimal | None = Field(None, ge=0, max_digits=12, decimal_places=4)
    on_budget_breach: Text | None = Field(None, max_length=8)
    loop_repeat_limit: int | None = Field(None, ge=0, le=SMALL)
    stall_limit: int | None = Field(None, ge=0, le=SMALL)
    on_loop: Text | None = Field(None, max_length=8)
    model_max_attempts: int | None = Field(None, ge=1, le=10)


class TaskCreateIn(TaskFieldsIn):
    slug: Text = Field(max_length=80, description="Letters, digits, - and _.")
    name: Text = Field(max_length=200)
    objective_template: Text = Field(max_length=100_000)
    autonomy_level: int | None = Field(
        None, ge=0, le=3, description="At most 1 (Supervised) for a new task."
    )


class TaskChangeIn(TaskFieldsIn):
    slug: Text | None = Field(None, max_length=80)
    grant: list[Text] = Field(
        default_factory=list, max_length=50, description="Names of tools to grant."
    )
    revoke: list[Text] = Field(
        default_factory=list, max_length=50, description="Names of granted tools to take away."
    )
    note: Text = Field("", max_length=2000, description="Why, kept in the task's trail.")


class TaskChangeOut(Schema):
    task: TaskOut
    applied: list[str] = Field(description="What changed now, one line each.")
    pending_change: PendingChangeOut | None = Field(
        description="What waits for a second person (the answer is then a 202)."
    )


def _task_links(pointer: str) -> dict[str, Any]:
    """OpenAPI links from an answer holding a task's slug at ``pointer``: read it,
    change it, start a run of it."""
    slug = f"$response.body#{pointer}"
    return {
        "ReadTask": {"operationId": "tasks_read", "parameters": {"slug": slug}},
        "ChangeTask": {"operationId": "tasks_change", "parameters": {"slug": slug}},
        "StartRun": {"operationId": "runs_start", "requestBody": {"task": slug, "input": {}}},
    }


def _pending(change: ConfigChange) -> dict[str, Any]:
    return {
        "id": change.pk,
        "status": change.status,
        "summary": change.summary.splitlines(),
        "created_at": change.created_at,
    }


def task_out(task: Task) -> dict[str, Any]:
    version = task.versions.order_by("-number").values_list("number", flat=True).first()
    waiting = ConfigChange.objects.filter(task=task, status=ConfigChange.Status.PENDING)
    return {
        "slug": task.slug,
        "name": task.name,
        "description": task.description,
        "autonomy_level": task.autonomy_level,
        "version": version,
        "definition": task_definition(task),
        "example_input": task.example_input or {},
        "approver_group": task.approver_group.name if task.approver_group_id else None,
        "four_eyes": task.four_eyes,
        "pending_changes": [_pending(change) for change in waiting.order_by("created_at", "pk")],
        "updated_at": task.updated_at,
    }


def _task_or_404(slug: str) -> Task:
    try:
        return selectors.task_for_detail(slug_or_404(slug, "task"))
    except Task.DoesNotExist:
        raise not_found("task") from None


def _form_data(values: dict[str, Any]) -> dict[str, Any]:
    """Values as the admin's form receives them: JSON boxes as JSON text."""
    data = {}
    for name, value in values.items():
        if name in JSON_FIELDS:
            data[name] = json.dumps(value if value is not None else {})
        elif value is None:
            data[name] = ""
        else:
            data[name] = value
    return data


def _form_errors(form) -> Problem:
    errors = [
        field_error("body", "/" + name if name != "__all__" else "", message)
        for name, messages in form.errors.items()
        for message in messages
    ]
    return invalid(errors)


def _form_for(fields: tuple[str, ...]) -> type[TaskForm]:
    """The admin's form and its checks, on these fields only."""
    return modelform_factory(Task, form=TaskForm, fields=list(fields))


@router.get(
    "/tasks",
    response={200: list[TaskSummaryOut], **problems(401, 403, 422, 429)},
    summary="List tasks",
    openapi_extra={"responses": {"200": {"links": _task_links("/0/slug")}}},
)
def tasks_list(request: HttpRequest):
    require(request, scope=TokenScope.READ)
    return Status(
        200,
        [
            {
                "slug": task.slug,
                "name": task.name,
                "description": task.description,
                "autonomy_level": task.autonomy_level,
                "model": task.model,
                "tools": task.grant_count,
                "live_runs": task.live_runs,
                "updated_at": task.updated_at,
            }
            for task in selectors.tasks_for_list()
        ],
    )


@router.get(
    "/tasks/{slug}",
    response={200: TaskOut, **problems(401, 403, 404, 422, 429)},
    summary="Read a task with its current definition",
)
def tasks_read(request: HttpRequest, slug: str):
    require(request, scope=TokenScope.READ)
    return Status(200, task_out(_task_or_404(slug)))


@router.post(
    "/tasks",
    response={201: TaskOut, **problems(400, 401, 403, 422, 429)},
    summary="Create a task",
    openapi_extra={"responses": {"201": {"links": _task_links("/slug")}}},
    description="Checked as the admin checks a new task; it grants no tools (grant them "
    "with a change, which is governed) and starts at most at Supervised.",
)
def tasks_create(request: HttpRequest, body: TaskCreateIn):
    who = require(request, scope=TokenScope.OPERATE, perms=("tasks.add_task",), staff=True)
    fields = (*EDITABLE, "autonomy_level")
    given = body.dict(exclude_unset=True)
    values = {**model_to_dict(Task(), fields=fields), **given}
    form = _form_for(fields)(data=_form_data(values))
    if not form.is_valid():
        raise _form_errors(form)
    try:
        with transaction.atomic():
            task = form.save()
            governance.object_created(target=task, user=who.user)
            task_version_current(task=task, user=who.user)
    except IntegrityError:  # another request took the slug since the form checked it
        raise invalid(
            [field_error("body", "/slug", "Task with this Slug already exists.")]
        ) from None
    return Status(201, task_out(task))


@router.patch(
    "/tasks/{slug}",
    response={
        200: TaskChangeOut,
        202: TaskChangeOut,
        **problems(400, 401, 403, 404, 409, 422, 429),
    },
    summary="Change a task (a new version, governed)",
    description="What narrows or leaves unattended work as it was applies now and makes "
    "a new version (200). What lets more run without a person (a wider toolset, a looser "
    "budget, a lower confidence threshold...) waits for a second person: 202 with the "
    "waiting change's id; the rest of the request is applied.",
)
def tasks_change(request: HttpRequest, slug: str, body: TaskChangeIn):
    perms = ["tasks.change_task"]
    if body.grant:
        perms.append("tasks.add_toolgrant")
    if body.revoke:
        perms.append("tasks.delete_toolgrant")
    who = require(request, scope=TokenScope.OPERATE, perms=tuple(perms), staff=True)
    task = _task_or_404(slug)
    given = body.dict(exclude_unset=True, exclude={"grant", "revoke", "note"})
    nulls = [name for name, value in given.items() if value is None]
    if nulls and any(name not in ("max_tokens", "max_seconds", "max_spend") for name in nulls):
        raise invalid(
            [
                field_error("body", "/" + name, "may not be null; leave it out to keep it")
                for name in nulls
                if name not in ("max_tokens", "max_seconds", "max_spend")
            ]
        )
    # The admin's checks on the task as it would be (a copy: nothing is saved here).
    copy = Task.objects.get(pk=task.pk)
    values = {**model_to_dict(copy, fields=EDITABLE), **given}
    form = _form_for(EDITABLE)(data=_form_data(values), instance=copy)
    if not form.is_valid():
        raise _form_errors(form)
    grants_added, grants_removed, errors = [], [], []
    for index, name in enumerate(body.grant):
        tool = Tool.objects.filter(name=name).first()
        if tool is None:
            errors.append(field_error("body", f"/grant/{index}", f"there is no tool {name!r}"))
        else:
            grants_added.append((tool, ()))
    granted = dict(ToolGrant.objects.filter(task=task).values_list("tool__name", "pk"))
    for index, name in enumerate(body.revoke):
        if name not in granted:
            errors.append(
                field_error("body", f"/revoke/{index}", f"{name!r} is not granted to {task.slug}")
            )
        else:
            grants_removed.append(granted[name])
    if errors:
        raise invalid(errors)
    try:
        submission = governance.task_change_submit(
            task=task,
            user=who.user,
            values={name: form.cleaned_data[name] for name in given},
            grants_added=grants_added,
            grants_removed=grants_removed,
            note=body.note,
        )
    except governance.GovernanceError as error:
        raise Problem(409, "governance", f"Nothing was changed: {error}.") from None
    task = Task.objects.get(pk=task.pk)
    answer = {
        "task": task_out(task),
        "applied": [governance.op_line(Task, op) for op in submission.applied],
        "pending_change": _pending(submission.held) if submission.held else None,
    }
    return Status(202 if submission.held else 200, answer)
