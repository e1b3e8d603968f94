"""JSON read as JSON is written.

Python's ``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``, and reads a number
too large for a float (``1e999``) as infinity: none of them is JSON, neither PostgreSQL's
jsonb nor SQLite's JSON functions store them, so a value holding one would fail only
later, when it is saved (a form's 500, a crashed step). It also keeps the last of a key
written twice in one object and drops the other without a word. Everything agentops
reads from people or models goes through here instead: ``json_loads_strict``, and
``StrictJSONFormField`` for the admin's JSON boxes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from django import forms


class _Refused(Exception):
    def __init__(self, why: str, pattern: str, occurrence: int = 1) -> None:
        self.why, self.pattern, self.occurrence = why, pattern, occurrence


def _constant(name: str) -> Any:
    # A bare word, not the same letters inside a string: after a colon, comma or bracket.
    raise _Refused(f"{name} is not a JSON number", r"[:,\[]\s*(" + re.escape(name) + ")")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} is too large for a JSON number", re.escape(text))
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            quoted = json.dumps(key)
            raise _Refused(f"the key {quoted} appears twice in one object", re.escape(quoted), 2)
        seen.add(key)
    return dict(pairs)


def _position(text: str, refused: _Refused) -> int:
    """Where the refused text stands (its ``occurrence``-th match), or 0."""
    matches = list(re.finditer(refused.pattern, text))
    if not matches:
        return 0
    match = matches[min(refused.occurrence, len(matches)) - 1]
    return match.start(match.lastindex or 0)


class StrictJSONDecoder(json.JSONDecoder):
    """A decoder that refuses what is not JSON with a ``JSONDecodeError`` saying what,
    as any other syntax error would."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(parse_constant=_constant, parse_float=_float, object_pairs_hook=_object)
        super().__init__(**kwargs)

    def decode(self, s: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().decode(s, *args, **kwargs)
        except _Refused as refused:
            raise json.JSONDecodeError(refused.why, s, _position(s, refused)) from None


def json_loads_strict(text: str) -> Any:
    """``json.loads(text)`` with ``StrictJSONDecoder``."""
    return json.loads(text, cls=StrictJSONDecoder)


class StrictJSONFormField(forms.JSONField):
    """Django's JSON form field reading strict JSON, and saying what is wrong where it
    only said "Enter a valid JSON."."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["decoder"] = StrictJSONDecoder
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and value not in self.empty_values and not self.disabled:
            try:
                json_loads_strict(value)
            except json.JSONDecodeError as error:
                raise forms.ValidationError(
                    f"This is not valid JSON: {error.msg} "
                    f"(line {error.lineno}, column {error.colno}).",
                    code="invalid",
                ) from None
        return super().to_python(value)
