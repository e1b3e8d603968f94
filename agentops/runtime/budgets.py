"""Budgets: steps, tokens, seconds of work, and spend. Checked before every model call
and every tool call, with the call's projected cost where it can be known, so a call that
would cross a limit is not made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

BUDGETS = ("steps", "tokens", "seconds", "spend")
MILLION = Decimal(1_000_000)
# Near the end, the model is told to wind up: when a budget has this share left, or
# fewer than WIND_UP_STEPS steps.
WIND_UP_SHARE = 0.2
WIND_UP_STEPS = 3


@dataclass(frozen=True)
class Limits:
    steps: int
    tokens: int | None = None
    seconds: float | None = None
    spend: Decimal | None = None

    def get(self, budget: str) -> Any:
        return getattr(self, budget)


@dataclass(frozen=True)
class Usage:
    steps: int
    tokens: int = 0
    seconds: float = 0.0
    spend: Decimal = Decimal(0)

    def get(self, budget: str) -> Any:
        return getattr(self, budget)


@dataclass(frozen=True)
class BudgetBreach:
    budget: str
    reason: str
    limit: Any
    used: Any


def limits_for(definition: dict, extra: dict) -> Limits:
    """The task version's limits plus what people granted this run."""

    def plus(budget: str, cast: type) -> Any:
        base = definition.get(f"max_{budget}")
        if base is None:
            return None
        return cast(base) + cast(extra.get(budget, 0))

    return Limits(
        steps=int(definition["max_steps"]) + int(extra.get("steps", 0)),
        tokens=plus("tokens", int),
        seconds=plus("seconds", float),
        spend=plus("spend", Decimal),
    )


def budget_check(
    limits: Limits,
    usage: Usage,
    *,
    steps: int = 1,
    tokens: int = 0,
    spend: Decimal = Decimal(0),
) -> BudgetBreach | None:
    """Would a call costing ``steps``, ``tokens`` and ``spend`` cross a limit?"""
    if usage.steps + steps > limits.steps:
        return BudgetBreach(
            "steps",
            f"step budget spent: {usage.steps} of {limits.steps} steps used",
            limits.steps,
            usage.steps,
        )
    if limits.tokens is not None and usage.tokens + tokens > limits.tokens:
        needs = f"; the next call needs up to {tokens}" if tokens else ""
        return BudgetBreach(
            "tokens",
            f"token budget: {usage.tokens} of {limits.tokens} tokens used{needs}",
            limits.tokens,
            usage.tokens,
        )
    if limits.seconds is not None and usage.seconds >= limits.seconds:
        return BudgetBreach(
            "seconds",
            f"time budget spent: {usage.seconds:.1f} of {limits.seconds:g} seconds of work",
            limits.seconds,
            round(usage.seconds, 3),
        )
    if limits.spend is not None and usage.spend + spend > limits.spend:
        needs = f"; the next call could cost up to {money(spend)}" if spend else ""
        return BudgetBreach(
            "spend",
            f"spend budget: {money(usage.spend)} of {money(limits.spend)} spent{needs}",
            str(limits.spend),
            str(usage.spend),
        )
    return None


def extension_for(breach: BudgetBreach, limits: Limits) -> dict[str, Any]:
    """What to propose to a person: half the budget's limit again (five steps at least)."""
    limit = limits.get(breach.budget)
    if breach.budget == "steps":
        return {"steps": max(5, limit // 2)}
    if breach.budget == "tokens":
        return {"tokens": max(1000, limit // 2)}
    if breach.budget == "seconds":
        return {"seconds": max(30.0, limit / 2)}
    return {"spend": str((Decimal(limit) / 2).quantize(Decimal("0.0001")))}


def extra_add(extra: dict, extension: dict) -> dict:
    """The run's granted budget after adding ``extension`` to it."""
    total = dict(extra)
    for budget, amount in extension.items():
        if budget == "spend":
            total[budget] = str(Decimal(total.get(budget, "0")) + Decimal(amount))
        else:
            total[budget] = total.get(budget, 0) + amount
    return total


def budget_note(limits: Limits, usage: Usage) -> str:
    """What the model is told of its remaining budget each turn."""
    parts = [f"{limits.steps - usage.steps} of {limits.steps} steps"]
    low = limits.steps - usage.steps <= WIND_UP_STEPS
    if limits.tokens is not None:
        parts.append(f"{max(0, limits.tokens - usage.tokens)} of {limits.tokens} tokens")
        low = low or usage.tokens >= limits.tokens * (1 - WIND_UP_SHARE)
    if limits.seconds is not None:
        parts.append(
            f"{max(0.0, limits.seconds - usage.seconds):.0f} of {limits.seconds:g} seconds"
        )
        low = low or usage.seconds >= limits.seconds * (1 - WIND_UP_SHARE)
    if limits.spend is not None:
        parts.append(
            f"{money(max(Decimal(0), limits.spend - usage.spend))} of {money(limits.spend)}"
        )
        low = low or usage.spend >= limits.spend * Decimal(1 - WIND_UP_SHARE)
    note = "Budget left: " + ", ".join(parts) + "."
    if low:
        note += " You are nearly out of budget: wind up now and give your best final answer."
    return note


def tokens_estimate(
    messages: list[dict], tools: list[dict], *, messages_chars: int | None = None
) -> int:
    """An upper-leaning estimate of a request's prompt tokens: about three characters a
    token (of the messages and the tools as JSON), plus a few tokens of framing per
    message. Used only to refuse a call before it is made; the server's count is what
    is recorded.

    ``messages_chars``: the sum of ``json_chars`` of each message, where the caller keeps
    it (the transcript does, message by message as the run grows), so that the whole
    transcript is not encoded again each turn; the estimate is the same."""
    if messages_chars is None:
        messages_chars = sum(json_chars(message) for message in messages)
    characters = list_chars(messages_chars, len(messages)) + len(json.dumps(tools))
    return characters // 3 + 8 * len(messages)


def json_chars(value: Any) -> int:
    """The length of ``value`` as JSON (``json.dumps`` with its defaults)."""
    return len(json.dumps(value))


def list_chars(items_chars: int, count: int) -> int:
    """The length of a JSON list of ``count`` items whose own lengths sum to
    ``items_chars``: ``json.dumps`` writes "[", the items separated by ", ", and "]"."""
    return items_chars + 2 * max(count - 1, 0) + 2


def cost(*, tokens_in: int, tokens_out: int, price_in: Decimal, price_out: Decimal) -> Decimal:
    value = (Decimal(tokens_in) * price_in + Decimal(tokens_out) * price_out) / MILLION
    return value.quantize(Decimal("0.000001"), rounding=ROUND_CEILING)


def money(value: Decimal) -> str:
    return f"{Decimal(value):.4f}"
