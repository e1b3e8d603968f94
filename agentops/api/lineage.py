"""A run's trail: its events a page at a time, its verification
(lineage.services.chain_verify) and its export as JSON Lines (lineage.export_lines, as
the trail's page exports it). A trail is read by whoever may read runs, as on the pages.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.http import HttpRequest, StreamingHttpResponse
from ninja import Field, Query, Router, Schema, Status

from agentops.api.auth import require
from agentops.api.errors import problems
from agentops.api.schemas import not_found, run_uuid_parse
from agentops.models import TokenScope
from lineage.export_lines import CONTENT_TYPES, Scope, jsonl_pieces, scope_lines
from lineage.models import LineageEvent
from lineage.services import chain_verify

router = Router(tags=["lineage"])

PER_PAGE = 100


class EventOut(Schema):
    seq: int
    at: datetime.datetime
    kind: str
    actor: str
    payload: Any = Field(None, description="The payload exactly as it was hashed.")
    prev_hash: str
    hash: str


class EventPageOut(Schema):
    run: str
    count: int
    page: int
    pages: int
    items: list[EventOut]


class FindingOut(Schema):
    what: str
    seq: int | None
    text: str


class AnchorOut(Schema):
    size: int = Field(description="Events the signed checkpoint covers.")
    head: str
    final: bool
    at: str


class VerifyOut(Schema):
    run: str
    events: int
    intact: bool
    problem: str = Field(description="The first problem found, or empty.")
    findings: list[FindingOut]
    anchor: AnchorOut | None = Field(description="The latest signed checkpoint of the chain.")


def _events(run_id: str):
    run_uuid = run_uuid_parse(run_id)
    events = LineageEvent.objects.filter(run_uuid=run_uuid)
    if not events.exists():
        raise not_found("trail")
    return run_uuid, events


@router.get(
    "/runs/{run_id}/lineage/events",
    response={200: EventPageOut, **problems(401, 403, 404, 422, 429)},
    summary="A run's trail, 100 events a page, in order",
)
def lineage_events(request: HttpRequest, run_id: str, page: int = Query(1, ge=1, le=1_000_000)):
    require(request, scope=TokenScope.READ, query=("page",))
    run_uuid, events = _events(run_id)
    count = events.count()
    start = (page - 1) * PER_PAGE
    rows = events.order_by("seq")[start : start + PER_PAGE]
    return Status(
        200,
        {
            "run": str(run_uuid),
            "count": count,
            "page": page,
            "pages": -(-count // PER_PAGE),
            "items": [
                {
                    "seq": event.seq,
                    "at": event.at,
                    "kind": event.kind,
                    "actor": event.actor,
                    "payload": event.body,
                    "prev_hash": event.prev_hash,
                    "hash": event.hash,
                }
                for event in rows
            ],
        },
    )


@router.get(
    "/runs/{run_id}/lineage/verify",
    response={200: VerifyOut, **problems(401, 403, 404, 422, 429)},
    summary="Verify a run's trail: every hash, and the latest signed checkpoint",
)
def lineage_verify(request: HttpRequest, run_id: str):
    require(request, scope=TokenScope.READ)
    run_uuid, _ = _events(run_id)
    report = chain_verify(run_uuid)
    anchor = report.anchor
    return Status(
        200,
        {
            "run": str(run_uuid),
            "events": report.events,
            "intact": report.intact,
            "problem": report.problem,
            "findings": [
                {"what": finding.what, "seq": finding.seq, "text": finding.text}
                for finding in report.findings
            ],
            "anchor": (
                {"size": anchor.size, "head": anchor.head, "final": anchor.final, "at": anchor.at}
                if anchor is not None
                else None
            ),
        },
    )


@router.get(
    "/runs/{run_id}/lineage/export",
    response={200: None, **problems(401, 403, 404, 422, 429)},
    summary="A run's trail as JSON Lines, one event a line, each with the text its hash covers",
    openapi_extra={
        "responses": {
            "200": {
                "description": "JSON Lines (lineage.export_lines): check it with "
                "python -m lineage.export_lines FILE.",
                "content": {CONTENT_TYPES["jsonl"]: {"schema": {"type": "string"}}},
            }
        }
    },
)
def lineage_export(request: HttpRequest, run_id: str):
    require(request, scope=TokenScope.READ)
    run_uuid, _ = _events(run_id)
    scope = Scope(run_uuid=run_uuid)
    response = StreamingHttpResponse(
        jsonl_pieces(scope_lines(scope)), content_type=CONTENT_TYPES["jsonl"]
    )
    response["Content-Disposition"] = f'attachment; filename="{scope.filename("jsonl")}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
