"""Reads for the pages that show triggers: the task page's Triggers section, the run
page's "Started by", the admin's secret fingerprints.

What a page shows of a trigger never holds a credential: a webhook's secret only as a
fingerprint, a queue's URL with any password or token redacted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from django.db.models import Count, F, Q, Window
from django.db.models.functions import RowNumber
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from tasks.models import Task, Trigger
from triggers.config import config_of
from triggers.cron import cron_next
from triggers.models import Firing
from triggers.services import trigger_secrets

Kind = Trigger.Kind

# The most recent firings shown under each trigger on the task page.
FIRINGS_SHOWN = 20
# The most of what arrived the run page shows (characters of indented JSON); a firing
# keeps up to 64 KiB (triggers.services.PAYLOAD_CHARS), the page shows the start of it.
PAYLOAD_SHOWN_CHARS = 8000
REDACTED = "•••"
# Query parameters of a queue URL whose values are credentials (Redis takes
# ?password=, brokers take tokens and keys).
CREDENTIAL_WORDS = ("pass", "secret", "token", "key", "auth", "credential")


# Webhooks ----------------------------------------------------------------------------


# The webhook endpoint's URL name (triggers/urls.py, included under "hooks/").
WEBHOOK_URL_NAMES = ("hooks:receive", "triggers:webhook")


def webhook_path(trigger: Trigger) -> str:
    """The path a webhook trigger's deliveries are POSTed to: /hooks/<public_id>/."""
    for name in WEBHOOK_URL_NAMES:
        try:
            return reverse(name, args=[trigger.public_id])
        except NoReverseMatch:
            continue
    return f"/hooks/{trigger.public_id}/"  # the endpoint's path, should its name move


def secret_fingerprint(secret: str) -> str:
    """What a page shows of a signing secret: the first 12 hex digits of its sha256.
    A sender checks theirs with ``printf %s "$SECRET" | sha256sum | cut -c1-12``."""
    if not secret:
        return ""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


# Queues ------------------------------------------------------------------------------


