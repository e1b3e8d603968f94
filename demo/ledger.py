"""The bundled sample ledger: a small SQLite database of invoices and payments, apart
from agentops' own database, as a customer's system would be."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from django.conf import settings

INVOICES = [
    # number, customer, amount in cents, batch
    ("INV-1001", "Acme Tools", 125_000, "2026-11"),
    ("INV-1002", "Birch & Co", 48_050, "2026-11"),
    ("INV-1003", "Cobalt Labs", 310_000, "2026-11"),
    ("INV-1004", "Dune Freight", 72_500, "2026-11"),
    ("INV-1005", "Ember Foods", 15_990, "2026-11"),
    ("INV-1006", "Fjord Media", 99_900, "2026-11"),
    ("INV-1007", "Granite Ltd", 260_000, "2026-11"),
    ("INV-1008", "Harbor Health", 54_320, "2026-11"),
    ("INV-0901", "Acme Tools", 110_000, "2026-10"),
    ("INV-0902", "Birch & Co", 47_000, "2026-10"),
]

PAYMENTS = [
    # reference, invoice number, amount in cents
    ("PAY-5001", "INV-1001", 125_000),
    ("PAY-5002", "INV-1002", 48_050),
    ("PAY-5003", "INV-1003", 300_000),  # short by 100.00
    ("PAY-5004", "INV-1004", 72_500),
    ("PAY-5005", "INV-1006", 99_900),
    ("PAY-5006", "INV-1006", 99_900),  # paid twice
    ("PAY-5007", "INV-1007", 260_000),
    ("PAY-5008", "INV-1008", 54_320),
    ("PAY-4901", "INV-0901", 110_000),
    ("PAY-4902", "INV-0902", 47_000),
]


def ledger_path() -> Path:
    return Path(settings.AGENTOPS_DEMO_LEDGER)


def ledger_create(path: Path | None = None) -> Path:
    """(Re)build the sample ledger from the data above."""
    path = path or ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE invoice (number TEXT PRIMARY KEY, customer TEXT NOT NULL,
                                  amount_cents INTEGER NOT NULL, batch TEXT NOT NULL);
            CREATE TABLE payment (reference TEXT PRIMARY KEY, invoice TEXT NOT NULL,
                                  amount_cents INTEGER NOT NULL);
            """
        )
        db.executemany("INSERT INTO invoice VALUES (?, ?, ?, ?)", INVOICES)
        db.executemany("INSERT INTO payment VALUES (?, ?, ?)", PAYMENTS)
    db.close()
    return path


def ledger_query(sql: str, params: tuple) -> list[dict]:
    """Read the ledger through a read-only connection: the demo's tools cannot change it."""
    path = ledger_path()
    if not path.exists():
        raise FileNotFoundError(f"the demo ledger {path} is missing: run `manage.py load_demo`")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params)]
    finally:
        db.close()
