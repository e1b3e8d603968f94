"""The bundled sample helpdesk: customers, the tickets the support agent files and the
replies it sends, in a SQLite file of its own (``demo.store``)."""

from __future__ import annotations

from pathlib import Path

from demo.store import store_create, store_path

TICKETS_DIR = Path(__file__).resolve().parent / "data" / "tickets"
SUPPORT_ADDRESS = "support@helpdesk.example"

CATEGORIES = ("billing", "bug", "account", "how_to", "feature_request")
PRIORITIES = ("urgent", "high", "normal", "low")
PLANS = ("free", "pro", "enterprise")

CUSTOMERS = [
    # email, name, company, plan
    ("dana@example.com", "Dana Whitfield", "Birch & Co", "pro"),
    ("raj@example.org", "Raj Patel", "Cobalt Labs", "enterprise"),
    ("li@example.net", "Li Wei", "Ember Foods", "free"),
    ("sam@example.com", "Sam Okafor", "Fjord Media", "pro"),
    ("ana@example.org", "Ana Costa", "Granite Ltd", "free"),
]

SCHEMA = """
CREATE TABLE customer (email TEXT PRIMARY KEY, name TEXT NOT NULL, company TEXT NOT NULL,
                       plan TEXT NOT NULL);
CREATE TABLE ticket (id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL,
                     subject TEXT NOT NULL, category TEXT NOT NULL, priority TEXT NOT NULL,
                     run_id TEXT NOT NULL, filed_at TEXT NOT NULL DEFAULT (datetime('now')));
CREATE TABLE reply (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT NOT NULL,
                    recipient TEXT NOT NULL, body TEXT NOT NULL, run_id TEXT NOT NULL,
                    sent_at TEXT NOT NULL DEFAULT (datetime('now')));
-- Ticket numbers start at T-1001, as a helpdesk's do.
INSERT INTO sqlite_sequence (name, seq) VALUES ('ticket', 1000);
"""


def helpdesk_path() -> Path:
    return store_path("helpdesk")


def helpdesk_create(path: Path | None = None) -> Path:
    """(Re)build the sample helpdesk: the customers, no tickets, no replies."""
    return store_create(path or helpdesk_path(), SCHEMA, {"customer": CUSTOMERS})


def ticket_files() -> dict[str, Path]:
    """The bundled sample tickets, by name (the file's name without .eml)."""
    return {path.stem: path for path in sorted(TICKETS_DIR.glob("*.eml"))}


def ticket_label(number: int) -> str:
    return f"T-{number}"
