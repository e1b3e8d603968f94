"""Input as people and pages send it, refused before a database sees what it cannot hold.

An id past the widest integer column (bigint) makes SQLite raise OverflowError and a
NUL makes PostgreSQL refuse the query: both would be a 500. These helpers say instead
what was wrong, naming the field and the value, for a 400.
"""

from __future__ import annotations

import re

from django.http import HttpResponse

# The widest id either database holds: a signed 64-bit integer (bigint).
ID_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits only: "²".isdigit() is true too


class BadInput(ValueError):
    """Input refused; the message names the field and says what was wrong."""


def shown(value: str, limit: int = 40) -> str:
    """``value`` quoted for a message, cut if long."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def id_parse(value: str, *, field: str, what: str) -> int:
    """``value`` as an id from 1 to ``ID_MAX``, or ``BadInput`` naming ``field``."""
    if _DIGITS.fullmatch(value) and 1 <= int(value) <= ID_MAX:
        return int(value)
    raise BadInput(f"{field}: {shown(value)} is not {what} (a whole number from 1 to {ID_MAX})")


def id_refusal(value: int, *, what: str) -> HttpResponse | None:
    """A 400 for an id from the URL that no row can have (the URL takes any digits),
    or None."""
    if 1 <= value <= ID_MAX:
        return None
    return bad_request(f"{what} {value} is out of range: ids run from 1 to {ID_MAX}.")


def text_refusal(value: str, *, field: str) -> str:
    """Why ``value`` cannot be stored or searched for ("" if it can)."""
    if "\x00" in value:
        return f"{field}: a NUL character cannot be stored or searched for; remove it."
    return ""


def bad_request(message: str) -> HttpResponse:
    """A plain 400 that says what was wrong: for requests no page of ours sends."""
    return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")
