"""Tasks as code over the API: the YAML ``manage.py export_tasks`` writes, and the
import ``manage.py import_tasks`` makes (tasks.as_code), as the token's user.

The import is two calls, as on the command line: ``plan`` says what would change and
writes nothing; ``apply`` applies the file through the governed path, refusing when
what it would do is no longer what the plan the caller read said (``expect``: the plan's
digest). A file at fault is a 422 whose errors name each fault's line, column and field.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status
from pydantic import ConfigDict

from agentops.api.auth import require
from agentops.api.errors import Problem, field_error, invalid, problems
from agentops.api.schemas import Text
from agentops.models import TokenScope
from tasks.as_code import (
    MAX_BYTES,
    AsCodeError,
    tasks_export,
    tasks_import_apply,
    tasks_import_plan,
)
from tasks.models import Task

router = Router(tags=["tasks as code"])


class ExportQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    slug: list[Text] = Field(
        default_factory=list, max_length=500, description="Only these tasks (all when none)."
    )


class ExportOut(Schema):
    yaml: str = Field(description="The tasks as docs/tasks-as-code.md describes them.")
    tasks: list[str]


class ImportIn(Schema):
    model_config = ConfigDict(extra="forbid")

    yaml: Text = Field(max_length=MAX_BYTES, description="The file's text, whole.")
    expect: Text | None = Field(
        None,
        max_length=64,
        description="apply only: the digest of the plan you read; when what the file "
        "would do has changed since, nothing is applied (409).",
    )


class TaskPlanOut(Schema):
    slug: str
    new: bool
    lines: list[str]


class PlanOut(Schema):
    has_changes: bool
    diff: list[str] = Field(description="What would change, a line each.")
    tasks: list[TaskPlanOut]
    untouched: list[str] = Field(description="Live tasks the file does not name: left alone.")
    digest: str = Field(description="Give it back as `expect` to apply exactly this.")


class PendingOut(Schema):
    task: str
    kind: str = Field(description="config (a ConfigChange) or autonomy (a dial request).")
    id: int
    lines: list[str]


class ApplyOut(Schema):
    applied: list[str]
    pending: list[PendingOut] = Field(description="What waits for a second person.")
    notes: list[str]


def _file_errors(error: AsCodeError) -> Problem:
    return invalid(
        [
            field_error("body", "/yaml", str(problem)[:2000])
            for problem in error.problems[:200]  # a file can hold many; the first 200
        ],
        detail="The file is refused; nothing was changed: "
        + "; ".join(str(problem)[:300] for problem in error.problems[:5]),
    )


def _plan(text: str, user: Any):
    try:
        return tasks_import_plan(text=text, user=user)
    except AsCodeError as error:
        raise _file_errors(error) from None
    except PermissionDenied as error:
        raise Problem(403, "permission", str(error) or "You may not make these changes.") from None


def _plan_out(plan: Any) -> dict[str, Any]:
    return {**plan.as_dict(), "digest": plan.digest}


@router.get(
    "/tasks-as-code",
    response={200: ExportOut, **problems(400, 401, 403, 404, 422, 429)},
    summary="Export tasks as YAML",
)
def tasks_code_export(request: HttpRequest, filters: Query[ExportQuery]):
    require(
        request, scope=TokenScope.READ, perms=("tasks.view_task",), query=("slug",), lists=("slug",)
    )
    tasks = Task.objects.all()
    if filters.slug:
        tasks = tasks.filter(slug__in=filters.slug)
        missing = sorted(set(filters.slug) - set(tasks.values_list("slug", flat=True)))
        if missing:
            raise Problem(404, "not-found", f"No task {', '.join(missing)[:300]} here.")
    try:
        text = tasks_export(tasks=tasks)
    except AsCodeError as error:  # past the file's limits: export fewer tasks
        raise Problem(422, "validation", str(error)[:2000]) from None
    return Status(200, {"yaml": text, "tasks": sorted(tasks.values_list("slug", flat=True))})


@router.post(
    "/tasks-as-code/plan",
    response={200: PlanOut, **problems(400, 401, 403, 422, 429)},
    summary="What importing a file would change (writes nothing)",
)
def tasks_code_plan(request: HttpRequest, body: ImportIn):
    who = require(request, scope=TokenScope.OPERATE)
    if body.expect is not None:
        raise invalid([field_error("body", "/expect", "only apply takes expect")])
    return Status(200, _plan_out(_plan(body.yaml, who.user)))


@router.post(
    "/tasks-as-code/apply",
    response={200: ApplyOut, **problems(400, 401, 403, 409, 422, 429)},
    summary="Import a file through the governed path",
    description="As `manage.py import_tasks FILE --apply`, made by the token's user: what "
    "narrows applies now (new task versions); what widens waits for a second person.",
)
def tasks_code_apply(request: HttpRequest, body: ImportIn):
    who = require(request, scope=TokenScope.OPERATE)
    plan = _plan(body.yaml, who.user)
    if body.expect is not None and body.expect != plan.digest:
        raise Problem(
            409,
            "plan-changed",
            "What the file would change is not the plan you read (expect): plan it again.",
        )
    try:
        result = tasks_import_apply(plan=plan, user=who.user)
    except AsCodeError as error:
        raise _file_errors(error) from None
    except PermissionDenied as error:
        raise Problem(403, "permission", str(error) or "You may not make these changes.") from None
    return Status(200, result.as_dict())
