"""Rules over a call's arguments, written in CEL (cel-python), one effect each:

- ``deny``: if the expression is true, the call is refused with the rule named;
- ``approve``: if true, the call waits for a person, whatever the autonomy level;
- ``allow``: where a grant has allow rules, a call must match one of them.

Deny wins over approve, approve over allow. A rule that cannot be evaluated for a call
(a missing field, a type error) counts as matching for deny and approve, and as not
matching for allow: when in doubt, the safer side; the verdict says it could not be
evaluated, and why. Expressions are checked when saved (``rule_check``): they must parse,
and call only functions and name only variables this CEL has.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy.evaluation import base_functions

EFFECTS = ("allow", "deny", "approve")
# One runner class in the whole process: cel-python crashes when a compiled
# environment is made after an interpreted one.
_ENVIRONMENT = celpy.Environment(runner_class=celpy.CompiledRunner)
# cel-python logs evaluation errors it also returns; the verdict says them instead.
logging.getLogger("celpy").setLevel(logging.CRITICAL)

# What an expression may call: cel-python's functions (its operators are named like
# "_+_" and are not called by name) and the CEL macros. cel-python also offers reduce()
# and min(), but its compiled runner cannot run them, so they are refused with the rest.
FUNCTIONS = frozenset(
    name for name in base_functions if name.isidentifier() and not name.startswith("_")
) | {"has", "dyn"}
METHODS = FUNCTIONS | {"all", "exists", "exists_one", "map", "filter"}
# Macros whose first argument names a variable bound in the rest: args.items.all(i, i > 0).
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
# Type names stand alone in comparisons such as type(args.amount) == int.
_TYPE_NAMES = frozenset(
    {"bool", "bytes", "double", "duration", "int", "list", "map", "null_type", "string"}
    | {"timestamp", "type", "uint"}
)


class RuleError(ValueError):
    """A rule whose expression cannot be checked: it does not parse, or it calls a
    function or names a variable this CEL has not got. The message says what and where."""


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
    """Raise RuleError if the expression does not parse, or calls a function or names a
    variable that evaluation would not find (it would then fail for every call)."""
    _program(expression)
    problems = _unknown_names(_ENVIRONMENT.compile(expression))
    if problems:
        raise RuleError("; ".join(problems))


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> Any:
    try:
        return _ENVIRONMENT.program(_ENVIRONMENT.compile(expression))
    except celpy.CELParseError as error:
        raise RuleError(_syntax_error_message(expression, error)) from None
    except Exception as error:  # cel-python raises assorted errors for bad input
        raise RuleError(f"the expression does not compile: {error}") from None


def _syntax_error_message(expression: str, error: celpy.CELParseError) -> str:
    """Where the expression stops parsing, and what was found there, in one line."""
    if not expression.strip():
        return "syntax error: the expression is empty"
    cause = error.__context__  # cel-python raises from inside lark's own exception
    if isinstance(cause, lark.exceptions.UnexpectedToken) and cause.token.type == "$END":
        lines = expression.rstrip().splitlines()
        return (
            f"syntax error at line {len(lines)}, column {len(lines[-1]) + 1}: the expression "
            f"ends before it is complete, after `{_tail(lines[-1])}`"
        )
    line, column = error.line or 1, error.column or 1
    before = _tail(expression.splitlines()[line - 1][: column - 1])
    where = f"after `{before}`" if before else "at the start"
    if isinstance(cause, lark.exceptions.UnexpectedToken):
        what = f"unexpected `{cause.token.value}` {where}"
    elif isinstance(cause, lark.exceptions.UnexpectedCharacters) and cause.char in "\"'":
        what = f"a string opens {where} and is never closed"
    elif isinstance(cause, lark.exceptions.UnexpectedCharacters):
        hint = " (compare with ==)" if cause.char == "=" else ""
        what = f"`{cause.char}` cannot stand here, {where}{hint}"
    else:
        what = str(error.args[0]).splitlines()[0] if error.args else "it does not parse"
    return f"syntax error at line {line}, column {column}: {what}"


def _tail(text: str, width: int = 40) -> str:
    text = text.strip()
    return text if len(text) <= width else "…" + text[-width:]


def _unknown_names(ast: lark.Tree) -> list[str]:
    """Each function call and variable that evaluation would not find, with where."""
    bound = set()
    for node in ast.iter_subtrees():
        if node.data == "member_dot_arg" and len(node.children) == 3:
            method, arguments = node.children[1], node.children[2]
            if method.value in _BINDING_MACROS and arguments.children:
                variable = arguments.children[0]
                bound.update(token.value for token in variable.scan_values(_is_name))
    problems, seen = [], set()
    for node in ast.iter_subtrees_topdown():
        if node.data in ("ident_arg", "dot_ident_arg"):
            name, known, what = node.children[0], FUNCTIONS, "function"
        elif node.data == "member_dot_arg":
            name, known, what = node.children[1], METHODS, "function"
        elif node.data in ("ident", "dot_ident"):
            name, known, what = node.children[0], {"args"} | bound | _TYPE_NAMES, "variable"
        else:
            continue
        if name.value in known or name.value in seen:
            continue
        seen.add(name.value)
        where = f"at line {name.line}, column {name.column}"
        if what == "function":
            guess = difflib.get_close_matches(name.value, sorted(METHODS), n=1)
            hint = (
                f"did you mean {guess[0]}()?" if guess else "it has " + ", ".join(sorted(METHODS))
            )
            problems.append(f"{name.value}() {where} is not a function CEL has here ({hint})")
        else:
            problems.append(
                f"{name.value} {where} is not a variable: the call's arguments are args, "
                f"as in args.{name.value}"
            )
    return problems


def _is_name(value: Any) -> bool:
    return isinstance(value, lark.Token) and value.type == "IDENT"


def _matches(rule: RuleSpec, arguments: dict) -> bool | str:
    """True or False; or, when the rule cannot be evaluated for these arguments, why not."""
    try:
        value = _program(rule.expression).evaluate({"args": celpy.json_to_cel(arguments)})
    except RuleError as error:
        return str(error)
    except celpy.CELEvalError as error:
        return _evaluation_error_reason(error)
    except Exception as error:  # cel-python raises assorted errors while evaluating
        return f"{type(error).__name__}: {error}"
    if isinstance(value, celpy.CELEvalError):
        return _evaluation_error_reason(value)
    if not isinstance(value, celpy.celtypes.BoolType):
        return f"it gave {_cel_text(value)}, not true or false"
    return bool(value)


def _evaluation_error_reason(error: BaseException) -> str:
    """cel-python nests its errors as (message, exception class, details); the innermost
    says what went wrong."""
    message, details = "evaluation error", ()
    while isinstance(error, celpy.CELEvalError):
        parts = [*error.args, None, None, None]
        message, details = str(parts[0]), parts[2]
        if isinstance(details, tuple) and len(details) == 3 and isinstance(details[1], type):
            error = celpy.CELEvalError(*details)
            continue
        break
    detail = ", ".join(str(part) for part in details) if isinstance(details, tuple) else ""
    detail = re.sub(r" <class '[^']*'>", "", detail)  # cel-python adds the Python classes
    if message == "unbound function":
        return f"no function named {detail}"
    if message.startswith("no such member in mapping: "):
        return f"no field {message.removeprefix('no such member in mapping: ')}"
    if detail.startswith(message):
        return detail
    if detail and detail not in message:
        return f"{message}: {detail}"
    return message


def _cel_text(value: Any) -> str:
    kind = type(value).__name__.removesuffix("Type").lower()
    return f"{kind} {value!s}" if kind else str(value)


# Deny wins over approve: each effect that stops a call, in order, with what it says.
STOPPING = (("deny", "denied by {rule}"), ("approve", "{rule} requires a person's approval"))


def rules_evaluate(rules: Iterable[RuleSpec], arguments: dict) -> RuleVerdict:
    rules = list(rules)
    for effect, says in STOPPING:
        for rule in rules:
            if rule.effect != effect:
                continue
            matched = _matches(rule, arguments)
            if matched is False:
                continue
            reason = says.format(rule=rule.label())
            if isinstance(matched, str):  # it could not be evaluated: the safer side
                reason += f", as it could not be evaluated: {matched}"
            return RuleVerdict(effect, reason)
    allows = [rule for rule in rules if rule.effect == "allow"]
    if not allows:
        return RuleVerdict("allow", "")
    labels = []
    for rule in allows:
        matched = _matches(rule, arguments)
        if matched is True:
            return RuleVerdict("allow", "")
        problem = f", as it could not be evaluated: {matched}" if isinstance(matched, str) else ""
        labels.append(f"{rule.label()}{problem}")
    return RuleVerdict("deny", f"no allow rule matched the arguments ({'; '.join(labels)})")
