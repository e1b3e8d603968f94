"""Firing a trigger: the one path every kind takes from "something arrived" to a run.

``trigger_fire`` decides, in one transaction holding the trigger's row: a key already
accepted is a duplicate (the first firing is the answer, nothing starts); otherwise the
intake rails (the trigger enabled, its rate limits, the task's live runs, a schedule's
overlap policy), then the mapping from what arrived to the run's input, then
``run_start``. Whatever the decision, a ``Firing`` row records it, so a storm of
deliveries costs a refusal each, not a run each.

Who may fire is the caller's to check first (a webhook's signature, an email's sender):
what does not authenticate writes nothing here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jmespath
import jmespath.exceptions
from django.db import IntegrityError, transaction
from django.utils import timezone

from agentops.strict_json import json_storable
from tasks.models import LIVE_RUN_STATUSES, Run, Trigger
from tasks.services import RunStartError, run_start
from triggers.config import error_said
from triggers.models import Firing

Refusal = Firing.Refusal

# The most of what arrived a firing keeps (its JSON, in characters); past it, a
# stand-in saying how large it was and its sha256. The run's input is kept whole, as
# for a run a person starts.
PAYLOAD_CHARS = 64 * 1024
KEY_CHARS = 200


@dataclass(frozen=True)
class Fired:
    """What came of a firing. ``duplicate``: the key was accepted before, and
    ``firing`` is that first firing (this one wrote nothing)."""

    firing: Firing
    duplicate: bool = False

    @property
    def accepted(self) -> bool:
        return self.firing.accepted

    @property
    def run(self) -> Run | None:
        return self.firing.run


def trigger_fire(
    *,
    trigger_id: int,
    key: str,
    payload: Any,
    overlap: str = "start",
    now: datetime | None = None,
) -> Fired:
    """Start at most one run for the firing ``key`` of the trigger, from ``payload``
    (what arrived, as JSON), or refuse it and say why; record it either way.

    ``overlap="skip"``: refuse while a run this trigger started is still live (a
    schedule's policy). The trigger's row is locked for the decision (SELECT ... FOR
    UPDATE; on SQLite the IMMEDIATE transaction serialises writers), so the limits count
    exactly and the duplicate check sees every firing committed before it; the unique
    constraint on accepted keys holds even where neither lock does."""
    key = key_storable(key)
    # What arrived, as the database can hold it (NUL, lone surrogates, numbers past
    # JSON's range made storable, with notes): the mapping reads the same value the
    # firing keeps, and no far side's bytes can fail the firing's own commit.
    payload, _notes = json_storable(payload)
    now = now or timezone.now()
    try:
        with transaction.atomic():
            # Firings of a trigger wait for each other: the limits count exactly, and
            # two first runs of a task never race to pin its version.
            trigger = Trigger.objects.select_for_update().select_related("task").get(pk=trigger_id)
            first = accepted_firing(trigger, key)
            if first is not None:
                return Fired(first, duplicate=True)
            return Fired(firing_decide(trigger, key, payload, overlap=overlap, now=now))
    except IntegrityError:
        # Another process accepted the key between our check and our insert (possible
        # only where the row lock is not taken): its firing is the answer.
        first = accepted_firing(Trigger.objects.get(pk=trigger_id), key)
        if first is None:
            raise
        return Fired(first, duplicate=True)


# A key the firing's column and the run's (``<trigger id>:<key>``) can both hold, with
# room for the id.
KEY_STORED_CHARS = KEY_CHARS - 21
UNSTORABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def key_storable(key: str) -> str:
    """The key as stored: itself, or, when the columns cannot hold it (too long, or
    holding a control character or a lone surrogate), ``sha256:`` and its digest. The
    same key always gives the same digest, so a duplicate is still found."""
    if len(key) <= KEY_STORED_CHARS and not UNSTORABLE.search(key):
        return key
    return "sha256:" + hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()


def accepted_firing(trigger: Trigger, key: str) -> Firing | None:
    return (
        Firing.objects.filter(trigger=trigger, key=key, accepted=True).select_related("run").first()
    )


def firing_decide(
    trigger: Trigger, key: str, payload: Any, *, overlap: str, now: datetime
) -> Firing:
    """Inside the trigger's lock: refuse, or start the run; record the firing."""
    kept = payload_kept(payload)
    refusal, reason = intake_refusal(trigger, overlap=overlap, now=now)
    run = None
    if not refusal:
        try:
            run_input = input_mapped(trigger.input_mapping, payload)
            with transaction.atomic():  # a savepoint: a refused start leaves nothing
                run = run_start(
                    task=trigger.task,
                    run_input=run_input,
                    trigger=trigger,
                    firing_key=f"{trigger.pk}:{key}",
                    firing_payload=kept,
                )
        except (MappingRefused, RunStartError) as error:
            refusal, reason = Refusal.INPUT, str(error)
    return Firing.objects.create(
        trigger=trigger,
        key=key,
        accepted=run is not None,
        refusal=refusal,
        reason=reason,
        run=run,
        payload=kept,
        received_at=now,
    )


def intake_refusal(trigger: Trigger, *, overlap: str, now: datetime) -> tuple[str, str]:
    """The rails on intake, in order: (refusal, reason), or ("", "")."""
    if not trigger.enabled:
        return Refusal.DISABLED, f"the trigger {trigger.name!r} is disabled"
    for limit, window, said in (
        (trigger.max_per_minute, timedelta(minutes=1), "minute"),
        (trigger.max_per_hour, timedelta(hours=1), "hour"),
    ):
        if limit is None:
            continue
        started = Firing.objects.filter(
            trigger=trigger, accepted=True, received_at__gt=now - window
        ).count()
        if started >= limit:
            return Refusal.RATE, (
                f"rate limit: the trigger started {started} runs in the last {said} "
                f"(at most {limit} per {said})"
            )
    task = trigger.task
    if task.max_live_runs is not None:
        live = Run.objects.filter(task=task, status__in=LIVE_RUN_STATUSES).count()
        if live >= task.max_live_runs:
            return Refusal.LIVE, (
                f"the task has {live} live runs (at most {task.max_live_runs} at once)"
            )
    if overlap == "skip":
        running = Run.objects.filter(trigger=trigger, status__in=LIVE_RUN_STATUSES).first()
        if running is not None:
            return Refusal.OVERLAP, (
                f"the run this trigger started before ({running.pk}) is still {running.status}"
            )
    return "", ""


class MappingRefused(ValueError):
    """What arrived cannot become a run's input."""


def input_mapped(expression: str, payload: Any) -> dict[str, Any]:
    """The run's input: ``payload`` through the trigger's JMESPath ``expression`` (all
    of it when blank), which must give a JSON object."""
    if expression:
        try:
            mapped = jmespath.search(expression, payload)
        except jmespath.exceptions.JMESPathError as error:
            raise MappingRefused(f"the input mapping failed: {error_said(error)}") from None
    else:
        mapped = payload
    if not isinstance(mapped, dict):
        got = "nothing" if mapped is None else f"a JSON {json_type(mapped)}"
        raise MappingRefused(f"the input must be a JSON object; the mapping gave {got}")
    return mapped


def json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "array" if isinstance(value, list) else "value"


def payload_kept(payload: Any) -> Any:
    """What a firing and the run's trail keep of what arrived (already made storable by
    ``trigger_fire``): the value, or past ``PAYLOAD_CHARS`` a stand-in with its size and
    sha256."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    if len(text) <= PAYLOAD_CHARS:
        return payload
    return {
        "not_kept": {
            "chars": len(text),
            "limit": PAYLOAD_CHARS,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    }


# Webhook secrets ---------------------------------------------------------------------

SECRET_PREFIX = "whsec_"
# How long the secret a rotation replaces keeps being accepted, by default.
ROTATION_OVERLAP = timedelta(hours=24)


def secret_new() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def trigger_secret_rotate(
    *, trigger: Trigger, overlap: timedelta = ROTATION_OVERLAP, now: datetime | None = None
) -> str:
    """Give a webhook trigger a new secret; the one it had stays valid for ``overlap``,
    so senders can move to the new one. Returns the new secret."""
    now = now or timezone.now()
    with transaction.atomic():
        trigger = Trigger.objects.select_for_update().get(pk=trigger.pk)
        if trigger.secret:
            trigger.previous_secret = trigger.secret
            trigger.previous_secret_until = now + overlap
        trigger.secret = secret_new()
        trigger.save(update_fields=["secret", "previous_secret", "previous_secret_until"])
    return trigger.secret


def trigger_secrets(trigger: Trigger, *, now: datetime | None = None) -> list[str]:
    """The secrets a delivery may be signed with now: the current one, and the previous
    one while its overlap lasts."""
    now = now or timezone.now()
    held = [trigger.secret] if trigger.secret else []
    if (
        trigger.previous_secret
        and trigger.previous_secret_until
        and now < trigger.previous_secret_until
    ):
        held.append(trigger.previous_secret)
    return held
