"""Live pages over server-sent events, with polling as the fallback (tasks.live).

``run_live`` streams what a run page lacks as it happens; ``run_changes`` answers the
same question once, for a page that cannot hold a stream open (a proxy that buffers, a
browser without EventSource: static/live.js falls back to it). ``trail_live`` tells the
lists (runs, approvals) when anything was recorded, at most every few seconds, so they
fetch their rows again instead of each polling on its own clock.

Served by an ASGI server (``manage.py serve`` runs uvicorn), a stream is an async
generator: it holds no thread between looks. Under WSGI (runserver, the test client) the
same loop runs as a plain generator in the request's thread. Either way a stream ends
after ``AGENTOPS_LIVE_STREAM_SECONDS`` (the browser reconnects, sending the last event's
id, so nothing is missed) and when the run is finished and the page has all of it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections, connection
from django.db.models import Max
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET

from agentops.bad_input import bad_request
from lineage.models import LineageEvent
from tasks import live
from tasks.models import Run

logger = logging.getLogger("agentops.live")

# How often a stream looks at the trail: a step shows within about this, plus a render.
LOOK_SECONDS = 0.5
# The lists refresh at most this often, however busy the trail is.
TRAIL_EVENT_SECONDS = 2.0
# A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
# What the browser waits before reconnecting a stream that ended or broke.
RETRY_MILLISECONDS = 2000


def sse_event(*, event: str, data: str = "", event_id: str = "") -> str:
    """One server-sent event. Every line of ``data`` gets its own ``data:`` field, so no
    line break in the HTML can end the event early or forge a field."""
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return "\n".join(lines) + "\n\n"


# Streams open in this process, by user: each holds a thread and looks twice a second,
# so one person's tabs (or a script) cannot take the server's.
_open_streams: Counter[int] = Counter()
_open_lock = threading.Lock()


def _stream_claim(user_id: int) -> bool:
    with _open_lock:
        if _open_streams[user_id] >= settings.AGENTOPS_LIVE_STREAMS_PER_USER:
            return False
        _open_streams[user_id] += 1
        return True


def _stream_release(user_id: int) -> None:
    with _open_lock:
        _open_streams[user_id] -= 1
        if _open_streams[user_id] <= 0:
            del _open_streams[user_id]


def stream_response(request: HttpRequest, look: Callable[[], tuple[str, bool]]) -> HttpResponse:
    """A text/event-stream that calls ``look`` every LOOK_SECONDS: it returns what to
    send ("" for nothing) and whether the stream is done. Past a person's
    AGENTOPS_LIVE_STREAMS_PER_USER open streams in this process: a 503 with Retry-After
    (the page's polling fallback, or a later reconnect, takes over)."""
    limit = settings.AGENTOPS_LIVE_STREAM_SECONDS
    user_id = request.user.pk
    if not _stream_claim(user_id):
        response = HttpResponse(
            "Too many live pages open for you on this server: close some, or reload later.",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
        response["Retry-After"] = "30"
        return response

    def looked() -> tuple[str, bool]:
        try:
            return look()
        except Exception as error:
            # The database went away (or any other fault): the stream ends, and the
            # browser reconnects in RETRY_MILLISECONDS from the last event it has.
            logger.warning("a live stream ended: %s: %s", type(error).__name__, error)
            return "", True
        finally:
            # A stream is a long request: it gives its connection back between looks
            # (with CONN_MAX_AGE at 0) rather than holding one for every open page.
            # Not inside a transaction: a test's, which the test client runs in.
            if not connection.in_atomic_block:
                close_old_connections()

    def sync_stream() -> Iterator[str]:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        started = quiet = time.monotonic()
        while time.monotonic() - started < limit:
            sent, done = looked()
            if sent:
                quiet = time.monotonic()
                yield sent
            if done:
                return
            if time.monotonic() - quiet > KEEPALIVE_SECONDS:
                quiet = time.monotonic()
                yield ": keepalive\n\n"
            time.sleep(LOOK_SECONDS)

    async def async_stream() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        started = quiet = time.monotonic()
        while time.monotonic() - started < limit:
            sent, done = await sync_to_async(looked)()
            if sent:
                quiet = time.monotonic()
                yield sent
            if done:
                return
            if time.monotonic() - quiet > KEEPALIVE_SECONDS:
                quiet = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(LOOK_SECONDS)

    # The place is given back once: when the stream ends, or when the server closes the
    # response (the client left), whether the stream started or not.
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            _stream_release(user_id)

    def sync_released() -> Iterator[str]:
        try:
            yield from sync_stream()
        finally:
            release()

    async def async_released() -> AsyncIterator[str]:
        try:
            async for part in async_stream():
                yield part
        finally:
            release()

    stream = async_released() if isinstance(request, ASGIRequest) else sync_released()
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response._resource_closers.append(release)
    response["Cache-Control"] = "no-store, private"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return response


def _cursor_of(request: HttpRequest, run: Run) -> live.Cursor | HttpResponse:
    """The page's cursor: the last event's id on a reconnect, else the query's."""
    text = request.headers.get("Last-Event-ID") or request.GET.get("cursor", "")
    try:
        return live.Cursor.parse(text)
    except live.CursorInvalid:
        return bad_request(
            "cursor: not one this page wrote; reload the run page to follow the run again."
        )


def _run_or_404(run_id: uuid.UUID) -> Run:
    try:
        return Run.objects.only("pk").get(pk=run_id)
    except Run.DoesNotExist:
        raise Http404("no such run") from None


@require_GET
@login_required
def run_live(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = _run_or_404(run_id)
    cursor = _cursor_of(request, run)
    if isinstance(cursor, HttpResponse):
        return cursor
    state = {"cursor": cursor}

    def look() -> tuple[str, bool]:
        changes = live.run_changes(run.pk, state["cursor"], request=request)
        state["cursor"] = changes.cursor
        sent = ""
        if changes.html:
            sent = sse_event(event="changes", data=changes.html, event_id=changes.cursor.text())
        if changes.finished:
            sent += sse_event(event="end", data="finished")
        return sent, changes.finished

    return stream_response(request, look)


@require_GET
@login_required
def run_changes(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """The polling fallback: what the page lacks now, and its next cursor in a header."""
    run = _run_or_404(run_id)
    cursor = _cursor_of(request, run)
    if isinstance(cursor, HttpResponse):
        return cursor
    changes = live.run_changes(run.pk, cursor, request=request)
    response = HttpResponse(changes.html)
    response["X-Live-Cursor"] = changes.cursor.text()
    response["X-Live-Finished"] = "true" if changes.finished else "false"
    response["Cache-Control"] = "no-store"
    return response


def trail_last_id() -> int:
    return LineageEvent.objects.aggregate(last=Max("pk"))["last"] or 0


@require_GET
@login_required
def trail_live(request: HttpRequest) -> HttpResponse:
    """An event named ``trail`` whenever anything was recorded, at most every
    TRAIL_EVENT_SECONDS: the lists fetch their rows again on it."""
    state = {"last": trail_last_id(), "looked_at": time.monotonic()}

    def look() -> tuple[str, bool]:
        # One look every TRAIL_EVENT_SECONDS: a list page costs no more than a poll.
        if time.monotonic() - state["looked_at"] < TRAIL_EVENT_SECONDS:
            return "", False
        state["looked_at"] = time.monotonic()
        last = trail_last_id()
        if last == state["last"]:
            return "", False
        state["last"] = last
        return sse_event(event="trail", data=str(last), event_id=str(last)), False

    return stream_response(request, look)
