"""Approvals: those I may decide, one of them, approve (with edited arguments),
reject with a reason. Read through approvals.selectors and decided through the inbox's
own form and service (approvals.forms.DecisionForm, approvals.services.approval_decide,
which checks decider_refusal under the run's lock): the same rules as the inbox."""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status
from pydantic import ConfigDict

from agentops.api.auth import require
from agentops.api.errors import Problem, field_error, invalid, problems
from agentops.api.schemas import Text, id_or_404, not_found
from agentops.models import TokenScope
from approvals import selectors
from approvals.forms import DecisionForm
from approvals.models import Approval, ApprovalKind
from approvals.services import DecisionError, approval_decide, decider_refusal

router = Router(tags=["approvals"])

PER_PAGE = 50
DECIDE = "approvals.decide_approval"


class ApprovalOut(Schema):
    id: int
    run: str
    task: str
    kind: str
    status: str
    tool: str
    arguments: Any = None
    side_effect: str
    gate: str = Field(description="The rule or gate that stopped the call.")
    reasoning: str
    confidence: float | None
    context: dict[str, Any]
    group: str | None
    created_at: datetime.datetime
    expires_at: datetime.datetime | None
    decided_at: datetime.datetime | None
    decided_by: str | None
    decision_reason: str
    edited_arguments: Any = None
    resolution: str


class ApprovalPageOut(Schema):
    count: int
    page: int
    pages: int
    items: list[ApprovalOut]


class ApproveIn(Schema):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    reason: Text = Field(
        "", max_length=2000, description="Why; for a question, the answer (required)."
    )
    arguments: dict[str, Any] | None = Field(
        None, description="An action's arguments as edited: the engine fires exactly these."
    )
    resolution: Literal["happened", "refire"] | None = Field(
        None, description="For an unknown outcome: the call happened, or make it."
    )
    result: Any = Field(None, description="For an unknown outcome that happened: its result.")


class RejectIn(Schema):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    reason: Text = Field(min_length=1, max_length=2000, description="Why: the agent reads it.")


def _approval_links(pointer: str) -> dict[str, Any]:
    """OpenAPI links from an answer holding an approval's id at ``pointer``."""
    approval_id = {"approval_id": f"$response.body#{pointer}"}
    return {
        name: {"operationId": operation, "parameters": approval_id}
        for name, operation in (
            ("ReadApproval", "approvals_read"),
            ("Approve", "approvals_approve"),
            ("Reject", "approvals_reject"),
        )
    }


def approval_out(approval: Approval) -> dict[str, Any]:
    return {
        "id": approval.pk,
        "run": str(approval.run_id),
        "task": approval.run.task.slug,
        "kind": approval.kind,
        "status": approval.status,
        "tool": approval.tool_name,
        "arguments": approval.arguments,
        "side_effect": approval.side_effect,
        "gate": approval.gate,
        "reasoning": approval.reasoning,
        "confidence": approval.confidence,
        "context": approval.context or {},
        "group": approval.group.name if approval.group_id else None,
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_at": approval.decided_at,
        "decided_by": approval.decided_by.get_username() if approval.decided_by else None,
        "decision_reason": approval.decision_reason,
        "edited_arguments": approval.edited_arguments,
        "resolution": approval.resolution,
    }


def _approval_or_404(request: HttpRequest, approval_id: str) -> Approval:
    """One approval this person may see (approvals.selectors): any other is a 404,
    whether it exists or not."""
    pk = id_or_404(approval_id, "approval")
    try:
        return selectors.approval_for_user(request.auth.user, pk)
    except Approval.DoesNotExist:
        raise not_found("approval") from None


