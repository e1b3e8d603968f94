"""Shared pieces of the API's schemas: text that can be stored, lookups by the ids the
pages use that never reach the database with a value it would choke on."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AfterValidator

from agentops.api.errors import Problem
from agentops.bad_input import ID_MAX


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a NUL character cannot be stored or searched for; remove it")
    return value


# A string the databases can store (PostgreSQL refuses NUL in text).
Text = Annotated[str, AfterValidator(_storable)]


def not_found(what: str) -> Problem:
    return Problem(404, "not-found", f"No {what} here, or not one you may see.")


def run_uuid_parse(value: str) -> uuid.UUID:
    """A run's id from the URL; anything else is a run that is not there (404)."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        raise not_found("run") from None


def id_or_404(value: str, what: str) -> int:
    """A row id from the URL, as the pages take it (1 to ID_MAX); anything else
    names no row (404), never an overflow in the database."""
    if len(value) <= 19 and value.isascii() and value.isdigit() and 1 <= int(value) <= ID_MAX:
        return int(value)
    raise not_found(what)


def slug_or_404(value: str, what: str) -> str:
    if "\x00" in value or len(value) > 200:
        raise not_found(what)
    return value
