from __future__ import annotations

import json
from typing import Any

from django import template

register = template.Library()


@register.filter
def json_pretty(value: Any) -> str:
    """Show a JSON value as indented JSON (not Python's repr)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@register.filter
def is_text(value: Any) -> bool:
    return isinstance(value, str)


@register.filter
def dict_items(value: Any) -> list | None:
    """A dict's (key, value) pairs, or None for anything else. ``value.items`` in a
    template looks up a key called "items" first: arguments or an input with such a key
    (a model writes what it likes) would loop over that key's value instead."""
    if isinstance(value, dict):
        return list(value.items())
    return None
