"""The SQL tool's guard that keeps agents off agentops' own database compares identities,
not spellings: every way of writing the suite's own database (another loopback name, a
Unix socket, this machine's own address; on SQLite a hard link or a symlink to the file)
is refused when the tool is saved and when it is called, and the call never reaches the
database. The suite allows its own database to the SQL tests (AGENTOPS_SQL_OWN_DATABASE);
here the guard is on, as in production."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from django.db import connection

from agentops.runtime.tools import ToolError, executor_for_kind
from agentops.runtime.tools.sql import (
    SqlCall,
    Target,
    own_database,
    postgres_run,
    url_resolve,
)
from tests.runtime.tools.test_sql import (
    CONTEXT,
    INVOICES,
    NO_ARGUMENTS,
    TABLE,
    sql_tool,
    suite_db,
    suite_ledger,  # noqa: F401 (a fixture: the suite's invoice table)
    suite_rows,
)

REFUSAL = "is agentops' own database"
postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="a PostgreSQL spelling: run with DATABASE_URL"
)
sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="a SQLite file's identity")


@pytest.fixture(autouse=True)
def guard_on(settings):
    settings.AGENTOPS_SQL_OWN_DATABASE = False


def own_entry() -> dict:
    return connection.settings_dict


def this_machines_address() -> str | None:
    """An address of this machine that is not a loopback one (the one its route out
    uses), or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: UDP only picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def postgres_url(host: str, *, port: str | None = None, password: bool = True) -> str:
    entry = own_entry()
    port = port if port is not None else str(entry["PORT"] or 5432)
    secret = ":{secret:SQLTOOL_PASSWORD}" if password and entry["PASSWORD"] else ""
    netloc = f"{entry['USER']}{secret}@{host}" + (f":{port}" if port else "")
    return f"postgres://{netloc}/{entry['NAME']}"


def write_tool(url: str):
    # The write the issue saw: a tool that reaches the own database could lift the
    # lineage triggers. Here it would empty the suite's table; it must never run.
    return sql_tool(
        {"url": url, "mode": "write", "query": f"DELETE FROM {TABLE}"},
        schema=NO_ARGUMENTS,
        side_effect="irreversible",
    )


def assert_refused_and_untouched(url: str, monkeypatch) -> None:
    monkeypatch.setenv("SQLTOOL_PASSWORD", own_entry()["PASSWORD"] or "unused")
    executor = executor_for_kind("sql")
    tool = write_tool(url)
    errors = executor.config_errors(tool.config)
    assert any(REFUSAL in error for error in errors), errors
    result = executor.execute(tool, {}, CONTEXT)
    assert not result.ok and REFUSAL in result.error
    assert len(suite_rows(f"SELECT * FROM {TABLE}")) == len(INVOICES)


# PostgreSQL ---------------------------------------------------------------------------


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
@pytest.mark.parametrize(
    "host",
    ["localhost", "127.1", "127.0.0.1", "LOCALHOST", "[::ffff:127.0.0.1]", "0.0.0.0"],
)
def test_a_loopback_spelling_of_the_own_database_is_refused(monkeypatch, host):
    assert_refused_and_untouched(postgres_url(host), monkeypatch)


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
@pytest.mark.parametrize(
    "url",
    [
        # No host: libpq's default Unix socket directory.
        "postgres://{user}@:{port}/{name}",
        "postgres:///{name}",
        # A socket directory as the host, percent-encoded in the URL.
        "postgresql://{user}@%2Fvar%2Frun%2Fpostgresql:{port}/{name}",
        "postgresql://{user}@%2Ftmp/{name}",
    ],
)
def test_a_unix_socket_spelling_of_the_own_database_is_refused(monkeypatch, url):
    entry = own_entry()
    if (entry["PORT"] or "5432") != "5432" and "{port}" not in url:
        pytest.skip("the spelling leaves the port to libpq's default")
    url = url.format(user=entry["USER"], port=entry["PORT"] or 5432, name=entry["NAME"])
    assert_refused_and_untouched(url, monkeypatch)


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
def test_this_machines_own_address_is_the_own_database_too(monkeypatch):
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no address but loopback ones")
    assert_refused_and_untouched(postgres_url(address), monkeypatch)


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
def test_a_host_query_parameter_cannot_move_the_tool_to_the_own_database(monkeypatch):
    entry = own_entry()
    url = f"postgres://{entry['USER']}@elsewhere.invalid/{entry['NAME']}?host=127.0.0.1"
    errors = executor_for_kind("sql").config_errors(
        {"url": url, "mode": "read", "query": "SELECT 1"}
    )
    assert any("the query may not set host" in error for error in errors), errors


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
def test_the_own_database_behind_a_secret_is_refused_at_call_time(monkeypatch):
    monkeypatch.setenv("SQLTOOL_URL", postgres_url("localhost", password=False))
    tool = write_tool("secret:SQLTOOL_URL")
    executor = executor_for_kind("sql")
    assert executor.config_errors(tool.config) == []  # nothing to check until it is read
    result = executor.execute(tool, {}, CONTEXT)
    assert not result.ok and REFUSAL in result.error
    assert len(suite_rows(f"SELECT * FROM {TABLE}")) == len(INVOICES)


