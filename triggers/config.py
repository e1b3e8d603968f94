"""What each kind of trigger needs in its ``config``, and the checks a trigger passes
before it is saved (the admin's form and ``trigger_check`` run the same ones).

A trigger's config is written by an operator in the admin: hostile input like any
other. Every fault is a sentence naming the field; nothing is saved until there are none.
"""

from __future__ import annotations

import base64
import binascii
import re
import zoneinfo
from typing import Any
from urllib.parse import urlsplit

import jmespath
import jmespath.exceptions
from croniter import croniter
from dkim.util import InvalidTagValueList, parse_tag_value

from agentops.config import platform_secret
from agentops.runtime.secrets import secret_errors
from agentops.runtime.tools.base import arguments_errors
from tasks.models import Trigger

Kind = Trigger.Kind

# The names a stream, a queue and a dead-letter place may have: plain enough to show
# and to put in a Redis key or an AMQP queue name without quoting.
PLACE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"
ADDRESS = r"^[^@\s<>]{1,64}@[A-Za-z0-9.-]{1,255}$"
SENDER = r"^([^@\s<>]{1,64}@[A-Za-z0-9.-]{1,255}|@[A-Za-z0-9.-]{1,255})$"
DKIM_KEY_NAME = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\._domainkey\.[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"
EXPRESSION_CHARS = 2000

SCHEMAS: dict[str, dict[str, Any]] = {
    Kind.MANUAL: {"type": "object", "additionalProperties": False, "properties": {}},
    Kind.CRON: {
        "type": "object",
        "additionalProperties": False,
        "required": ["expression"],
        "properties": {
            "expression": {"type": "string", "minLength": 1, "maxLength": 200},
            "timezone": {"type": "string", "minLength": 1, "maxLength": 64},
            "overlap": {"enum": ["skip", "start"]},
            "missed": {"enum": ["skip", "once"]},
            "input": {"type": "object"},
        },
    },
    Kind.WEBHOOK: {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tolerance_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
            "max_body_bytes": {"type": "integer", "minimum": 1024, "maximum": 10 * 1024**2},
        },
    },
    Kind.QUEUE: {
        "type": "object",
        "additionalProperties": False,
        "required": ["transport", "url"],
        "properties": {
            "transport": {"enum": ["redis", "amqp"]},
            "url": {"type": "string", "minLength": 1, "maxLength": 500},
            "stream": {"type": "string", "pattern": PLACE_NAME},
            "group": {"type": "string", "pattern": PLACE_NAME},
            "queue": {"type": "string", "pattern": PLACE_NAME},
            "dead_letter": {"type": "string", "pattern": PLACE_NAME},
            "max_message_bytes": {"type": "integer", "minimum": 1024, "maximum": 10 * 1024**2},
        },
    },
    Kind.EMAIL: {
        "type": "object",
        "additionalProperties": False,
        "required": ["address", "senders"],
        "properties": {
            "address": {"type": "string", "pattern": ADDRESS},
            "senders": {
                "type": "array",
                "minItems": 1,
                "maxItems": 200,
                "items": {"type": "string", "pattern": SENDER},
            },
            "dkim": {"type": "boolean"},
            # Public keys pinned by their DNS name, read instead of DNS (air-gapped
            # sites, tests): {"selector._domainkey.example.com": "v=DKIM1; k=rsa; p=..."}.
            "dkim_keys": {
                "type": "object",
                "maxProperties": 50,
                "propertyNames": {"pattern": DKIM_KEY_NAME},
                "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 5000},
            },
            "max_attachment_bytes": {"type": "integer", "minimum": 0, "maximum": 25 * 1024**2},
            "max_attachments": {"type": "integer", "minimum": 0, "maximum": 50},
        },
    },
}

DEFAULTS: dict[str, dict[str, Any]] = {
    Kind.CRON: {"timezone": "UTC", "overlap": "skip", "missed": "skip", "input": {}},
    Kind.WEBHOOK: {"tolerance_seconds": 300, "max_body_bytes": 256 * 1024},
    Kind.QUEUE: {"group": "agentops", "max_message_bytes": 256 * 1024},
    Kind.EMAIL: {"dkim": False, "max_attachment_bytes": 1024**2, "max_attachments": 10},
}


# The variables a trigger's config may name as {secret:NAME}: their own namespace, not
# the tools'. A queue trigger's URL sends its password to whatever host it names, so a
# trigger that could name a tool's secret would hand that secret to any host its author
# chose, past the tool's own fences (its allowed hosts, its redaction).
TRIGGER_SECRET_PREFIX = "TRIGGER_SECRET_"


