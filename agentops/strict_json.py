"""JSON read as JSON is written.

Python's ``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON:
neither PostgreSQL's jsonb nor SQLite's JSON functions store them, so a value holding
one would fail only later, when it is saved (a form's 500, a crashed step). It also
keeps the last of a key written twice in one object and drops the other without a word.
Everything agentops reads from people or models goes through here instead.
"""

from __future__ import annotations

import json
from typing import Any


class _Refused(Exception):
    def __init__(self, why: str, near: str) -> None:
        self.why, self.near = why, near


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number", name)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Refused(f"the key {json.dumps(key)} appears twice in one object", key)
        seen.add(key)
    return dict(pairs)


def json_loads_strict(text: str) -> Any:
    """``json.loads(text)``, refusing the non-JSON numbers and a key written twice in one
    object with a ``JSONDecodeError`` that says which, as any other syntax error would
    (its position is where that text first stands)."""
    try:
        return json.loads(text, parse_constant=_constant, object_pairs_hook=_object)
    except _Refused as refused:
        raise json.JSONDecodeError(refused.why, text, max(text.find(refused.near), 0)) from None
