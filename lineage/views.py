"""The lineage page: a trail as a timeline to step through, the run's state as of the
selected event beside it, the trail's verification on top, and its exports.

One URL serves the page: ``?at=<seq>`` selects an event (the state shown is the run's as
of it), ``?page=<n>`` picks a page of ``PAGE_SIZE`` events (by default the selected
event's). Nothing is sent whole: one page of the timeline, and a state folded from the
events up to the selected one (lineage.state) in one query of the columns it needs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required, permission_required
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Case, JSONField, Max, Min, Q, When
from django.http import Http404, HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from agentops.bad_input import bad_request
from agentops.http import see_other
from lineage.anchoring import ledger_load
from lineage.export_lines import (
    CONTENT_TYPES,
    FORMATS,
    ExportInputError,
    Scope,
    period_parse,
    pieces_for,
    scope_lines,
)
from lineage.models import HASH_CANONICAL, HASH_COLUMNS, UNREADABLE, LineageEvent
from lineage.state import TrailEvent, showable, state_at
from lineage.verification import ChainReport, run_verify

PAGE_SIZE = 100
# A seq fits PositiveIntegerField (at most 2**31 - 1 on every database); a page number
# is a seq's page. More digits than that is refused before any arithmetic.
SEQ_MAX = 2**31 - 1
NUMBER = re.compile(r"[0-9]{1,10}")
# A payload's value longer than this (characters) or lines is folded under a summary.
FOLD_CHARS = 160
FOLD_LINES = 4
# A value is shown up to this many characters; the export holds all of it.
VALUE_KEPT = 20_000

# What each finding means, in the words of the page's list.
FINDING_TITLES = {
    "changed": "Changed",
    "removed": "Removed",
    "reordered": "Reordered",
    "moved": "Moved from another trail",
    "truncated": "Cut short",
    "rewritten": "Rewritten with new hashes",
    "appended": "Added after the end",
    "unanchored": "Missing from the checkpoints",
    "broken": "Seen broken by a checkpoint",
}
SURROGATE = re.compile("[\ud800-\udfff]")


def json_shown(value: Any) -> str:
    """A payload as indented JSON for the page: the exact value, with an unpaired
    surrogate (which no page can carry) written as its escape."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


# Reading the trail ---------------------------------------------------------------


class BadSelection(ValueError):
    """``at`` or ``page`` names no event or page of the trail; the message says why."""


