"""Input as people and pages send it, refused before a database sees what it cannot hold.

An id past the widest integer column (bigint) makes SQLite raise OverflowError and a
NUL makes PostgreSQL refuse the query: both would be a 500. These helpers say instead
what was wrong, naming the field and the value, for a 400.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from django.http import HttpRequest, HttpResponse

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


# The admin's search: every word becomes a LIKE across the searched fields, and SQLite
# gives up on a few thousand of them ("Expression tree is too large"), a 500.
SEARCH_MAX_CHARS = 200
SEARCH_MAX_WORDS = 20
_INTEGER = re.compile(r"\s*[-+]?[0-9]+\s*")


def admin_query_refusal(params: dict[str, list[str]]) -> str:
    """Why the admin cannot take these GET or POST values ("" if it can): a NUL, an
    integer no id column holds (Django's admin passes filter and choice values to the
    database as they come, and SQLite raises OverflowError), a search too long to run."""
    for name, values in params.items():
        for value in values:
            if why := text_refusal(value, field=name):
                return why
            if _INTEGER.fullmatch(value) and abs(int(value)) > ID_MAX:
                return (
                    f"{name}: {shown(value.strip())} is out of range: ids and numbers here"
                    f" run up to {ID_MAX}."
                )
    search = " ".join(params.get("q", []))
    if len(search) > SEARCH_MAX_CHARS or len(search.split()) > SEARCH_MAX_WORDS:
        return (
            f"q: a search of at most {SEARCH_MAX_CHARS} characters and {SEARCH_MAX_WORDS}"
            " words, please."
        )
    return ""


class AdminInputMiddleware:
    """Refuses with a 400 naming the field what the admin's own views would answer with
    a 500 (``admin_query_refusal``). Ours only check what they read themselves."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(admin_prefix()):
            params = dict(request.GET.lists())
            if request.method == "POST":
                params.update(request.POST.lists())
            if why := admin_query_refusal(params):
                return bad_request(why)
        return self.get_response(request)


@functools.cache
def admin_prefix() -> str:
    from django.urls import reverse

    return reverse("admin:index")
