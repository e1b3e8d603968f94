"""SQL tools, against real databases: the suite's own (SQLite in the first pass,
PostgreSQL in the second, through the ``default`` alias) and a SQLite file of their own.

The suite's database is used in transactional tests: the tool opens a connection of its
own, which sees only committed data. The tests make and drop their own table."""

from __future__ import annotations

import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agentops.config import database_from_url
from agentops.runtime.engine import Outcome
from agentops.runtime.tools import ToolContext, ToolResult, executor_for_kind
from agentops.runtime.tools.sql import (
    SIDE_EFFECT_BY_MODE,
    SqlExecutor,
    query_for_sqlite,
    query_parameters,
    url_resolve,
)
from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from tasks.models import StepStatus, Tool
from tasks.services import run_start
from tests.conftest import run_until_rest

CONTEXT = ToolContext(run_id=uuid.uuid4(), step_number=1, idempotency_key="run:1")
TABLE = "sqltool_invoice"
INVOICES = [
    ("INV-1", "O'Brien", 1200, "2026-11"),
    ("INV-2", "Okafor", 450, "2026-11"),
    ("INV-3", "O'Brien", 90, "2026-11"),
    ("INV-4", "Lindqvist", 3000, "2026-11"),
    ("INV-5", "Okafor", 75, "2026-11"),
    ("INV-6", "O'Brien", 610, "2026-12"),
]
CUSTOMER = {
    "type": "object",
    "properties": {"customer": {"type": "string", "maxLength": 100}},
    "required": ["customer"],
    "additionalProperties": False,
}
BATCH = {
    "type": "object",
    "properties": {"batch": {"type": "string"}},
    "required": ["batch"],
    "additionalProperties": False,
}
INVOICE = {
    "type": "object",
    "properties": {
        "number": {"type": "string"},
        "customer": {"type": "string"},
        "amount": {"type": "integer"},
        "batch": {"type": "string"},
    },
    "required": ["number", "customer", "amount", "batch"],
    "additionalProperties": False,
}
BY_CUSTOMER = f"SELECT number, amount FROM {TABLE} WHERE customer = %(customer)s ORDER BY number"
BY_BATCH = f"SELECT number FROM {TABLE} WHERE batch = %(batch)s ORDER BY number"
INSERT = (
    f"INSERT INTO {TABLE} (number, customer, amount, batch) "
    "VALUES (%(number)s, %(customer)s, %(amount)s, %(batch)s)"
)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

suite_db = pytest.mark.django_db(transaction=True)


def sql_tool(
    config: dict,
    *,
    schema: dict = CUSTOMER,
    timeout: float = 10.0,
    side_effect: str | None = None,
    name: str = "ledger_sql",
) -> Tool:
    """An unsaved sql tool: the executor needs no row to run it."""
    return Tool(
        name=name,
        kind=Tool.Kind.SQL,
        config=config,
        input_schema=schema,
        side_effect=side_effect or SIDE_EFFECT_BY_MODE[config.get("mode", "read")],
        timeout_seconds=timeout,
    )


def call(tool: Tool, arguments: dict) -> ToolResult:
    """Through the doors a call passes in the engine: config, arguments, then the call."""
    executor = executor_for_kind("sql")
    assert executor.config_errors(tool.config) == []
    assert executor.validate(tool, arguments) == []
    return executor.execute(tool, arguments, CONTEXT)


def table_create(cursor) -> None:
    cursor.execute(
        f"CREATE TABLE {TABLE} (number VARCHAR(20) PRIMARY KEY, customer VARCHAR(100) "
        "NOT NULL, amount INTEGER NOT NULL, batch VARCHAR(20) NOT NULL)"
    )


# A SQLite file of the tests' own ------------------------------------------------------


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    """A SQLite file (rollback journal, not WAL) apart from the suite's database."""
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        table_create(db)
        db.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", INVOICES)
    return path