@dataclass(frozen=True)
class Bounds:
    """The trail's first and last seq, and the first seq after the selected event."""

    first: int | None
    last: int | None
    following: int | None

    @property
    def pages(self) -> int:
        return max(1, -(-(self.last or 0) // PAGE_SIZE))


def events_of(run_id: uuid.UUID):
    """The trail's events as (seq, kind, actor, at, hash, body source) rows: the text
    hashed, and the jsonb copy only for events hashed over it (version 0)."""
    return (
        LineageEvent.objects.filter(run_uuid=run_id)
        .annotate(
            columns_payload=Case(
                When(hash_version=HASH_COLUMNS, then="payload"), output_field=JSONField()
            )
        )
        .order_by("seq")
        .values_list(
            "seq", "kind", "actor", "at", "hash", "hash_version", "canonical", "columns_payload"
        )
    )


def trail_event(row: tuple) -> TrailEvent:
    seq, kind, actor, at, _, version, text, payload = row
    return TrailEvent(
        seq=seq, kind=kind, actor=actor, at=at, body=body_read(version, text, payload)
    )


def body_read(version: int, text: str, payload: Any) -> Any:
    """The payload as hashed, as ``LineageEvent.body`` reads it, without making a model
    instance per row (a tenth of the page's time at 500 events)."""
    if version != HASH_CANONICAL:
        return payload
    try:
        return json.loads(text)["payload"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return UNREADABLE


def number_parse(raw: str, name: str) -> int:
    if not NUMBER.fullmatch(raw) or not 1 <= int(raw) <= SEQ_MAX:
        shown = repr(raw[:20] + ("…" if len(raw) > 20 else ""))
        raise BadSelection(f"{name}: {showable(shown)} is not a whole number from 1 to {SEQ_MAX}")
    return int(raw)


def selection_parse(query: QueryDict) -> tuple[int | None, int | None]:
    """``at`` and ``page`` from the query, as numbers, or ``BadSelection``."""
    at, page = query.get("at", ""), query.get("page", "")
    return (
        number_parse(at, "at") if at else None,
        number_parse(page, "page") if page else None,
    )


def trail_bounds(run_id: uuid.UUID, at: int | None) -> Bounds:
    """The trail's first and last seq and, when an event is selected, the seq after it
    (a broken trail may miss some): one aggregate over the (run, seq) index."""
    aggregates = {"first": Min("seq"), "last": Max("seq")}
    if at is not None:
        aggregates["following"] = Min("seq", filter=Q(seq__gt=at))
    found = LineageEvent.objects.filter(run_uuid=run_id).aggregate(**aggregates)
    return Bounds(found["first"], found["last"], found.get("following"))


def selection_check(bounds: Bounds, at: int | None, page: int | None) -> None:
    if at is not None:
        if bounds.last is None:
            raise BadSelection(f"at: there is no event #{at}: this trail holds no events")
        if not bounds.first <= at <= bounds.last:
            raise BadSelection(
                f"at: there is no event #{at}: this trail's events run from"
                f" #{bounds.first} to #{bounds.last}"
            )
    if page is not None and page > bounds.pages:
        raise BadSelection(
            f"page: there is no page {page}: this trail has {bounds.pages}"
            f" page{'s' if bounds.pages != 1 else ''} of {PAGE_SIZE} events"
        )


def page_of(seq: int) -> int:
    return (seq - 1) // PAGE_SIZE + 1


# Showing it ------------------------------------------------------------------------


def moment(at: datetime) -> dict[str, str]:
    """A time as the page shows it: ISO 8601 in the server's time zone with its offset,
    and in UTC to the microsecond (the title, and the ``datetime`` attribute)."""
    return {
        "local": timezone.localtime(at).isoformat(timespec="milliseconds"),
        "utc": at.astimezone(UTC).isoformat(timespec="microseconds"),
    }


def value_shown(value: Any) -> dict[str, Any]:
    """One payload value: a string as it is, anything else as JSON (indented when it is
    long: a short one reads better on one line); long ones folded under their
    beginning, very long ones cut (the export holds them whole)."""
    is_json = not isinstance(value, str)
    text = json_compact(value) if is_json else showable(value)
    # The summary of a folded value is its beginning on one line.
    first_line = text.split("\n", 1)[0]
    if is_json and FOLD_CHARS < len(text) <= VALUE_KEPT:
        text = json_shown(value)
    cut = max(0, len(text) - VALUE_KEPT)
    if cut:
        text = text[:VALUE_KEPT]
    long = len(text) > FOLD_CHARS or text.count("\n") >= FOLD_LINES
    return {
        "text": text,
        "json": is_json,
        "block": "\n" in text,
        "long": long,
        "summary": first_line[:80] + ("…" if len(first_line) > 80 or long else ""),
        "cut": cut,
    }


def json_compact(value: Any) -> str:
    """A value as JSON on one line (the C encoder: indenting takes Python's, ten times
    slower), what no page can carry escaped."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
    return SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def payload_shown(body: Any) -> list[dict[str, Any]]:
    """A payload: a dict as a list of its keys and values, anything else as one value
    without a key (shown as JSON)."""
    if isinstance(body, dict):
        return [
            {"key": showable(str(key)), **value_shown(value)} for key, value in sorted(body.items())
        ]
    return [{"key": None, **value_shown(body)}]


def event_shown(
    event: TrailEvent, digest: str, flagged: set[int], selected: int | None
) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "actor": event.actor,
        "at": moment(event.at),
        "hash": digest,
        "payload": payload_shown(event.body),
        "payload_tag": "dl" if isinstance(event.body, dict) else "div",
        "flagged": event.seq in flagged,
        "selected": event.seq == selected,
    }


def trail_owner(run_id: uuid.UUID, first_kind: str) -> dict[str, str]:
    """What the trail belongs to, for the heading's link: a run (and its task), a task,
    or a tool. Lineage stores no foreign key (so no delete reaches it); the owner is
    looked up by UUID, and a trail whose owner is gone is shown as a bare trail. A run's
    trail begins with ``run.queued``; a task's or a tool's with anything else."""
    # Imported here: lineage's models and services depend on no other app.
    from tasks.autonomy import task_trail_uuid
    from tasks.governance import tool_trail_uuid
    from tasks.models import Run, Task, Tool

    if first_kind.startswith("run."):
        run = Run.objects.filter(pk=run_id).values("task__slug", "task__name").first()
        return (
            {"what": ""}
            if run is None
            else {
                "what": "run",
                "url": reverse("runs:detail", args=[run_id]),
                "task_name": run["task__name"],
                "task_url": reverse("tasks:detail", args=[run["task__slug"]]),
            }
        )
    # A task's or a tool's trail UUID is derived from its id (uuid5): the few tasks and
    # tools are compared, in one query each.
    for pk, slug, name in Task.objects.values_list("pk", "slug", "name"):
        if task_trail_uuid(Task(pk=pk)) == run_id:
            return {"what": "task", "url": reverse("tasks:detail", args=[slug]), "name": name}
    for pk, name in Tool.objects.values_list("pk", "name"):
        if tool_trail_uuid(pk) == run_id:
            try:
                url = reverse("tools:detail", args=[name])
            except NoReverseMatch:  # a name no URL can carry (a "/"): named, not linked
                url = ""
            return {"what": "tool", "url": url, "name": name}
    return {"what": ""}


def verification_context(run_id: uuid.UUID, report: ChainReport, ledger: Any) -> dict:
    anchor = report.anchor
    return {
        "run_id": run_id,
        "report": report,
        "findings": [
            {"title": FINDING_TITLES.get(finding.what, finding.what), "finding": finding}
            for finding in report.findings
        ],
        "anchor": anchor,
        "unsealed": report.events - anchor.size if anchor and report.intact else 0,
        "log_problems": ledger.problems,
        "checked_at": moment(timezone.now()),
    }


def link(run_id: uuid.UUID, *, at: int | None = None, page: int | None = None) -> str:
    """The page's URL selecting event ``at`` (and scrolled to it), or showing ``page``
    with ``at`` still selected."""
    url = reverse("runs:lineage:run", args=[run_id])
    if page is not None:
        return f"{url}?page={page}" + (f"&at={at}" if at is not None else "")
    return f"{url}?at={at}#e{at}" if at is not None else url


# The views -----------------------------------------------------------------------


@require_GET
@login_required
def run_lineage(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """The trail's page. An ``at`` or ``page`` it cannot show is a 400 that says why,
    with the trail shown from its start below the sentence."""
    refusal = ""
    try:
        at, page = selection_parse(request.GET)
    except BadSelection as error:
        refusal, at, page = str(error), None, None
    ledger = ledger_load()
    report = run_verify(run_uuid=run_id, ledger=ledger)
    bounds = trail_bounds(run_id, at)
    if bounds.last is None and report.anchor is None:
        raise Http404("no lineage for this run")
    try:
        selection_check(bounds, at, page)
    except BadSelection as error:
        refusal, at, page = str(error), None, None
        bounds = Bounds(bounds.first, bounds.last, None)
    timeline = timeline_context(run_id, report, bounds, at, page)
    context = {
        **verification_context(run_id, report, ledger),
        **timeline,
        "owner": trail_owner(run_id, timeline["first_kind"]),
        "refusal": refusal,
        "formats": FORMATS,
    }
    return render(request, "lineage/run.html", context, status=400 if refusal else 200)


def timeline_context(
    run_id: uuid.UUID, report: ChainReport, bounds: Bounds, at: int | None, page: int | None
) -> dict[str, Any]:
    """One page of the timeline, and the run's state as of the selected event (or as
    the trail ends, when none is). One query reads the events the state is folded from
    and the page's: from the first up to the selected event or the page's end, whichever
    is later (the selected event's page is the default, so usually up to its end)."""
    page = page or (page_of(at) if at is not None else 1)
    low, high = (page - 1) * PAGE_SIZE + 1, page * PAGE_SIZE
    rows = []
    if bounds.last is not None:
        events = events_of(run_id)
        rows = list(events.filter(seq__lte=max(high, at)) if at is not None else events)
    read = [(trail_event(row), row[4]) for row in rows]
    folded = [event for event, _ in read if at is None or event.seq <= at]
    state = state_at(folded)
    trail_start = folded[0].at if folded else None
    # A seq missing from a broken trail selects the event before it.
    gap = at if at is not None and state.seq != at else None
    selected = state.seq if at is not None else None
    previous = folded[-2].seq if at is not None and len(folded) > 1 else None
    flagged = {finding.seq for finding in report.findings}
    shown = [
        event_shown(event, digest, flagged, selected)
        for event, digest in read
        if low <= event.seq <= high
    ]
    following = bounds.following if at is not None else (shown[0]["seq"] if shown else None)
    return {
        "rows": shown,
        "first_kind": read[0][0].kind if read else "",
        "state": state,
        "state_at": moment(state.at) if state.at else None,
        "selected": selected,
        "gap": gap,
        "page": page,
        "pages": bounds.pages,
        "last_seq": bounds.last or 0,
        "first_seq": low,
        "previous_url": link(run_id, at=previous) if previous else "",
        "next_url": link(run_id, at=following) if following else "",
        "latest_url": link(run_id, at=bounds.last) if bounds.last else "",
        "page_previous_url": link(run_id, page=page - 1, at=selected) if page > 1 else "",
        "page_next_url": (link(run_id, page=page + 1, at=selected) if page < bounds.pages else ""),
        # The period form's default: from the trail's first day to the selected event's.
        "period_since": local_day(trail_start) if trail_start else "",
        "period_until": local_day(state.at, days_after=1) if state.at else "",
    }


def local_day(at: datetime, *, days_after: int = 0) -> str:
    """The date of ``at`` in the server's time zone (plus ``days_after``), ISO 8601."""
    day = timezone.localtime(at).date()
    return day.fromordinal(day.toordinal() + days_after).isoformat()


@require_POST
@login_required
def run_lineage_verify(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """Check the trail again (lineage.verification.run_verify): htmx swaps the panel;
    without JavaScript the form's POST comes back to the page (303), which shows the
    check just made."""
    ledger = ledger_load()
    report = run_verify(run_uuid=run_id, ledger=ledger)
    if report.events == 0 and report.anchor is None:
        raise Http404("no lineage for this run")
    if not request.htmx:
        return see_other(reverse("runs:lineage:run", args=[run_id]) + "#verification")
    context = verification_context(run_id, report, ledger)
    return render(request, "lineage/run.html#verification", context)


@require_GET
@login_required
def run_lineage_export(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """This trail, whole, as JSON Lines or CSV (``?format=``)."""
    fmt = request.GET.get("format", "jsonl")
    if fmt not in FORMATS:
        return bad_request(f"format: {showable(repr(fmt[:20]))} is not one of {', '.join(FORMATS)}")
    if not LineageEvent.objects.filter(run_uuid=run_id).exists():
        raise Http404("no lineage for this run")
    return export_response(request, Scope(run_uuid=run_id), fmt)


@require_GET
@login_required
@permission_required("lineage.export_period", raise_exception=True)
def period_export(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """Every trail's events with their time in [since, until), as JSON Lines or CSV:
    offered on a trail's page, the period's events of all trails."""
    fmt = request.GET.get("format", "jsonl")
    if fmt not in FORMATS:
        return bad_request(f"format: {showable(repr(fmt[:20]))} is not one of {', '.join(FORMATS)}")
    try:
        scope = period_parse(request.GET.get("since", ""), request.GET.get("until", ""))
    except ExportInputError as error:
        return bad_request(f"Not exported: {showable(str(error))}.")
    return export_response(request, scope, fmt)


def export_response(request: HttpRequest, scope: Scope, fmt: str) -> StreamingHttpResponse:
    """The scope's lines, streamed as they are read: a period of millions of events is
    never held whole, under WSGI or ASGI."""
    pieces = pieces_for(fmt, scope_lines(scope))
    content = pieces_async(pieces) if isinstance(request, ASGIRequest) else pieces
    response = StreamingHttpResponse(content, content_type=CONTENT_TYPES[fmt])
    response["Content-Disposition"] = f'attachment; filename="{scope.filename(fmt)}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


async def pieces_async(pieces: Iterable[str]) -> AsyncIterator[str]:
    """``pieces`` for an ASGI server, one at a time. Given a plain iterator, Django's
    ASGI handler would read it whole into memory first; each piece here is read in the
    thread the database connection belongs to (``thread_sensitive``)."""
    iterator: Iterator[str] = iter(pieces)
    piece_next = sync_to_async(lambda: next(iterator, None), thread_sensitive=True)
    while (piece := await piece_next()) is not None:
        yield piece
