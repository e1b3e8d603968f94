"""Tools the tests grant. Each records its effects in EFFECTS so a test can count them."""

from __future__ import annotations

from collections import Counter

from agentops.runtime.tools import ToolContext, ToolError, tool

EFFECTS: Counter[str] = Counter()

TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 100}},
    "required": ["text"],
    "additionalProperties": False,
}


@tool(schema=TEXT, side_effect="read", idempotent=True)
def test_echo(ctx: ToolContext, *, text: str) -> dict:
    """Return the text."""
    EFFECTS[f"echo:{text}"] += 1
    return {"echo": text}


@tool(schema=TEXT, side_effect="reversible")
def test_note(ctx: ToolContext, *, text: str) -> dict:
    """Write a note (reversible)."""
    EFFECTS[f"note:{text}"] += 1
    return {"noted": text, "key": ctx.idempotency_key}


@tool(schema=TEXT, side_effect="irreversible")
def test_send(ctx: ToolContext, *, text: str) -> dict:
    """Send a message (irreversible, not idempotent)."""
    EFFECTS[f"send:{text}"] += 1
    return {"sent": text}


@tool(schema=TEXT, side_effect="irreversible", idempotent=True)
def test_charge(ctx: ToolContext, *, text: str) -> dict:
    """Charge, de-duplicated by the idempotency key (irreversible, idempotent)."""
    EFFECTS[f"charge:{ctx.idempotency_key}"] += 1
    return {"charged": text, "key": ctx.idempotency_key}


@tool(schema=TEXT, side_effect="read")
def test_broken(ctx: ToolContext, *, text: str) -> dict:
    """Always fails."""
    raise ToolError(f"the backend said no to {text!r}")


from tests import crash_tools  # noqa: E402,F401  (their tools register too)


@tool(schema=TEXT, side_effect="read", idempotent=True)
def test_flaky(ctx: ToolContext, *, text: str) -> dict:
    """Fails transiently until it has been called int(text) + 1 times for this key."""
    EFFECTS[f"flaky:{text}"] += 1
    if EFFECTS[f"flaky:{text}"] <= int(text):
        raise ToolError(f"not yet (attempt {EFFECTS[f'flaky:{text}']} of {text})", transient=True)
    return {"ok": True}


@tool(schema=TEXT, side_effect="read", idempotent=True)
def test_slow_lease_watch(ctx: ToolContext, *, text: str) -> dict:
    """Sleeps float(text) seconds and reports the run's lease deadline before and after."""
    import time

    from tasks.models import Run

    def deadline() -> str:
        return Run.objects.values_list("lease_expires_at", flat=True).get(pk=ctx.run_id).isoformat()

    before = deadline()
    time.sleep(float(text))
    return {"before": before, "after": deadline()}


@tool(schema=TEXT, side_effect="read", idempotent=True)
def test_leaky(ctx: ToolContext, *, text: str) -> dict:
    """Echoes the TEST_API_TOKEN environment variable, as a careless far side might."""
    import os

    return {"said": f"{text}: token is {os.environ.get('TEST_API_TOKEN', '')}"}


@tool(
    schema={
        "type": "object",
        "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
        "required": ["amount", "to"],
    },
    side_effect="reversible",
)
def test_pay(ctx: ToolContext, *, amount: float, to: str) -> dict:
    """Pays (reversible, for the rule tests)."""
    EFFECTS[f"pay:{to}:{amount}"] += 1
    return {"paid": amount, "to": to}


# What no database stores, as a tool might return it (tests/runtime/test_values.py).
ODD_VALUES = {
    "nan": float("nan"),
    "infinity": float("inf"),
    "nul": "a\x00b",
    "surrogate": "a\ud800b",
    "deep": None,  # made below: nested 2,000 levels
    "long_int": 10**5000,
    "key": {"k\x00": 1, "k\ud800": 2},
    "set": {1, 2},
}


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


@tool(schema=TEXT, side_effect="irreversible")
def test_odd_value(ctx: ToolContext, *, text: str) -> dict:
    """Takes effect, then returns ODD_VALUES[text] (irreversible, not idempotent)."""
    EFFECTS[f"odd:{text}"] += 1
    return {"value": _deep(2000) if text == "deep" else ODD_VALUES[text]}


@tool(schema=TEXT, side_effect="irreversible")
def test_odd_error(ctx: ToolContext, *, text: str) -> dict:
    """Takes effect, then fails with an error holding a NUL and a lone surrogate."""
    EFFECTS[f"odd_error:{text}"] += 1
    raise ToolError(f"the backend said \x00 and \ud800 about {text}")
