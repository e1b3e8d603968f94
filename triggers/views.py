"""A webhook trigger's endpoint: ``POST /hooks/<public_id>/``.

The order of the checks is the contract: an address that is not a
webhook trigger with a secret is 404, whichever way it is not; a body over the
trigger's ``max_body_bytes`` is 413, read no further than that; a delivery that does not
authenticate is 401 (``reason``: ``signature`` or ``timestamp``); a body that is not
strict JSON is 400; then ``trigger_fire`` decides, keyed by ``webhook-id``. Every answer
is JSON with an ``error`` and a ``reason`` where it refuses. Nothing before
``trigger_fire`` writes to the database, so what does not authenticate leaves no trace
there (it is logged).
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from agentops.strict_json import json_loads_strict
from tasks.models import Trigger
from triggers.config import config_of
from triggers.models import Firing
from triggers.services import KEY_CHARS, Fired, trigger_fire, trigger_secrets
from triggers.webhooks import Delivery, WebhookRefused, webhook_verify

logger = logging.getLogger("agentops.triggers.webhooks")

Refusal = Firing.Refusal
# The shape of trigger_public_id's ids (token_urlsafe): anything else is not one, and is
# not looked up (a NUL in the path would be refused by PostgreSQL, a 500).
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
DIGITS = re.compile(r"[0-9]+")
# How long a sender refused for the task's live runs (or a schedule's overlap) is told to
# wait: when a run ends is not known, so a guess a retrying sender will not hammer.
LIVE_RETRY_SECONDS = 30
REFUSAL_STATUS = {
    Refusal.INPUT: 422,
    Refusal.RATE: 429,
    Refusal.LIVE: 429,
    Refusal.OVERLAP: 429,
    Refusal.DISABLED: 409,
}


class Refused(Exception):
    """A delivery refused before it reaches ``trigger_fire``: nothing was written."""

    def __init__(self, status: int, reason: str, error: str) -> None:
        super().__init__(error)
        self.status, self.reason, self.error = status, reason, error


@csrf_exempt  # senders are other systems: the signature is the proof, not a cookie
def webhook_receive(request: HttpRequest, public_id: str) -> JsonResponse:
    """A delivery to a webhook trigger: 202 with the run it started, 200 with the first
    run when its ``webhook-id`` was accepted before, or a refusal saying why."""
    if request.method != "POST":
        response = refused(405, "method", f"{request.method} is not accepted here: POST")
        response["Allow"] = "POST"
        return response
    trigger = webhook_trigger_for(public_id)
    if trigger is None:
        return refused(404, "unknown", "no webhook at this address")
    config = config_of(trigger)
    try:
        body = body_read(request, limit=config["max_body_bytes"])
        delivery = delivery_verified(request, trigger, body, config)
        payload = body_parsed(body)
    except Refused as refusal:
        return refused(refusal.status, refusal.reason, refusal.error)

    # A retried delivery is answered from a read, without taking the trigger's lock that
    # trigger_fire takes (on SQLite, the database's write lock): a storm of retries does
    # not queue behind the deliveries that start runs. A key too long for the column is
    # left to trigger_fire, which keeps its digest.
    if len(delivery.id) <= KEY_CHARS:
        first_run_id = accepted_run_id(trigger, delivery.id)
        if first_run_id is not None:
            return duplicate_answer(request, first_run_id)
    fired = trigger_fire(trigger_id=trigger.pk, key=delivery.id, payload=payload)
    return fired_answer(request, fired)


def body_read(request: HttpRequest, *, limit: int) -> bytes:
    """The body, if it is at most ``limit`` bytes: a larger one is refused by its
    Content-Length before any of it is read, or once one byte past the limit is."""
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared and not DIGITS.fullmatch(declared):
        raise Refused(400, "body", f"Content-Length: {declared[:40]!r} is not a number")
    if declared and (len(declared) > 18 or int(declared) > limit):
        raise Refused(413, "size", too_large(limit))
    body = request.read(limit + 1)
    if len(body) > limit:
        raise Refused(413, "size", too_large(limit))
    return body


def delivery_verified(
    request: HttpRequest, trigger: Trigger, body: bytes, config: dict[str, Any]
) -> Delivery:
    """The delivery, signed with one of the trigger's secrets valid now, in time."""
    try:
        return webhook_verify(
            secrets=trigger_secrets(trigger),
            headers=request.headers,
            body=body,
            tolerance_seconds=config["tolerance_seconds"],
        )
    except WebhookRefused as refusal:
        # Logged, not recorded: what does not authenticate writes nothing.
        logger.info(
            "webhook trigger %s refused a delivery (%s): %s",
            trigger.pk,
            refusal.reason,
            refusal.message,
        )
        raise Refused(401, refusal.reason, refusal.message) from None


