"""JSON read as JSON is written.

Python's ``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON:
neither PostgreSQL's jsonb nor SQLite's JSON functions store them, so a value holding
one would fail only later, when it is saved (a form's 500, a crashed step). Everything
agentops reads from people or models goes through here instead.
"""

from __future__ import annotations

import json
from typing import Any


class _Constant(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _refuse(name: str) -> Any:
    raise _Constant(name)


def json_loads_strict(text: str) -> Any:
    """``json.loads(text)``, refusing the non-JSON numbers with a ``JSONDecodeError``
    that names the first of them, as any other syntax error would."""
    try:
        return json.loads(text, parse_constant=_refuse)
    except _Constant as constant:
        position = text.find(constant.name)
        raise json.JSONDecodeError(
            f"{constant.name} is not a JSON number", text, max(position, 0)
        ) from None