def trigger_secret_refusal(name: str) -> str:
    """Why a trigger may not read the variable ``name`` (a sentence naming it), or ""."""
    if platform_secret(name):
        return (
            f"the secret {name} is one of agentops' own settings, which no trigger may "
            f"read; give the trigger a variable of its own, named {TRIGGER_SECRET_PREFIX}…"
        )
    if name.startswith(TRIGGER_SECRET_PREFIX):
        return ""
    return (
        f"the secret {name} is not one a trigger may read: give the trigger a variable "
        f"of its own, named {TRIGGER_SECRET_PREFIX}… (tools' secrets are not triggers')"
    )


def config_of(trigger: Trigger) -> dict[str, Any]:
    """The trigger's config with its kind's defaults filled in (it passed the checks)."""
    config = {**DEFAULTS.get(trigger.kind, {}), **(trigger.config or {})}
    if trigger.kind == Kind.QUEUE:
        place = config.get("stream") or config.get("queue") or ""
        config.setdefault("dead_letter", f"{place}.dead")
    return config


def config_errors(*, kind: str, config: Any, input_mapping: str = "") -> list[str]:
    """Every fault of a trigger's config and mapping, each naming its field."""
    if kind not in SCHEMAS:
        return [f"kind: {kind!r} is not a kind of trigger"]
    errors = arguments_errors(SCHEMAS[kind], config, whole="config")
    errors += mapping_errors(input_mapping)
    if errors or not isinstance(config, dict):
        return errors
    errors += secret_errors(config, refusal=trigger_secret_refusal)
    check = KIND_CHECKS.get(kind)
    return errors + (check(config) if check else [])


def mapping_errors(expression: str) -> list[str]:
    if not expression:
        return []
    if len(expression) > EXPRESSION_CHARS:
        return [f"input_mapping: longer than {EXPRESSION_CHARS} characters"]
    try:
        jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as error:
        return [f"input_mapping: not a JMESPath expression ({error_said(error)})"]
    return []


def error_said(error: Exception) -> str:
    return re.sub(r"\s+", " ", str(error)).strip()[:300]


def cron_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    expression = config["expression"]
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        errors.append(
            f"config/expression: {expression!r} is not a cron expression of five fields "
            "(minute hour day-of-month month day-of-week), such as '0 2 * * *'"
        )
    name = config.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        errors.append(f"config/timezone: {name!r} is not a time zone (such as 'Europe/Paris')")
    return errors


def queue_errors(config: dict[str, Any]) -> list[str]:
    transport, url = config["transport"], config["url"]
    try:
        parts = urlsplit(url)
    except ValueError:
        return ["config/url: not a URL that can be read (check its brackets)"]
    errors = []
    schemes = {"redis": ("redis", "rediss"), "amqp": ("amqp", "amqps")}[transport]
    if parts.scheme not in schemes:
        errors.append(
            f"config/url: a {transport} transport needs a {' or '.join(schemes)}:// URL, "
            f"not {parts.scheme or 'one without a scheme'}"
        )
    place = {"redis": "stream", "amqp": "queue"}[transport]
    other = {"redis": "queue", "amqp": "stream"}[transport]
    if not config.get(place):
        errors.append(f"config/{place}: a {transport} transport names the {place} it reads")
    if config.get(other):
        errors.append(f"config/{other}: a {transport} transport has no {other}")
    if config.get("dead_letter") and config.get("dead_letter") == config.get(place):
        errors.append(f"config/dead_letter: must not be the {place} itself")
    return errors


def email_errors(config: dict[str, Any]) -> list[str]:
    keys = config.get("dkim_keys") or {}
    if keys and not config.get("dkim"):
        return ["config/dkim_keys: pinned DKIM keys are read only when dkim is true"]
    return [error for name, record in keys.items() if (error := dkim_key_error(name, record))]


def dkim_key_error(name: str, record: str) -> str:
    """What is wrong with a pinned DKIM key record (a DNS TXT record's text), or ""."""
    where = f"config/dkim_keys/{name}"
    try:
        tags = parse_tag_value(record.encode())
    except (InvalidTagValueList, UnicodeEncodeError) as error:
        return f"{where}: not a DKIM key record ({error_said(error)})"
    if tags.get(b"k", b"rsa") not in (b"rsa", b"ed25519"):
        return f"{where}: k= must be rsa or ed25519"
    key = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not key:
        return f"{where}: no public key (p=): 'v=DKIM1; k=rsa; p=<base64>'"
    try:
        base64.b64decode(key, validate=True)
    except binascii.Error:
        return f"{where}: p= is not base64"
    return ""


KIND_CHECKS = {Kind.CRON: cron_errors, Kind.QUEUE: queue_errors, Kind.EMAIL: email_errors}