def file_rows(path: Path, sql: str, *params: object) -> list[tuple]:
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        return db.execute(sql, params).fetchall()


def file_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path: four slashes in all


def test_a_read_tool_on_a_sqlite_url_binds_its_parameters(ledger_file):
    tool = sql_tool({"url": file_url(ledger_file), "mode": "read", "query": BY_CUSTOMER})

    result = call(tool, {"customer": "O'Brien"})

    assert result.ok, result.error
    assert result.value == {
        "rows": [
            {"number": "INV-1", "amount": 1200},
            {"number": "INV-3", "amount": 90},
            {"number": "INV-6", "amount": 610},
        ],
        "row_count": 3,
        "truncated": False,
    }
    # Bound, not pasted into the SQL: the classic injection matches nothing.
    injected = call(tool, {"customer": "x' OR '1'='1"})
    assert injected.ok and injected.value["rows"] == []


def test_the_row_limit_truncates_and_says_so(ledger_file):
    config = {"url": file_url(ledger_file), "mode": "read", "query": BY_BATCH, "row_limit": 2}
    result = call(sql_tool(config, schema=BATCH), {"batch": "2026-11"})
    assert result.value == {
        "rows": [{"number": "INV-1"}, {"number": "INV-2"}],
        "row_count": 2,
        "truncated": True,
    }

    exact = call(sql_tool({**config, "row_limit": 5}, schema=BATCH), {"batch": "2026-11"})
    assert exact.value["row_count"] == 5 and exact.value["truncated"] is False


def test_a_slow_sqlite_read_is_stopped_at_the_tools_time_limit(ledger_file):
    # Counts towards a trillion: hours of work, unless something stops it.
    query = (
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < %(upto)s) "
        "SELECT count(*) AS n FROM c"
    )
    schema = {"type": "object", "properties": {"upto": {"type": "integer"}}}
    tool = sql_tool(
        {"url": file_url(ledger_file), "mode": "read", "query": query}, schema=schema, timeout=0.5
    )

    started = time.monotonic()
    result = call(tool, {"upto": 10**12})

    assert time.monotonic() - started < 5
    assert not result.ok and result.transient
    assert "ran past the tool's 0.5-second limit" in result.error


def test_a_write_through_a_sqlite_read_tool_fails_and_changes_nothing(ledger_file):
    # It starts with WITH, so it passes the check on saving: the read-only connection
    # (mode=ro, query_only) is what stops it.
    query = f"WITH t AS (SELECT 1) UPDATE {TABLE} SET amount = 0 WHERE customer = %(customer)s"
    tool = sql_tool({"url": file_url(ledger_file), "mode": "read", "query": query})

    result = call(tool, {"customer": "O'Brien"})

    assert not result.ok and not result.transient
    assert "refused a change through a read tool" in result.error
    assert "SQLITE_READONLY" in result.error
    assert file_rows(ledger_file, f"SELECT sum(amount) FROM {TABLE}") == [(5425,)]


def test_every_column_comes_back_as_json_and_none_is_dropped(ledger_file):
    query = "SELECT x'00ff' AS raw, 1 AS n, 2 AS n, %(n)s AS bound"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    tool = sql_tool({"url": file_url(ledger_file), "mode": "read", "query": query}, schema=schema)
    assert call(tool, {"n": 3}).value["rows"] == [{"raw": "\\x00ff", "n": 1, "n_2": 2, "bound": 3}]

    too_large = call(tool, {"n": 2**70})
    assert not too_large.ok and not too_large.transient
    assert "too large for SQLite's 64-bit integers" in too_large.error


