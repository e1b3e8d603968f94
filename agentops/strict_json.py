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


# How deep a value may nest before it is cut when stored (json_storable) or refused when
# read (json_loads_strict). Python's own json module gives up near 1,000 levels, with a
# RecursionError, not an error a person can act on.
MAX_DEPTH = 100
# Python refuses to write an int of more than 4,300 digits (sys.int_info); 13,000 bits
# is about 3,900 digits.
MAX_INT_DIGITS = 3900
MAX_INT_BITS = 13_000


def _text_storable(text: str, path: str, notes: list[str]) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
        notes.append(f"{path}: NUL characters (\\u0000) were replaced by U+FFFD")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        notes.append(f"{path}: unpaired surrogates were replaced by U+FFFD")
    return text


def json_storable(value: Any) -> tuple[Any, list[str]]:
    """``value`` as both databases store and read back exactly, and a note for each
    change made: NaN and the infinities become the strings "NaN", "Infinity" and
    "-Infinity"; NUL characters and unpaired surrogates in text (and in keys) become
    U+FFFD; an int too long to write becomes its text; tuples become lists; decimals,
    times and UUIDs become text, as Django's encoder writes them; anything else becomes
    its ``repr``; nesting deeper than ``MAX_DEPTH`` is cut. A value that needs none of
    this comes back equal, with no notes.

    For what a tool or a model sent, which must be recorded whatever it holds: a call
    that took effect must not lose its outcome to a value the database refuses."""
    from django.core.serializers.json import DjangoJSONEncoder

    notes: list[str] = []
    encoder = DjangoJSONEncoder()

    def walk(item: Any, path: str, depth: int) -> Any:
        if item is None or isinstance(item, bool):
            return item
        if isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                notes.append(f"{path}: an integer of more than {MAX_INT_DIGITS} digits was cut")
                return "[an integer too long to store]"
            return item
        if isinstance(item, float):
            if math.isfinite(item):
                return item
            text = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
            notes.append(f'{path}: {text} is not a JSON number; stored as the text "{text}"')
            return text
        if isinstance(item, str):
            return _text_storable(item, path, notes)
        if isinstance(item, (dict, list, tuple)) and depth >= MAX_DEPTH:
            notes.append(f"{path}: nested deeper than {MAX_DEPTH} levels; the rest was cut")
            return f"[nested deeper than {MAX_DEPTH} levels]"
        if isinstance(item, dict):
            out = {}
            for key, child in item.items():
                name = _text_storable(key if isinstance(key, str) else str(key), path, notes)
                out[name] = walk(child, f"{path}.{name}", depth + 1)
            return out
        if isinstance(item, (list, tuple)):
            return [walk(child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item)]
        try:
            return _text_storable(encoder.default(item), path, notes)
        except TypeError:
            notes.append(f"{path}: a {type(item).__name__} is not JSON; stored as its repr")
            return _text_storable(repr(item), path, notes)

    return walk(value, "$", 0), notes
