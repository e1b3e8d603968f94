"""The demo's sample systems (the helpdesk, the CRM) are SQLite files apart from
agentops' own database, as a customer's systems would be, each beside the invoice
ledger (``settings.AGENTOPS_DEMO_LEDGER``) so a test run's files stay its own.

Every write a tool makes is keyed by the engine's idempotency key (``ToolContext``): a
``write_log`` row, inserted in the same transaction as the write, remembers what the
key did, so a call repeated with the same key (a worker that crashed after the call,
before recording it) answers what it did the first time and changes nothing more.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

WRITE_LOG_SQL = """
CREATE TABLE write_log (key TEXT PRIMARY KEY, tool TEXT NOT NULL, result TEXT NOT NULL,
                        at TEXT NOT NULL DEFAULT (datetime('now')));
"""


def store_path(system: str) -> Path:
    """``demo_<system>.sqlite3`` beside the ledger, keeping the ledger file's suffix
    (the test settings name the ledger per test process: demo_ledger-1234.sqlite3)."""
    ledger = Path(settings.AGENTOPS_DEMO_LEDGER)
    name = ledger.name.replace("ledger", system) if "ledger" in ledger.name else ""
    return ledger.with_name(name or f"demo_{system}.sqlite3")


def store_create(path: Path, schema: str, rows: dict[str, list[tuple]]) -> Path:
    """(Re)build a sample store: ``schema`` (with the write log added), then ``rows``
    by table name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        with db:
            db.executescript(schema + WRITE_LOG_SQL)
            for table, values in rows.items():
                if values:
                    marks = ", ".join("?" for _ in values[0])
                    db.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    finally:
        db.close()
    return path


@contextmanager
def store_open(path: Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to a sample store: read-only unless ``write``; a missing store says
    how to make it."""
    if not path.exists():
        raise FileNotFoundError(f"the demo store {path} is missing: run `manage.py load_demo`")
    mode = "rw" if write else "ro"
    db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def store_query(path: Path, sql: str, params: tuple = ()) -> list[dict]:
    with store_open(path) as db:
        return [dict(row) for row in db.execute(sql, params)]


def write_once(
    path: Path, *, key: str, tool: str, write: Callable[[sqlite3.Connection], dict]
) -> dict:
    """Run ``write`` and log its result under ``key``, in one transaction; a key logged
    before answers its first result and ``write`` is not run again."""
    with store_open(path, write=True) as db:
        # BEGIN IMMEDIATE: two calls with one key (a retry racing a stuck first try)
        # take turns, and the second finds the first's log row.
        db.isolation_level = None
        db.execute("BEGIN IMMEDIATE")
        try:
            done = db.execute("SELECT result FROM write_log WHERE key = ?", (key,)).fetchone()
            if done is not None:
                db.execute("ROLLBACK")
                return json.loads(done["result"])
            result = write(db)
            db.execute(
                "INSERT INTO write_log (key, tool, result) VALUES (?, ?, ?)",
                (key, tool, json.dumps(result)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result
