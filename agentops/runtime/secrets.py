"""Credentials, named in a tool's config as ``secret:NAME`` (a whole value) or
``{secret:NAME}`` (inside a string, e.g. ``"Bearer {secret:API_TOKEN}"``), and read from
the environment at call time. Never stored in the database, never sent to the model, never
written to lineage: every value a call resolved is redacted from what it returns, in the
encodings a far side is likely to echo it in.

The fence: a tool may read only the variables the deployment gives tools, those whose
name starts with ``TOOL_SECRET_`` and those listed in ``AGENTOPS_TOOL_SECRETS``, and never
one of agentops' own (``SECRET_KEY``, ``DATABASE_URL``, ``AGENTOPS_*``...: see
``agentops.config.platform_secret``), even if listed. A worker's environment holds the
keys to the trail, the approvals and the database; the right to write a tool's config
must not be the right to read them. Any other name is refused when the tool is saved
(``secret_errors``) and again when it is called (``config_resolve``), naming it.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any
from urllib.parse import quote, quote_plus

from django.conf import settings

from agentops.config import TOOL_SECRET_PREFIX, platform_secret

PREFIX = "secret:"
EMBEDDED = re.compile(r"\{secret:([A-Za-z_][A-Za-z0-9_]*)\}")
# Encoded forms are redacted only for a value at least this long: a shorter one's
# reversed or base64 form would match ordinary text too often to be worth hiding.
ENCODED_MINIMUM = 8


class SecretMissing(LookupError):
    """A secret a tool names cannot be read: it is not set in the worker's environment,
    or it is not one a tool may read (``SecretRefused``)."""


class SecretRefused(SecretMissing):
    """A tool names a variable that is not one of the deployment's tool secrets."""


def secret_refusal(name: str) -> str:
    """Why a tool may not read the variable ``name`` (a sentence naming it), or ""."""
    if platform_secret(name):
        return (
            f"the secret {name} is one of agentops' own settings, which no tool may read; "
            f"give the tool a variable of its own, named {TOOL_SECRET_PREFIX}…"
        )
    if name.startswith(TOOL_SECRET_PREFIX) or name in settings.AGENTOPS_TOOL_SECRETS:
        return ""
    return (
        f"the secret {name} is not one a tool may read: name the variable "
        f"{TOOL_SECRET_PREFIX}… or list it in AGENTOPS_TOOL_SECRETS"
    )


def secret_names(config: Any) -> set[str]:
    """Every NAME a config refers to as ``secret:NAME``, at any depth."""
    if isinstance(config, str):
        if config.startswith(PREFIX):
            return {config[len(PREFIX) :]}
        return set(EMBEDDED.findall(config))
    if isinstance(config, dict):
        return set().union(*(secret_names(value) for value in config.values()))
    if isinstance(config, list):
        return set().union(*(secret_names(value) for value in config))
    return set()


def secret_errors(config: Any) -> list[str]:
    """One sentence for each secret a config names that no tool may read (for the
    checks that run when a tool is saved, and again before it is called)."""
    return [refusal for name in sorted(secret_names(config)) if (refusal := secret_refusal(name))]


def config_resolve(config: Any) -> tuple[Any, dict[str, str]]:
    """The config with each ``secret:NAME`` replaced by the environment's value, and the
    values used (by name), for redaction. Raises ``SecretRefused`` for a name no tool may
    read (before reading anything), ``SecretMissing`` for one that is not set."""
    refusals = secret_errors(config)
    if refusals:
        raise SecretRefused("; ".join(refusals))
    used: dict[str, str] = {}

    def lookup(name: str) -> str:
        if not os.environ.get(name):
            raise SecretMissing(f"the secret {name} is not set in the worker's environment")
        used[name] = os.environ[name]
        return used[name]

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PREFIX):
            return lookup(value[len(PREFIX) :])
        if isinstance(value, str):
            return EMBEDDED.sub(lambda match: lookup(match.group(1)), value)
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return value

    return resolve(config), used


def base64_cores(data: bytes) -> list[str]:
    """The base64 text of ``data`` wherever it sits in a longer encoded string: for each
    of the three alignments, the characters that depend on ``data`` alone (the padding,
    and the characters shared with the bytes around it, left out)."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        start = -(-8 * offset // 6)  # the first character made only of data's bits
        end = 8 * (offset + len(data)) // 6
        cores.append(encoded[start:end])
    return cores


def secret_forms(secret: str) -> list[tuple[str, bool]]:
    """The texts a far side may echo ``secret`` as, each with whether to match it in any
    case: as it is, reversed, URL-encoded, hex, and base64 (standard and URL-safe, with
    and without padding, and inside a longer base64 text)."""
    forms = [(secret, True)]
    if len(secret) < ENCODED_MINIMUM:
        return forms
    data = secret.encode()
    padded = base64.b64encode(data).decode()
    forms += [
        (secret[::-1], True),
        (quote(secret, safe=""), True),
        (quote_plus(secret, safe=""), True),
        (data.hex(), True),
        (padded, False),
        (padded.rstrip("="), False),
    ]
    for core in base64_cores(data):
        forms += [(core, False), (core.replace("+", "-").replace("/", "_"), False)]
    return forms


def redaction_pattern(secrets: dict[str, str]) -> tuple[re.Pattern, dict[str, str]] | None:
    """One pattern for every form of every secret (longest first, so a longer form is
    never cut by a shorter one inside it), and the name each matched text stands for."""
    forms: dict[tuple[str, bool], str] = {}
    for name, secret in secrets.items():
        if secret:
            for form, any_case in secret_forms(secret):
                forms.setdefault((form, any_case), name)
    if not forms:
        return None
    ordered = sorted(forms, key=lambda item: -len(item[0]))
    pattern = re.compile(
        "|".join(
            f"(?i:{re.escape(form)})" if any_case else re.escape(form) for form, any_case in ordered
        )
    )
    names: dict[str, str] = {}
    for (form, any_case), name in forms.items():
        names.setdefault(form.lower() if any_case else form, name)
    return pattern, names


def redact(value: Any, secrets: dict[str, str]) -> Any:
    """``value`` with every occurrence of a secret's value, in any of its usual encodings
    (``secret_forms``), replaced by ``[secret:NAME]``."""
    if not secrets:
        return value
    compiled = redaction_pattern(secrets)
    if compiled is None:
        return value
    pattern, names = compiled

    def name_of(text: str) -> str:
        return names.get(text) or names.get(text.lower()) or "?"

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            return pattern.sub(lambda match: f"[{PREFIX}{name_of(match.group(0))}]", item)
        if isinstance(item, dict):
            return {clean(key): clean(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [clean(inner) for inner in item]
        return item

    return clean(value)


def config_secrets(config: Any) -> dict[str, str]:
    """The values of the secrets a config names that are set now and a tool may read
    (for redaction: a name no tool may read was never resolved, so it is not read here
    either)."""
    return {
        name: os.environ[name]
        for name in secret_names(config)
        if not secret_refusal(name) and os.environ.get(name)
    }