def body_parsed(body: bytes) -> Any:
    """The body as strict JSON (agentops.strict_json: what no database stores, and
    nesting past its depth, are refused too)."""
    try:
        return json_loads_strict(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        at = error.start
        raise Refused(
            400, "body", f"the body is not UTF-8 text: byte {at} is {body[at]:#04x}"
        ) from None
    except json.JSONDecodeError as error:
        raise Refused(
            400,
            "body",
            f"the body is not JSON: {error.msg} (line {error.lineno}, column {error.colno})",
        ) from None


def webhook_trigger_for(public_id: str) -> Trigger | None:
    """The webhook trigger at this address, if it has a secret to check against."""
    if not PUBLIC_ID.fullmatch(public_id):
        return None
    return (
        Trigger.objects.filter(public_id=public_id)
        .filter(kind=Trigger.Kind.WEBHOOK)
        .exclude(secret="")
        .first()
    )


def accepted_run_id(trigger: Trigger, key: str) -> UUID | None:
    """The run the key started, if it was accepted before (its id only: no row loaded)."""
    return (
        Firing.objects.filter(trigger=trigger, key=key, accepted=True)
        .values_list("run_id", flat=True)
        .first()
    )


def fired_answer(request: HttpRequest, fired: Fired) -> JsonResponse:
    firing = fired.firing
    if fired.duplicate:
        return duplicate_answer(request, firing.run_id)
    if firing.accepted:
        return JsonResponse(run_described(request, firing.run_id), status=202)
    status = REFUSAL_STATUS.get(firing.refusal, 409)
    response = refused(status, firing.refusal, firing.reason)
    if status == 429:
        response["Retry-After"] = str(retry_after_seconds(firing))
    return response


def duplicate_answer(request: HttpRequest, run_id: UUID) -> JsonResponse:
    """A key accepted before: 200 (a success, so the sender stops retrying) with the run
    it started. Refused firings hold no key, so a key seen before always has one."""
    return JsonResponse({**run_described(request, run_id), "duplicate": True}, status=200)


def run_described(request: HttpRequest, run_id: UUID) -> dict[str, Any]:
    return {
        "run": str(run_id),
        "url": request.build_absolute_uri(reverse("runs:detail", args=[run_id])),
    }


def retry_after_seconds(firing: Firing) -> int:
    """When the sender of a firing refused for the rate may try again: once the firing
    that fills each full window leaves it. For the live runs cap, a fixed wait."""
    if firing.refusal != Refusal.RATE:
        return LIVE_RETRY_SECONDS
    trigger, now = firing.trigger, firing.received_at
    waits = [
        rate_window_wait(trigger, limit, window, now)
        for limit, window in (
            (trigger.max_per_minute, timedelta(minutes=1)),
            (trigger.max_per_hour, timedelta(hours=1)),
        )
        if limit is not None
    ]
    return max(1, math.ceil(max(waits, default=LIVE_RETRY_SECONDS)))


def rate_window_wait(trigger: Trigger, limit: int, window: timedelta, now: datetime) -> float:
    """Seconds until fewer than ``limit`` accepted firings lie within ``window`` of then:
    when the ``limit``-th latest leaves it (0 when the window is not full)."""
    latest = (
        Firing.objects.filter(trigger=trigger, accepted=True, received_at__gt=now - window)
        .order_by("-received_at")
        .values_list("received_at", flat=True)[limit - 1 : limit]
    )
    return max((at + window - now).total_seconds() for at in [*latest, now - window])


def refused(status: int, reason: str, error: str) -> JsonResponse:
    return JsonResponse({"error": error, "reason": reason}, status=status)


def too_large(limit: int) -> str:
    return f"the body is larger than this webhook's {limit} bytes"
