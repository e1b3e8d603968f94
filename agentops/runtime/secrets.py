"""Credentials, named in a tool's config as ``secret:NAME`` (a whole value) or
``{secret:NAME}`` (inside a string, e.g. ``"Bearer {secret:API_TOKEN}"``), and read from
the environment at call time. Never stored in the database, never sent to the model, never
written to lineage: every value a call resolved is redacted from what it returns."""

from __future__ import annotations

import os
import re
from typing import Any

PREFIX = "secret:"
EMBEDDED = re.compile(r"\{secret:([A-Za-z_][A-Za-z0-9_]*)\}")


class SecretMissing(LookupError):
    """The environment has no value for a secret a tool names."""


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


def config_resolve(config: Any) -> tuple[Any, dict[str, str]]:
    """The config with each ``secret:NAME`` replaced by the environment's value, and the
    values used (by name), for redaction."""
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


def redact(value: Any, secrets: dict[str, str]) -> Any:
    """``value`` with every occurrence of a secret's value replaced by ``[secret:NAME]``."""
    if not secrets:
        return value
    if isinstance(value, str):
        for name, secret in sorted(secrets.items(), key=lambda item: -len(item[1])):
            if secret:
                value = value.replace(secret, f"[{PREFIX}{name}]")
        return value
    if isinstance(value, dict):
        return {redact(key, secrets): redact(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item, secrets) for item in value]
    return value


def config_secrets(config: Any) -> dict[str, str]:
    """The values of the secrets a config names that are set now (for redaction)."""
    return {name: os.environ[name] for name in secret_names(config) if os.environ.get(name)}
