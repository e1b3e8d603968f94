"""JSON read as JSON is written, and values as the databases store them.

Python's ``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``, and reads a number
too large for a float (``1e999``) as infinity: none of them is JSON, neither PostgreSQL's
jsonb nor SQLite's JSON functions store them, so a value holding one would fail only
later, when it is saved (a form's 500, a crashed step). It also keeps the last of a key
written twice in one object and drops the other without a word, decodes ``"\\ud800"``
to a lone surrogate no database can store (nor UTF-8 encode), lets ``"\\u0000"`` through
although PostgreSQL refuses it, and gives up on deep nesting with a RecursionError.
Everything agentops reads from people or models goes through here instead:
``json_loads_strict``, and ``StrictJSONFormField`` for the admin's JSON boxes.

What a tool or a model already sent cannot be refused (the call happened): it goes
through ``json_storable``, which changes what cannot be stored and says what it changed.
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


def _int(text: str) -> int:
    # Python's int() refuses more than 4,300 digits with a ValueError, not a JSON error.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(
            f"an integer of more than {MAX_INT_DIGITS} digits is not accepted",
            rf"-?\d{{{MAX_INT_DIGITS + 1},}}",
        )
    return int(text)


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


# A string token (escapes and all) or one bracket: enough to count nesting without
# parsing, so brackets inside strings do not count.
_NESTING_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
# Where a decoded string's NUL or unpaired surrogate came from: its escape, or itself.
_NUL_AT = re.compile(r"\\u0000|\x00")
_SURROGATE_AT = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r"|[\ud800-\udfff]"
)


def nesting_check(text: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` before the parser recurses into it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # too few brackets to be too deep: most documents stop here
    depth = 0
    for token in _NESTING_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise json.JSONDecodeError(
                    f"nesting deeper than {MAX_DEPTH} levels is not accepted",
                    text,
                    token.start(),
                )
        elif bracket in "]}":
            depth -= 1


def _unstorable_text(value: Any) -> str:
    """Whether a string (or key) in ``value`` holds a NUL ("nul") or an unpaired
    surrogate ("surrogate"), or neither (""). Iterative, so no depth can break it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "nul"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "surrogate"
    return ""


def _text_check(text: str, value: Any) -> None:
    """Refuse text no database stores: NUL (PostgreSQL refuses it, so both do, for one
    behaviour everywhere) and unpaired surrogates (valid JSON escapes, but not Unicode
    text: no database, and no UTF-8 encoder, takes them)."""
    problem = _unstorable_text(value)
    if not problem:
        return
    if problem == "nul":
        found = _NUL_AT.search(text)
        why = "a NUL character (\\u0000) cannot be stored"
    else:
        found = _SURROGATE_AT.search(text)
        why = "an unpaired surrogate (\\ud800 to \\udfff) is not a character and cannot be stored"
    raise json.JSONDecodeError(why, text, found.start() if found else 0)


class StrictJSONDecoder(json.JSONDecoder):
    """A decoder that refuses what is not JSON, or what no database can store, with a
    ``JSONDecodeError`` saying what and where, as any other syntax error would."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
            object_pairs_hook=_object,
        )
        super().__init__(**kwargs)

    def decode(self, s: str, *args: Any, **kwargs: Any) -> Any:
        nesting_check(s)
        try:
            value = super().decode(s, *args, **kwargs)
        except _Refused as refused:
            raise json.JSONDecodeError(refused.why, s, _position(s, refused)) from None
        except RecursionError:
            # Only when called deep in a stack already: the nesting check came first.
            raise json.JSONDecodeError(
                f"nesting deeper than {MAX_DEPTH} levels is not accepted", s, 0
            ) from None
        _text_check(s, value)
        return value


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


def text_storable(text: str, *, where: str = "$") -> tuple[str, list[str]]:
    """``text`` as both databases store it (NUL and unpaired surrogates become U+FFFD),
    and a note for each change, naming ``where``: for a text field holding what a tool
    or a model sent (an error, a model's answer)."""
    notes: list[str] = []
    return _text_storable(text, where, notes), notes


def json_storable(value: Any, *, depth: int = 0) -> tuple[Any, list[str]]:
    """``value`` as both databases store and read back exactly, and a note for each
    change made: NaN and the infinities become the strings "NaN", "Infinity" and
    "-Infinity"; NUL characters and unpaired surrogates in text (and in keys) become
    U+FFFD; an int too long to write becomes its text; tuples become lists; decimals,
    times and UUIDs become text, as Django's encoder writes them; anything else becomes
    its ``repr``; nesting deeper than ``MAX_DEPTH`` is cut, counted from ``depth``
    (where ``value`` will stand in what holds it). A value that needs none of this
    comes back equal, with no notes.

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
                name = key if isinstance(key, str) else str(key)
                name = _text_storable(name, f"{path} (a key)", notes)
                while name in out:  # two keys made one by the change: keep both
                    notes.append(f"{path}: the key {name!r} came twice; one was renamed")
                    name += " (again)"
                out[name] = walk(child, f"{path}.{name}", depth + 1)
            return out
        if isinstance(item, (list, tuple)):
            return [walk(child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item)]
        try:
            return _text_storable(encoder.default(item), path, notes)
        except TypeError:
            notes.append(f"{path}: a {type(item).__name__} is not JSON; stored as its repr")
            return _text_storable(repr(item), path, notes)

    return walk(value, "$", depth), notes
