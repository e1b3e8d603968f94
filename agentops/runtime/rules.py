"""Rules over a call's arguments, written in CEL (cel-python), one effect each:

- ``deny``: if the expression is true, the call is refused with the rule named;
- ``approve``: if true, the call waits for a person, whatever the autonomy level;
- ``allow``: where a grant has allow rules, a call must match one of them.

Deny wins over approve, approve over allow. A rule that cannot be evaluated for a call
(a missing field, a type error) counts as matching for deny and approve, and as not
matching for allow: when in doubt, the safer side. Expressions compile when saved.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import celpy

EFFECTS = ("allow", "deny", "approve")
# One runner class in the whole process: cel-python crashes when a compiled
# environment is made after an interpreted one.
_ENVIRONMENT = celpy.Environment(runner_class=celpy.CompiledRunner)
# cel-python logs evaluation errors it also returns; the verdict says them instead.
logging.getLogger("celpy").setLevel(logging.CRITICAL)


class RuleError(ValueError):
    """A rule whose expression does not compile; the message shows where."""


@dataclass(frozen=True)
class RuleSpec:
    number: int
    expression: str
    effect: str
    description: str = ""

    def label(self) -> str:
        what = f" ({self.description})" if self.description else ""
        return f"rule {self.number} `{self.expression}`{what}"


@dataclass(frozen=True)
class RuleVerdict:
    effect: str  # "allow", "deny" or "approve"
    reason: str


def rule_check(expression: str) -> None:
    """Raise RuleError if the expression does not compile."""
    _program(expression)


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> Any:
    try:
        return _ENVIRONMENT.program(_ENVIRONMENT.compile(expression))
    except celpy.CELParseError as error:
        raise RuleError(f"the expression does not compile:\n{error}") from None
    except Exception as error:  # cel-python raises assorted errors for bad input
        raise RuleError(f"the expression does not compile: {error}") from None


def _matches(rule: RuleSpec, arguments: dict) -> bool | None:
    """True or False, or None when the rule cannot be evaluated for these arguments."""
    try:
        value = _program(rule.expression).evaluate({"args": celpy.json_to_cel(arguments)})
    except Exception:
        return None
    if isinstance(value, celpy.CELEvalError) or not isinstance(value, celpy.celtypes.BoolType):
        return None
    return bool(value)


def rules_evaluate(rules: Iterable[RuleSpec], arguments: dict) -> RuleVerdict:
    rules = list(rules)
    for rule in rules:
        if rule.effect == "deny" and _matches(rule, arguments) is not False:
            return RuleVerdict("deny", f"denied by {rule.label()}")
    for rule in rules:
        if rule.effect == "approve" and _matches(rule, arguments) is not False:
            return RuleVerdict("approve", f"{rule.label()} requires a person's approval")
    allows = [rule for rule in rules if rule.effect == "allow"]
    if allows and not any(_matches(rule, arguments) for rule in allows):
        labels = "; ".join(rule.label() for rule in allows)
        return RuleVerdict("deny", f"no allow rule matched the arguments ({labels})")
    return RuleVerdict("allow", "")