def test_a_sqlite_write_tool_inserts_commits_and_reports_the_row_count(ledger_file):
    tool = sql_tool(
        {"url": file_url(ledger_file), "mode": "write", "query": INSERT}, schema=INVOICE
    )
    result = call(tool, {"number": "INV-7", "customer": "D'Arcy", "amount": 5, "batch": "2026-12"})
    assert result.ok, result.error
    assert result.value == {"row_count": 1}
    assert file_rows(ledger_file, f"SELECT customer FROM {TABLE} WHERE number = 'INV-7'") == [
        ("D'Arcy",)
    ]

    returning = sql_tool(
        {"url": file_url(ledger_file), "mode": "write", "query": INSERT + " RETURNING number"},
        schema=INVOICE,
    )
    result = call(returning, {"number": "INV-8", "customer": "Ng", "amount": 6, "batch": "2026-12"})
    assert result.value == {"row_count": 1, "rows": [{"number": "INV-8"}]}


def test_a_sqlite_write_tool_never_creates_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere.sqlite3"
    tool = sql_tool({"url": file_url(missing), "mode": "write", "query": INSERT}, schema=INVOICE)
    result = call(tool, {"number": "1", "customer": "a", "amount": 1, "batch": "b"})
    assert not result.ok and "could not open the SQLite file nowhere.sqlite3" in result.error
    assert not missing.exists()