@router.get(
    "/approvals",
    response={200: ApprovalPageOut, **problems(401, 403, 422, 429)},
    summary="List the pending approvals I may decide, most urgent first",
    openapi_extra={"responses": {"200": {"links": _approval_links("/items/0/id")}}},
)
def approvals_list(request: HttpRequest, page: int = Query(1, ge=1, le=1_000_000)):
    who = require(request, scope=TokenScope.READ, query=("page",))
    # As the inbox: visible to this person, and not barred from them by four eyes.
    pending = selectors.approvals_pending_for(who.user).filter(barred=False)
    count = pending.count()
    start = (page - 1) * PER_PAGE
    rows = pending.select_related("decided_by")[start : start + PER_PAGE]
    return Status(
        200,
        {
            "count": count,
            "page": page,
            "pages": -(-count // PER_PAGE),
            "items": [approval_out(approval) for approval in rows],
        },
    )


@router.get(
    "/approvals/{approval_id}",
    response={200: ApprovalOut, **problems(401, 403, 404, 422, 429)},
    summary="Read an approval",
)
def approvals_read(request: HttpRequest, approval_id: str):
    require(request, scope=TokenScope.READ)
    return Status(200, approval_out(_approval_or_404(request, approval_id)))


def _decide(request: HttpRequest, approval_id: str, data: dict[str, str]):
    who = require(request, scope=TokenScope.APPROVE, perms=(DECIDE,))
    approval = _approval_or_404(request, approval_id)
    refusal = decider_refusal(who.user, approval)
    if refusal:
        raise Problem(403, "decider", f"Not decided: {refusal}.")
    form = DecisionForm(data, approval=approval)
    if not form.is_valid():
        pointers = {"decision": "/resolution", "reason": "/reason"}
        raise invalid(
            [
                field_error("body", pointers.get(name, "/" + name), message)
                for name, messages in form.errors.items()
                for message in messages
            ]
        )
    try:
        approval_decide(approval=approval, user=who.user, **form.decision_arguments())
    except DecisionError as error:
        raise Problem(409, "decision", f"Not decided: {error}.") from None
    return Status(200, approval_out(selectors.approval_for_user(who.user, approval.pk)))


@router.post(
    "/approvals/{approval_id}/approve",
    response={200: ApprovalOut, **problems(400, 401, 403, 404, 409, 422, 429)},
    summary="Approve (an action: optionally with edited arguments)",
    description="An unknown outcome takes a resolution (happened, with its result if "
    "known, or refire); a question takes the answer as the reason.",
)
def approvals_approve(request: HttpRequest, approval_id: str, body: ApproveIn):
    require(request, scope=TokenScope.APPROVE, perms=(DECIDE,))
    approval = _approval_or_404(request, approval_id)
    if approval.kind == ApprovalKind.UNKNOWN_OUTCOME:
        if body.resolution is None:
            raise invalid(
                [
                    field_error(
                        "body",
                        "/resolution",
                        "say whether the call happened or should be made (happened, refire)",
                    )
                ]
            )
        decision = body.resolution
    elif body.resolution is not None:
        raise invalid(
            [field_error("body", "/resolution", "only an unknown outcome takes a resolution")]
        )
    else:
        decision = "answer" if approval.kind == ApprovalKind.QUESTION else "approve"
    if body.result is not None and decision != "happened":
        # Ignored, it would approve something other than what the caller meant: an
        # action's call as proposed, not one "with this result".
        raise invalid(
            [
                field_error(
                    "body",
                    "/result",
                    "only an unknown outcome resolved as happened takes a result",
                )
            ]
        )
    if body.arguments is not None and approval.kind != ApprovalKind.ACTION:
        raise invalid(
            [field_error("body", "/arguments", "only an action's arguments can be edited")]
        )
    data = {"decision": decision, "reason": body.reason}
    if body.arguments is not None:
        data["arguments"] = json.dumps(body.arguments)
    if body.result is not None:
        data["result"] = json.dumps(body.result)
    return _decide(request, approval_id, data)


@router.post(
    "/approvals/{approval_id}/reject",
    response={200: ApprovalOut, **problems(400, 401, 403, 404, 409, 422, 429)},
    summary="Reject with a reason (an unknown outcome: stop the run)",
)
def approvals_reject(request: HttpRequest, approval_id: str, body: RejectIn):
    require(request, scope=TokenScope.APPROVE, perms=(DECIDE,))
    approval = _approval_or_404(request, approval_id)
    decision = "stop" if approval.kind == ApprovalKind.UNKNOWN_OUTCOME else "reject"
    return _decide(request, approval_id, {"decision": decision, "reason": body.reason})