@postgres_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
@pytest.mark.parametrize("options", [{}, {"options": "-c TimeZone=Asia/Tokyo"}])
def test_the_server_is_asked_who_it_is_before_the_statement_is_sent(options):
    # Whatever a name resolved to when it was checked, the server that answers says who
    # it is: a connection that reached the own database runs nothing. (In another time
    # zone too: the answer must not depend on the session's settings.)
    entry = {**own_entry(), "OPTIONS": {**own_entry().get("OPTIONS", {}), **options}}
    target = Target("postgresql", entry, "the database under test")
    call = SqlCall(query=f"DELETE FROM {TABLE}", parameters={}, read=False, row_limit=1, timeout=5)
    with pytest.raises(ToolError, match=REFUSAL):
        postgres_run(target, call)
    assert len(suite_rows(f"SELECT * FROM {TABLE}")) == len(INVOICES)


@postgres_only
@pytest.mark.django_db
def test_another_database_on_the_same_server_is_not_the_own_one():
    entry = {**own_entry(), "HOST": "localhost", "NAME": "some_other_database"}
    assert not own_database(entry)
    assert not own_database({**own_entry(), "PORT": "5999"})


@postgres_only
@pytest.mark.django_db
def test_the_own_database_allowed_by_the_test_settings_hatch_only(settings):
    assert own_database({**own_entry(), "HOST": "localhost"})
    settings.AGENTOPS_SQL_OWN_DATABASE = True
    assert not own_database({**own_entry(), "HOST": "localhost"})


# SQLite -------------------------------------------------------------------------------


@sqlite_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_a_link_to_the_own_sqlite_file_is_refused(monkeypatch, tmp_path, link):
    own = Path(own_entry()["NAME"])
    other = tmp_path / "innocent.sqlite3"
    try:
        if link == "hard":
            os.link(own, other)
        else:
            other.symlink_to(own)
    except OSError as error:  # another file system: no hard link can be made
        pytest.skip(f"cannot link to the suite's database here: {error}")
    assert (other.stat().st_ino, other.stat().st_dev) == (own.stat().st_ino, own.stat().st_dev)
    assert_refused_and_untouched(f"sqlite:///{other}", monkeypatch)


@sqlite_only
@suite_db
@pytest.mark.usefixtures("suite_ledger")
def test_a_linked_own_sqlite_file_behind_a_secret_is_refused_at_call_time(monkeypatch, tmp_path):
    other = tmp_path / "innocent.sqlite3"
    try:
        os.link(own_entry()["NAME"], other)
    except OSError as error:
        pytest.skip(f"cannot link to the suite's database here: {error}")
    monkeypatch.setenv("SQLTOOL_LEDGER_PATH", str(other))
    tool = write_tool("sqlite:///{secret:SQLTOOL_LEDGER_PATH}")
    result = executor_for_kind("sql").execute(tool, {}, CONTEXT)
    assert not result.ok and REFUSAL in result.error
    assert len(suite_rows(f"SELECT * FROM {TABLE}")) == len(INVOICES)


@sqlite_only
@pytest.mark.django_db
def test_a_different_sqlite_file_is_not_the_own_one(tmp_path):
    other = tmp_path / "ledger.sqlite3"
    other.write_bytes(Path(own_entry()["NAME"]).read_bytes())  # a copy, not a link
    entry = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(other)}
    assert not own_database(entry)
    assert url_resolve(f"sqlite:///{other}") == f"sqlite:///{other}"