def url_redacted(url: str) -> str:
    """``url`` with its password, and any query value that is a credential, replaced by
    dots. A ``{secret:NAME}`` reference is kept: it names the variable, not its value."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return REDACTED  # a URL that does not parse is shown as nothing of it
    netloc = parts.netloc
    if password is not None and not password.startswith("{secret:"):
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{host}"
    query = "&".join(query_pair_redacted(pair) for pair in parts.query.split("&") if parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def query_pair_redacted(pair: str) -> str:
    name, equals, value = pair.partition("=")
    credential = any(word in unquote_plus(name).lower() for word in CREDENTIAL_WORDS)
    if credential and equals and not unquote_plus(value).startswith("{secret:"):
        return f"{name}={REDACTED}"
    return pair


# The task page -----------------------------------------------------------------------


class Fact(NamedTuple):
    label: str
    value: str
    code: bool = False  # shown as code: an expression, a name, a URL


@dataclass
class TriggerCard:
    """One trigger as the task page shows it."""

    trigger: Trigger
    facts: list[Fact] = field(default_factory=list)
    next_slots: list[datetime] = field(default_factory=list)
    webhook_url: str = ""
    firings: list[Firing] = field(default_factory=list)
    accepted: int = 0
    refused: int = 0

    @property
    def anchor(self) -> str:
        return f"trigger-{self.trigger.pk}"


def trigger_cards_for_task(task: Task, *, base_url: str, now: datetime | None = None) -> list:
    """Each trigger of the task with what it listens to, its rails, and its last
    ``FIRINGS_SHOWN`` firings: two queries whatever the number of triggers and firings
    (the triggers with their counts; the firings ranked per trigger in SQL)."""
    now = now or timezone.now()
    triggers = list(
        Trigger.objects.filter(task=task)
        .annotate(
            firings_accepted=Count("firings", filter=Q(firings__accepted=True)),
            firings_refused=Count("firings", filter=Q(firings__accepted=False)),
        )
        .order_by("name", "pk")
    )
    if not triggers:
        return []
    recent: dict[int, list[Firing]] = {trigger.pk: [] for trigger in triggers}
    for firing in firings_recent(task):
        recent[firing.trigger_id].append(firing)
    cards = []
    for trigger in triggers:
        card = TriggerCard(
            trigger=trigger,
            firings=recent[trigger.pk],
            accepted=trigger.firings_accepted,
            refused=trigger.firings_refused,
        )
        trigger_describe(card, base_url=base_url, now=now)
        cards.append(card)
    return cards


def firings_recent(task: Task, *, limit: int = FIRINGS_SHOWN) -> list[Firing]:
    """The last ``limit`` firings of each of the task's triggers, newest first, in one
    query (a window ranks them per trigger). What arrived is left out: the run page
    shows it."""
    ranked = Window(
        RowNumber(),
        partition_by=[F("trigger_id")],
        order_by=[F("received_at").desc(), F("pk").desc()],
    )
    return list(
        Firing.objects.filter(trigger__task=task)
        .defer("payload")
        .annotate(place=ranked)
        .filter(place__lte=limit)
        .order_by("trigger_id", "-received_at", "-pk")
    )


def trigger_describe(card: TriggerCard, *, base_url: str, now: datetime) -> None:
    """Fill in what the trigger listens to, as facts a person reads."""
    trigger = card.trigger
    config = config_of(trigger)
    facts = card.facts
    if trigger.kind == Kind.CRON:
        facts.append(Fact("Schedule", f"{config['expression']} ({config['timezone']})", True))
        facts.append(
            Fact(
                "While its last run is live",
                "skip the slot" if config["overlap"] == "skip" else "start anyway",
            )
        )
        facts.append(
            Fact(
                "Slots missed while nothing ran",
                "skipped" if config["missed"] == "skip" else "run once when the scheduler starts",
            )
        )
        if config.get("input"):
            facts.append(Fact("Input", json.dumps(config["input"], sort_keys=True), True))
        try:
            card.next_slots = cron_next(trigger, count=5, after=now)
        except (ValueError, KeyError, TypeError):
            card.next_slots = []  # a config saved past the checks shows no slots, not a 500
    elif trigger.kind == Kind.WEBHOOK:
        card.webhook_url = base_url.rstrip("/") + webhook_path(trigger)
        held = trigger_secrets(trigger, now=now)
        facts.append(
            Fact(
                "Signing secret",
                f"fingerprint {secret_fingerprint(trigger.secret)}"
                if trigger.secret
                else "none yet: rotate it in the admin to make one",
            )
        )
        if len(held) > 1:
            until = timezone.localtime(trigger.previous_secret_until)
            facts.append(
                Fact(
                    "Previous secret",
                    f"fingerprint {secret_fingerprint(trigger.previous_secret)}, "
                    f"accepted until {until:%Y-%m-%d %H:%M %Z}",
                )
            )
        facts.append(Fact("Timestamp tolerance", f"{config['tolerance_seconds']} s"))
        facts.append(Fact("Largest body", size_said(config["max_body_bytes"])))
    elif trigger.kind == Kind.QUEUE:
        place = "stream" if config.get("transport") == "redis" else "queue"
        facts.append(Fact("Transport", str(config.get("transport", ""))))
        facts.append(Fact("URL", url_redacted(str(config.get("url", ""))), True))
        facts.append(Fact(place.capitalize(), str(config.get(place, "")), True))
        if place == "stream":
            facts.append(Fact("Consumer group", str(config.get("group", "")), True))
        facts.append(Fact("Dead letters", str(config.get("dead_letter", "")), True))
        facts.append(Fact("Largest message", size_said(config["max_message_bytes"])))
    elif trigger.kind == Kind.EMAIL:
        facts.append(Fact("Address", str(config.get("address", "")), True))
        facts.append(Fact("Senders", ", ".join(str(s) for s in config.get("senders", [])), True))
        facts.append(Fact("DKIM", "required" if config.get("dkim") else "not checked"))
        facts.append(
            Fact(
                "Attachments",
                f"at most {config['max_attachments']}, "
                f"each up to {size_said(config['max_attachment_bytes'])}",
            )
        )
    if trigger.kind != Kind.MANUAL:
        facts.append(
            Fact(
                "Input mapping",
                trigger.input_mapping or "all of what arrived",
                bool(trigger.input_mapping),
            )
        )
    facts.append(Fact("Rate limit", rate_said(trigger)))


def rate_said(trigger: Trigger) -> str:
    limits = []
    if trigger.max_per_minute is not None:
        limits.append(f"{trigger.max_per_minute} runs a minute")
    if trigger.max_per_hour is not None:
        limits.append(f"{trigger.max_per_hour} an hour")
    return "at most " + ", ".join(limits) if limits else "none"


def size_said(size: Any) -> str:
    if not isinstance(size, int):
        return str(size)
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


# The run page ------------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadShown:
    text: str
    chars: int  # of the whole, indented
    cut: bool


def payload_shown(payload: Any, *, limit: int = PAYLOAD_SHOWN_CHARS) -> PayloadShown:
    """What arrived, as indented JSON, cut to ``limit`` characters for the page."""
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return PayloadShown(text=text[:limit], chars=len(text), cut=len(text) > limit)
