"""Budgets, checked before every model call and every tool call."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetBreach:
    budget: str
    reason: str


def steps_check(*, steps_used: int, max_steps: int) -> BudgetBreach | None:
    """A call would make step ``steps_used + 1``; refuse it past ``max_steps``."""
    if steps_used >= max_steps:
        return BudgetBreach("steps", f"step budget spent: {steps_used} of {max_steps} steps used")
    return None


def budget_note(*, steps_used: int, max_steps: int) -> str:
    """What the model is told of its remaining budget each turn."""
    left = max_steps - steps_used
    note = f"Budget: {left} of {max_steps} steps left (a model turn and each tool call is a step)."
    if left <= 3:
        note += " You are nearly out of steps: wind up now and give your best final answer."
    return note
