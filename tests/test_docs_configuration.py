"""docs/configuration.md against the code: every environment variable the settings read
is documented, with the code's default and lower bound, and the reference names no
variable that nothing reads any more.

The code is read with ``ast``, not imported: what counts is what the source asks the
environment for, whatever the environment of this test run holds."""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SETTINGS_FILES = (ROOT / "agentops" / "settings.py", ROOT / "agentops" / "config.py")
# Where the project's code lives: a variable read by name anywhere here counts as read.
CODE_DIRS = ("agentops", "approvals", "demo", "lineage", "tasks", "triggers", "tests")
APP_DIRS = tuple(name for name in CODE_DIRS if name != "tests")
# agentops.config's helpers that read no variable of their own.
NOT_READERS = {"env_file_load"}
# The position of each helper's default among its arguments (after the name).
DEFAULT_POSITION = {"env_choice": 2}
NAME = re.compile(r"[A-Z][A-Z0-9_]*\*?")
ROW_NAME = re.compile(r"^`([A-Z][A-Z0-9_]*\*?)`$")
BACKTICKED = re.compile(r"`([^`]*)`")
MAKE_VARIABLE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*\?=\s*(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Read:
    """One place the code asks the environment for a variable by name."""

    name: str
    where: str
    helper: str
    default: Any = None  # the literal default, when the code gives one
    has_default: bool = False
    minimum: float | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    default: str
    line: int


# Reading the code -------------------------------------------------------------------

ARITHMETIC = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub}


def literal(node: ast.AST | None) -> tuple[bool, Any]:
    """(True, value) for a literal, or constant arithmetic such as ``8 * 1024 * 1024``;
    (False, None) for anything computed at run time."""
    if node is None:
        return False, None
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        known_left, left = literal(node.left)
        known_right, right = literal(node.right)
        if known_left and known_right:
            return True, ARITHMETIC[type(node.op)](left, right)
        return False, None
    try:
        return True, ast.literal_eval(node)
    except ValueError:
        return False, None


def helper_name(call: ast.Call) -> str | None:
    """``env_int`` for ``env_int(...)``; ``os.environ.get`` and friends by their dotted
    name; None for any other call."""
    function = call.func
    if isinstance(function, ast.Name) and function.id.startswith("env_"):
        return None if function.id in NOT_READERS else function.id
    dotted = ast.unparse(function)
    if dotted in {"os.environ.get", "os.getenv", "os.environ.setdefault", "environ.get"}:
        return dotted
    return None


def place(path: Path, node: ast.AST) -> str:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{shown}:{node.lineno}"


def reads_in(path: Path) -> list[Read]:
    """Every read of a variable named by a string literal in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            # A read, not an assignment (the test settings set a few before loading).
            named = isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)
            if named and isinstance(node.ctx, ast.Load):
                found.append(Read(node.slice.value, place(path, node), "os.environ[]"))
            continue
        if not isinstance(node, ast.Call) or not node.args:
            continue
        helper = helper_name(node)
        first = node.args[0]
        if helper is None or not isinstance(first, ast.Constant):
            continue
        if not isinstance(first.value, str):
            continue
        where = place(path, node)
        position = DEFAULT_POSITION.get(helper, 1)
        default_node = node.args[position] if len(node.args) > position else None
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        default_node = keywords.get("default", default_node)
        has_default, default = literal(default_node)
        if helper == "env_str" and default_node is None:
            has_default, default = True, ""
        # `env_str("X") or "var"`: the default is what follows the `or`.
        parent = parents.get(node)
        if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.Or):
            after = parent.values[parent.values.index(node) + 1 :]
            has_default, default = literal(after[0]) if after else (False, None)
        _, minimum = literal(keywords.get("minimum"))
        choices: tuple[str, ...] = ()
        if helper == "env_choice" and len(node.args) > 1:
            _, choices = literal(node.args[1])
        found.append(
            Read(first.value, where, helper, default, has_default, minimum, tuple(choices or ()))
        )
    return found


def python_files(dirs: tuple[str, ...]) -> list[Path]:
    files = [ROOT / "manage.py"]
    for name in dirs:
        files += sorted(
            path for path in (ROOT / name).rglob("*.py") if "migrations" not in path.parts
        )
    return files


def settings_reads() -> list[Read]:
    return [read for path in SETTINGS_FILES for read in reads_in(path)]


def code_reads(dirs: tuple[str, ...] = CODE_DIRS) -> list[Read]:
    return [read for path in python_files(dirs) for read in reads_in(path)]


def make_variables() -> dict[str, str]:
    """The Makefile's ``NAME ?= value`` variables: the environment may set them."""
    return dict(MAKE_VARIABLE.findall((ROOT / "Makefile").read_text()))