def test_a_lock_held_past_the_limit_stops_reads_for_a_retry_and_writes_for_good(ledger_file):
    read = sql_tool(
        {"url": file_url(ledger_file), "mode": "read", "query": BY_CUSTOMER}, timeout=0.5
    )
    write = sql_tool(
        {"url": file_url(ledger_file), "mode": "write", "query": INSERT},
        schema=INVOICE,
        timeout=0.5,
    )
    with closing(sqlite3.connect(ledger_file, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")  # a rollback journal: readers wait too
        started = time.monotonic()
        read_result = call(read, {"customer": "Okafor"})
        write_result = call(write, {"number": "X", "customer": "x", "amount": 1, "batch": "x"})
        assert time.monotonic() - started < 10
        holder.execute("ROLLBACK")

    assert not read_result.ok and read_result.transient
    assert "stayed locked past the tool's 0.5-second limit" in read_result.error
    assert not write_result.ok and not write_result.transient
    assert file_rows(ledger_file, f"SELECT count(*) FROM {TABLE}") == [(6,)]


def test_a_secret_in_a_sqlite_url_is_read_from_the_environment(ledger_file, monkeypatch):
    tool = sql_tool(
        {"url": "sqlite:///{secret:SQLTOOL_LEDGER_PATH}", "mode": "read", "query": BY_CUSTOMER}
    )
    monkeypatch.delenv("SQLTOOL_LEDGER_PATH", raising=False)
    missing = call(tool, {"customer": "Okafor"})
    assert not missing.ok and not missing.transient
    assert "the secret SQLTOOL_LEDGER_PATH is not set" in missing.error

    monkeypatch.setenv("SQLTOOL_LEDGER_PATH", str(ledger_file))
    result = call(tool, {"customer": "Okafor"})
    assert result.ok, result.error
    assert [row["number"] for row in result.value["rows"]] == ["INV-2", "INV-5"]


def test_a_secret_password_cannot_change_the_urls_shape(monkeypatch):
    monkeypatch.setenv("SQLTOOL_PASSWORD", "p@ss/w:rd%?#")
    url = url_resolve("postgres://ledger:{secret:SQLTOOL_PASSWORD}@db.internal:5433/books")
    entry = database_from_url("url", url, base_dir=settings.BASE_DIR)
    assert (entry["USER"], entry["PASSWORD"]) == ("ledger", "p@ss/w:rd%?#")
    assert (entry["HOST"], entry["PORT"], entry["NAME"]) == ("db.internal", "5433", "books")


def test_a_refused_connection_may_be_retried():
    tool = sql_tool(
        {"url": "postgres://ledger@127.0.0.1:1/books", "mode": "write", "query": INSERT},
        schema=INVOICE,
    )
    result = call(tool, {"number": "1", "customer": "a", "amount": 1, "batch": "b"})
    assert not result.ok and result.transient
    assert "could not connect to the database 'books' on 127.0.0.1" in result.error


def test_a_write_tool_declared_read_only_is_never_called(ledger_file):
    tool = sql_tool(
        {"url": file_url(ledger_file), "mode": "write", "query": INSERT},
        schema=INVOICE,
        side_effect="read",
    )
    result = call(tool, {"number": "INV-9", "customer": "a", "amount": 1, "batch": "b"})
    assert not result.ok and "declared read-only" in result.error
    assert file_rows(ledger_file, f"SELECT count(*) FROM {TABLE}") == [(6,)]


def test_write_tools_are_irreversible_by_default():
    assert SIDE_EFFECT_BY_MODE == {"read": "read", "write": "irreversible"}


# The suite's database, through the "default" alias -------------------------------------


@pytest.fixture
def suite_ledger(transactional_db):
    """The invoice table in the suite's database, committed (so the tool's own connection
    sees it), and dropped afterwards."""
    with connection.cursor() as cursor:
        table_create(cursor)
        cursor.executemany(f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s)", INVOICES)
    yield TABLE
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")


def suite_rows(sql: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]


def default_tool(query: str, *, mode: str = "read", **fields) -> Tool:
    return sql_tool({"database": "default", "mode": mode, "query": query}, **fields)


@suite_db
def test_a_read_tool_on_the_suites_database_returns_bound_rows(suite_ledger):
    tool = default_tool(BY_CUSTOMER)
    with CaptureQueriesContext(connection) as django_queries:
        result = call(tool, {"customer": "O'Brien"})

    assert result.ok, f"{connection.vendor}: {result.error}"
    assert result.value == {
        "rows": [
            {"number": "INV-1", "amount": 1200},
            {"number": "INV-3", "amount": 90},
            {"number": "INV-6", "amount": 610},
        ],
        "row_count": 3,
        "truncated": False,
    }
    # The tool used a connection of its own: Django's (the engine's) saw nothing.
    assert len(django_queries) == 0 and not connection.in_atomic_block


@suite_db
def test_the_row_limit_truncates_on_the_suites_database(suite_ledger):
    config = {"database": "default", "mode": "read", "query": BY_BATCH, "row_limit": 3}
    result = call(sql_tool(config, schema=BATCH), {"batch": "2026-11"})
    assert result.value["rows"] == [{"number": "INV-1"}, {"number": "INV-2"}, {"number": "INV-3"}]
    assert result.value["truncated"] is True


@suite_db
def test_a_slow_read_on_the_suites_database_is_stopped_at_the_limit(suite_ledger):
    schema = {"type": "object", "properties": {"seconds": {"type": "integer"}}}
    if connection.vendor == "postgresql":
        tool = default_tool("SELECT pg_sleep(%(seconds)s) AS slept", schema=schema, timeout=0.5)
        arguments = {"seconds": 30}
    else:
        query = (
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
            "WHERE n < %(seconds)s * 1000000000) SELECT count(*) AS n FROM c"
        )
        tool = default_tool(query, schema=schema, timeout=0.5)
        arguments = {"seconds": 3600}

    started = time.monotonic()
    result = call(tool, arguments)

    assert time.monotonic() - started < 5, connection.vendor
    assert not result.ok and result.transient, result.error
    assert "ran past the tool's 0.5-second limit" in result.error


@suite_db
def test_a_write_through_a_read_tool_fails_and_changes_nothing(suite_ledger):
    if connection.vendor == "postgresql":
        # A data-modifying CTE: a SELECT on the outside.
        query = (
            f"WITH changed AS (UPDATE {TABLE} SET amount = 0 WHERE customer = %(customer)s "
            "RETURNING number) SELECT count(*) AS n FROM changed"
        )
    else:
        query = f"WITH t AS (SELECT 1) UPDATE {TABLE} SET amount = 0 WHERE customer = %(customer)s"
    result = call(default_tool(query), {"customer": "O'Brien"})

    assert not result.ok and not result.transient
    assert "refused a change through a read tool" in result.error, result.error
    assert suite_rows(f"SELECT sum(amount) FROM {TABLE}") == [(5425,)]


@suite_db
def test_a_second_statement_cannot_escape_the_read_only_transaction(suite_ledger):
    # Passes the check on saving (it starts with SELECT); the driver sends one statement.
    query = f"SELECT 1 AS one; COMMIT; DELETE FROM {TABLE} WHERE customer = %(customer)s"
    result = call(default_tool(query), {"customer": "Okafor"})
    assert not result.ok and not result.transient
    assert suite_rows(f"SELECT count(*) FROM {TABLE}") == [(6,)]

    no_parameters = call(
        default_tool(f"SELECT 1 AS one; DELETE FROM {TABLE}", schema=NO_ARGUMENTS), {}
    )
    assert not no_parameters.ok
    assert suite_rows(f"SELECT count(*) FROM {TABLE}") == [(6,)]


@suite_db
def test_a_write_tool_on_the_suites_database_commits_and_reports_the_row_count(suite_ledger):
    insert = default_tool(INSERT, mode="write", schema=INVOICE)
    result = call(insert, {"number": "INV-7", "customer": "D'Arcy", "amount": 5, "batch": "x"})
    assert result.ok, result.error
    assert result.value == {"row_count": 1}
    assert suite_rows(f"SELECT customer FROM {TABLE} WHERE number = 'INV-7'") == [("D'Arcy",)]

    update = default_tool(
        f"UPDATE {TABLE} SET amount = amount + 1 WHERE customer = %(customer)s", mode="write"
    )
    result = call(update, {"customer": "O'Brien"})
    assert result.value == {"row_count": 3}
    assert suite_rows(f"SELECT sum(amount) FROM {TABLE} WHERE customer = 'O''Brien'") == [(1903,)]


@suite_db
def test_a_constraint_or_a_bad_query_is_reported_and_not_retried(suite_ledger):
    insert = default_tool(INSERT, mode="write", schema=INVOICE)
    duplicate = call(insert, {"number": "INV-1", "customer": "a", "amount": 1, "batch": "b"})
    assert not duplicate.ok and not duplicate.transient
    assert "refused the change" in duplicate.error
    name = "UniqueViolation" if connection.vendor == "postgresql" else "SQLITE_CONSTRAINT"
    assert name in duplicate.error, duplicate.error

    nowhere = default_tool("INSERT INTO sqltool_nowhere VALUES (1)", mode="write", schema={})
    missing = call(nowhere, {})
    assert not missing.ok and not missing.transient
    assert "refused the query" in missing.error and "sqltool_nowhere" in missing.error
    assert suite_rows(f"SELECT count(*) FROM {TABLE}") == [(6,)]


@suite_db
def test_a_write_held_up_by_a_lock_past_the_limit_fails_for_good(suite_ledger):
    update = default_tool(
        f"UPDATE {TABLE} SET amount = 0 WHERE customer = %(customer)s", mode="write", timeout=0.5
    )
    holder = peer_connection()
    try:
        if connection.vendor == "postgresql":
            holder.execute(f"SELECT * FROM {TABLE} WHERE customer = 'Okafor' FOR UPDATE")
        else:
            holder.execute("BEGIN IMMEDIATE")
            holder.execute(f"UPDATE {TABLE} SET batch = batch WHERE number = 'INV-1'")
        started = time.monotonic()
        result = call(update, {"customer": "Okafor"})
        assert time.monotonic() - started < 10
    finally:
        holder.rollback()
        holder.close()

    assert not result.ok and not result.transient, result.error
    assert "0.5-second limit" in result.error
    assert suite_rows(f"SELECT sum(amount) FROM {TABLE} WHERE customer = 'Okafor'") == [(525,)]


def peer_connection():
    """A plain DB-API connection to the suite's database, beside Django's and the tool's."""
    entry = connection.settings_dict
    if connection.vendor == "postgresql":
        import psycopg

        return psycopg.connect(
            dbname=entry["NAME"],
            user=entry["USER"] or None,
            password=entry["PASSWORD"] or None,
            host=entry["HOST"] or None,
            port=entry["PORT"] or None,
            connect_timeout=5,
        )
    return sqlite3.connect(entry["NAME"], isolation_level=None, timeout=5)


def suite_url(monkeypatch, *, name: str = "{secret:SQLTOOL_DATABASE}") -> str:
    """A URL of the suite's database, its password (and by default its name) secrets."""
    entry = connection.settings_dict
    monkeypatch.setenv("SQLTOOL_DATABASE", str(entry["NAME"]))
    if connection.vendor != "postgresql":
        return f"sqlite:///{name}"
    password = ":{secret:SQLTOOL_PASSWORD}" if entry["PASSWORD"] else ""
    monkeypatch.setenv("SQLTOOL_PASSWORD", entry["PASSWORD"] or "unused")
    return (
        f"postgres://{entry['USER']}{password}@{entry['HOST'] or 'localhost'}:"
        f"{entry['PORT'] or 5432}/{name}"
    )


@suite_db
def test_a_url_to_the_suites_database_reads_its_secrets_at_call_time(suite_ledger, monkeypatch):
    tool = sql_tool({"url": suite_url(monkeypatch), "mode": "read", "query": BY_CUSTOMER})

    result = call(tool, {"customer": "Lindqvist"})

    assert result.ok, result.error
    assert result.value["rows"] == [{"number": "INV-4", "amount": 3000}]


@suite_db
def test_agentops_own_database_is_refused_to_a_tool_by_alias_and_by_url(
    suite_ledger, monkeypatch, settings
):
    # Outside the test suite (which allows it, to use its database as a peer), a tool
    # must not reach the runtime's own records: an agent could approve its own calls.
    settings.AGENTOPS_SQL_OWN_DATABASE = False
    executor = executor_for_kind("sql")
    refusal = "is agentops' own database"

    by_alias = default_tool(f"DELETE FROM {TABLE}", mode="write", side_effect="irreversible")
    assert any(refusal in error for error in executor.config_errors(by_alias.config))
    result = executor.execute(by_alias, {"customer": "x"}, CONTEXT)
    assert not result.ok and refusal in result.error

    # Its name a secret: the tool can be saved, and is refused when the secret is read.
    by_secret = sql_tool({"url": suite_url(monkeypatch), "mode": "read", "query": BY_CUSTOMER})
    assert executor.config_errors(by_secret.config) == []
    result = executor.execute(by_secret, {"customer": "Lindqvist"}, CONTEXT)
    assert not result.ok and refusal in result.error and "was not made" in result.error

    # Written out: refused when the tool is saved.
    named = suite_url(monkeypatch, name=str(connection.settings_dict["NAME"]))
    errors = executor.config_errors({"url": named, "mode": "read", "query": BY_CUSTOMER})
    assert any(refusal in error for error in errors), errors
    assert len(suite_rows(f"SELECT * FROM {TABLE}")) == len(INVOICES)


@pytest.mark.parametrize("query", ["dbname=agentops", "host=db.internal&port=5433", "service=x"])
def test_a_tool_url_may_not_say_where_to_connect_in_its_query(monkeypatch, query):
    # Else the URL's parts, which the own-database check reads, would not be where the
    # tool connects: postgres://u@harmless/harmless?dbname=agentops
    executor = executor_for_kind("sql")
    config = {"url": f"postgres://u@harmless/harmless?{query}", "mode": "read", "query": "SELECT 1"}
    errors = executor.config_errors(config)
    assert any("the query may not set" in error for error in errors), errors

    monkeypatch.setenv("SQLTOOL_URL", config["url"])
    tool = sql_tool({**config, "url": "secret:SQLTOOL_URL"}, schema=NO_ARGUMENTS)
    assert executor.config_errors(tool.config) == []  # a secret is read at call time
    result = executor.execute(tool, {}, CONTEXT)
    assert not result.ok and "in its query" in result.error and "was not made" in result.error


# Through the engine -------------------------------------------------------------------


@suite_db
def test_a_sql_write_waits_for_a_person_at_supervised_then_commits(
    suite_ledger, make_task, operator
):
    Tool.objects.create(
        name="sqltool_insert",
        kind=Tool.Kind.SQL,
        side_effect="irreversible",
        input_schema=INVOICE,
        config={"database": "default", "mode": "write", "query": INSERT},
        timeout_seconds=10,
    )
    arguments = {"number": "INV-7", "customer": "D'Arcy", "amount": 5, "batch": "2026-12"}
    task = make_task(
        [{"calls": [("sqltool_insert", arguments)]}, {"content": "inserted INV-7"}],
        tools=["sqltool_insert"],
        autonomy_level=1,
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)

    assert run_until_rest(run) is Outcome.WAITING
    approval = Approval.objects.get(run=run, status=ApprovalStatus.PENDING)
    assert approval.tool_name == "sqltool_insert" and approval.arguments == arguments
    assert "irreversible" in run.steps.get(kind="tool").gate
    assert suite_rows(f"SELECT count(*) FROM {TABLE} WHERE number = 'INV-7'") == [(0,)]

    approval_decide(approval=approval, user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED

    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED, step.error
    assert step.result == {"row_count": 1}
    assert suite_rows(f"SELECT customer FROM {TABLE} WHERE number = 'INV-7'") == [("D'Arcy",)]


@suite_db
def test_a_sql_read_runs_without_a_person_and_its_rows_are_recorded(
    suite_ledger, make_task, operator
):
    Tool.objects.create(
        name="sqltool_invoices",
        kind=Tool.Kind.SQL,
        side_effect="read",
        input_schema=CUSTOMER,
        config={"database": "default", "mode": "read", "query": BY_CUSTOMER, "row_limit": 2},
        timeout_seconds=10,
    )
    task = make_task(
        [{"calls": [("sqltool_invoices", {"customer": "O'Brien"})]}, {"content": "done"}],
        tools=["sqltool_invoices"],
        autonomy_level=1,
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)

    assert run_until_rest(run) is Outcome.FINISHED
    step = run.steps.get(kind="tool")
    assert step.status == StepStatus.SUCCEEDED, step.error
    assert step.result == {
        "rows": [{"number": "INV-1", "amount": 1200}, {"number": "INV-3", "amount": 90}],
        "row_count": 2,
        "truncated": True,
    }


# Saving a tool: config_errors and validate ---------------------------------------------


def errors_of(config: object) -> str:
    return " | ".join(SqlExecutor().config_errors(config))


@pytest.mark.parametrize(
    "config",
    [
        {"database": "default", "mode": "read", "query": "SELECT 1 AS one"},
        {"database": "default", "mode": "read", "query": "  -- the batch\n(select 1)"},
        {"database": "default", "mode": "read", "query": "/* c */ WITH x AS (SELECT 1) SELECT *"},
        {"database": "default", "mode": "read", "query": "VALUES (1)", "row_limit": 10_000},
        {"database": "default", "mode": "write", "query": "DELETE FROM t WHERE a = %(a)s"},
        {"url": "sqlite:///var/ledger.sqlite3", "mode": "read", "query": "SELECT 1"},
        {
            "url": "postgres://app:{secret:LEDGER_PASSWORD}@db.internal/ledger",
            "mode": "read",
            "query": "SELECT number FROM invoice WHERE note LIKE '50%%' AND batch = %(batch)s",
        },
        {"url": "secret:LEDGER_URL", "mode": "write", "query": "UPDATE t SET a = 1"},
    ],
)
def test_a_good_config_has_no_errors(config):
    assert SqlExecutor().config_errors(config) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"mode": "read", "query": "SELECT 1"}, "database or url: name the database"),
        (
            {"database": "default", "url": "sqlite:///x", "mode": "read", "query": "SELECT 1"},
            "either database (a DATABASES alias) or url, not both",
        ),
        (
            {"database": "ledger", "mode": "read", "query": "SELECT 1"},
            "database: 'ledger' is not a DATABASES alias (known: default)",
        ),
        (
            {"url": "mysql://db/ledger", "mode": "read", "query": "SELECT 1"},
            "the scheme 'mysql' is not supported",
        ),
        (
            {"url": "postgres://app:hunter2@db/ledger", "mode": "read", "query": "SELECT 1"},
            "url: the password is written out; name it as {secret:NAME}",
        ),
        ({"database": "default", "query": "SELECT 1"}, "mode: say read or write"),
        (
            {"database": "default", "mode": "delete", "query": "SELECT 1"},
            "mode: 'delete' is not read or write",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1", "row_limit": 0},
            "row_limit: 0 is not a whole number from 1 to 10000",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1", "row_limit": "10"},
            "row_limit: '10' is not a whole number",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1", "row_limit": True},
            "row_limit: True is not a whole number",
        ),
        (
            {"database": "default", "mode": "write", "query": "DELETE FROM t", "row_limit": 5},
            "row_limit: only read tools return rows",
        ),
        ({"database": "default", "mode": "read", "query": "  "}, "query: give the SQL"),
        ({"database": "default", "mode": "read"}, "query: give the SQL"),
        (
            {"database": "default", "mode": "read", "query": "UPDATE t SET a = 1"},
            "query: a read tool's query must start with SELECT, WITH, VALUES, SHOW or EXPLAIN, "
            "not UPDATE; to change data, make it a write tool",
        ),
        (
            {"database": "default", "mode": "read", "query": "-- harmless\nDELETE FROM t"},
            "not DELETE",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1 WHERE a LIKE 'x%'"},
            "write a literal % as %%",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1 WHERE a = %s"},
            "%s is a positional parameter; name it, as %(name)s",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT %(a)d"},
            "write the parameter a as %(a)s",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT %(a b)s"},
            "a parameter's name is letters, digits and underscores",
        ),
        (
            {"database": "default", "mode": "read", "query": "SELECT 1", "params": {}},
            "params: not a setting of sql tools",
        ),
        ([], "the config must be a JSON object"),
    ],
)
def test_a_bad_config_is_refused_with_what_is_wrong(config, message):
    assert message in errors_of(config)