def string_constants(paths: list[Path]) -> set[str]:
    return {
        node.value
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


# Reading the doc --------------------------------------------------------------------


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented() -> list[Row]:
    """The rows of the doc's tables whose header's first cell is ``variable``."""
    rows, in_table = [], False
    for number, line in enumerate(DOC.read_text().splitlines(), start=1):
        if not line.startswith("|"):
            in_table = False
            continue
        row = cells(line)
        if row[0] == "variable":
            in_table = True
            continue
        if not in_table or set(row[0]) <= {"-", " ", ":"}:
            continue
        match = ROW_NAME.match(row[0])
        assert match, f"docs/configuration.md:{number}: {row[0]!r} is not one `VARIABLE`"
        assert len(row) == 4, f"docs/configuration.md:{number}: a row has four cells"
        rows.append(Row(match.group(1), row[1], row[2], number))
    return rows


def numbers_in(text: str) -> list[float]:
    values = []
    for token in BACKTICKED.findall(text):
        try:
            values.append(float(token.replace(",", "")))
        except ValueError:
            continue
    return values


def default_said(read: Read, row: Row) -> str | None:
    """Why the row's default cell does not say the code's default; None when it does."""
    value, cell = read.default, row.default
    if isinstance(value, bool):
        expected = "true" if value else "false"
        return None if f"`{expected}`" in cell else f"`{expected}`"
    if isinstance(value, int | float):
        return None if float(value) in numbers_in(cell) else f"`{value}`"
    if isinstance(value, list):
        value = ",".join(value)
    if value == "":
        return None if re.search(r"\b(empty|none)\b", cell) else "empty"
    return None if f"`{value}`" in cell else f"`{value}`"


# The tests --------------------------------------------------------------------------


def test_the_settings_read_variables_the_parser_can_see():
    # A parser that found nothing would make every other test pass.
    names = {read.name for read in settings_reads()}
    assert {"DATABASE_URL", "SECRET_KEY", "AGENTOPS_QUEUE", "AGENTOPS_ENV_FILE"} <= names
    assert len(names) > 50
    rows = documented()
    assert len(rows) > 50
    assert len({row.name for row in rows}) == len(rows), "a variable has two rows"


def test_every_variable_the_settings_read_is_documented():
    rows = {row.name for row in documented()}
    missing = sorted({f"{read.name} ({read.where})" for read in settings_reads()})
    missing = [entry for entry in missing if entry.split(" ")[0] not in rows]
    assert not missing, (
        "read by the settings but missing from docs/configuration.md (add a row to the "
        "topic's table): " + ", ".join(missing)
    )


def test_every_variable_the_app_reads_by_name_is_documented():
    rows = {row.name for row in documented()}
    missing = sorted({f"{read.name} ({read.where})" for read in code_reads(APP_DIRS)})
    missing = [entry for entry in missing if entry.split(" ")[0] not in rows]
    assert not missing, "read by the code but missing from docs/configuration.md: " + ", ".join(
        missing
    )


def test_every_documented_variable_is_still_read():
    read = {entry.name for entry in code_reads()} | set(make_variables())
    constants = string_constants(python_files(APP_DIRS))
    stale = []
    for row in documented():
        if row.name.endswith("*"):
            # A family by prefix (TOOL_SECRET_*): the prefix must still be in the code.
            if row.name[:-1] not in constants:
                stale.append(f"{row.name} (line {row.line})")
        elif row.name not in read:
            stale.append(f"{row.name} (line {row.line})")
    assert not stale, (
        "docs/configuration.md lists variables that no code reads any more (remove the "
        "rows, or say where they are read): " + ", ".join(stale)
    )


def test_each_documented_default_is_the_codes():
    rows = {row.name: row for row in documented()}
    wrong = []
    for read in settings_reads():
        row = rows.get(read.name)
        if row is None or not read.has_default:
            continue
        expected = default_said(read, row)
        if expected is not None:
            wrong.append(
                f"{read.name}: the code's default is {expected} ({read.where}), "
                f"the doc says {row.default!r} (line {row.line})"
            )
    assert not wrong, "\n".join(wrong)


def test_each_documented_lower_bound_and_choice_is_the_codes():
    rows = {row.name: row for row in documented()}
    wrong = []
    for read in settings_reads():
        row = rows.get(read.name)
        if row is None:
            continue
        if read.minimum is not None:
            bound = re.search(r"at least `([^`]+)`", row.kind)
            if bound is None or float(bound.group(1)) != float(read.minimum):
                wrong.append(
                    f"{read.name}: at least `{read.minimum:g}` ({read.where}); "
                    f"the doc says {row.kind!r} (line {row.line})"
                )
        for choice in read.choices:
            if f"`{choice}`" not in row.kind:
                wrong.append(f"{read.name}: the choice `{choice}` is not in {row.kind!r}")
    assert not wrong, "\n".join(wrong)


def test_the_makefiles_variables_are_documented_with_their_defaults():
    rows = {row.name: row for row in documented()}
    for name, value in make_variables().items():
        if name not in {"PYTHON", "PORT"}:
            continue  # VENV and PY are the Makefile's own, not meant to be set
        assert name in rows, f"the Makefile's {name} is missing from docs/configuration.md"
        assert f"`{value.strip()}`" in rows[name].default, (name, rows[name].default)


@pytest.mark.parametrize(
    "source, expected",
    [
        ('env_int("A_B", 8 * 1024, minimum=2)', ("A_B", 8192, 2)),
        ('x = env_str("A_DIR") or "var"', ("A_DIR", "var", None)),
        ('env_choice("A_Q", ("q2", "celery"), "q2")', ("A_Q", "q2", None)),
        ('os.environ.get("A_FILE", "x")', ("A_FILE", "x", None)),
    ],
)
def test_the_parser_reads_each_form_the_settings_use(tmp_path, source, expected):
    # The checks above are only as good as this reading of the code.
    path = tmp_path / "settings.py"
    path.write_text(source + "\n")
    (read,) = reads_in(path)
    assert (read.name, read.default, read.minimum) == expected


def test_a_missing_row_is_reported_by_name(tmp_path, monkeypatch):
    # The doc without AGENTOPS_QUEUE's row: the check must name it.
    lines = DOC.read_text().splitlines()
    trimmed = tmp_path / "configuration.md"
    trimmed.write_text("\n".join(line for line in lines if "| `AGENTOPS_QUEUE`" not in line))
    monkeypatch.setitem(globals(), "DOC", trimmed)
    with pytest.raises(AssertionError, match="AGENTOPS_QUEUE"):
        test_every_variable_the_settings_read_is_documented()


def test_a_row_for_a_variable_nothing_reads_is_reported_by_name(tmp_path, monkeypatch):
    text = DOC.read_text().replace(
        "| `AGENTOPS_QUEUE` |",
        "| `AGENTOPS_GONE_LONG_AGO` | text | empty | gone |\n| `AGENTOPS_QUEUE` |",
    )
    grown = tmp_path / "configuration.md"
    grown.write_text(text)
    monkeypatch.setitem(globals(), "DOC", grown)
    with pytest.raises(AssertionError, match="AGENTOPS_GONE_LONG_AGO"):
        test_every_documented_variable_is_still_read()


def test_a_default_the_doc_gets_wrong_is_reported(tmp_path, monkeypatch):
    text = DOC.read_text().replace(
        "| `AGENTOPS_Q2_WORKERS` | whole number, at least `1` | `2` |",
        "| `AGENTOPS_Q2_WORKERS` | whole number, at least `1` | `4` |",
    )
    assert text != DOC.read_text()
    changed = tmp_path / "configuration.md"
    changed.write_text(text)
    monkeypatch.setitem(globals(), "DOC", changed)
    with pytest.raises(AssertionError, match="AGENTOPS_Q2_WORKERS"):
        test_each_documented_default_is_the_codes()