def test_every_problem_of_a_config_is_named_at_once():
    errors = SqlExecutor().config_errors({"mode": "both", "query": "", "extra": 1})
    assert len(errors) == 4, errors


def test_validate_checks_the_schema_and_every_parameter_of_the_query():
    executor = SqlExecutor()
    tool = sql_tool(
        {
            "database": "default",
            "mode": "read",
            "query": "SELECT 1 WHERE a = %(customer)s AND b = %(since)s",
        }
    )
    errors = executor.validate(tool, {"customer": 42})
    assert "customer: 42 is not of type 'string'" in errors
    assert "query: the parameter %(since)s is not a property of the tool's input schema" in errors
    assert "since: the query's parameter %(since)s has no argument" in errors

    listed = sql_tool(
        {"database": "default", "mode": "read", "query": "SELECT %(customer)s"},
        schema={"type": "object", "properties": {"customer": {}}},
    )
    assert executor.validate(listed, {"customer": ["a", "b"]}) == [
        "customer: a query parameter is a string, number, boolean or null, not list"
    ]


def test_placeholders_become_sqlites_named_style_and_nothing_else_changes():
    query = "SELECT '50%%', %(a)s, %(b_2)s, %(a)s WHERE x LIKE 'y%%'"
    assert query_for_sqlite(query) == "SELECT '50%', :a, :b_2, :a WHERE x LIKE 'y%'"
    assert query_parameters(query) == (["a", "b_2"], [])
