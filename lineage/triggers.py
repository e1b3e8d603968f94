"""Database triggers that make lineage_lineageevent append-only.

Kept as functions so the migration installs them and the test suite can lift them for
the one thing that must delete rows: flushing the test database between transactional
tests.
"""

from __future__ import annotations

from django.db.backends.base.base import BaseDatabaseWrapper

TABLE = "lineage_lineageevent"
MESSAGE = "lineage events are append-only: UPDATE and DELETE are refused"
REPLACE_MESSAGE = (
    "lineage events are append-only: an INSERT that would replace an event (REPLACE,"
    " UPSERT, a reused id, run and seq, or hash) is refused"
)

SQLITE_INSTALL = [
    f"""CREATE TRIGGER IF NOT EXISTS lineage_event_no_update BEFORE UPDATE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS lineage_event_no_delete BEFORE DELETE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END""",
    # INSERT OR REPLACE deletes the row it collides with without firing DELETE triggers
    # (unless recursive_triggers is on), and an UPSERT's DO UPDATE is an update by
    # another name: refuse any insert that collides, before the conflict is resolved.
    f"""CREATE TRIGGER IF NOT EXISTS lineage_event_no_replace BEFORE INSERT ON {TABLE}
        WHEN EXISTS (SELECT 1 FROM {TABLE} WHERE id = NEW.id)
          OR EXISTS (SELECT 1 FROM {TABLE} WHERE run_uuid = NEW.run_uuid AND seq = NEW.seq)
          OR EXISTS (SELECT 1 FROM {TABLE} WHERE hash = NEW.hash)
        BEGIN SELECT RAISE(ABORT, '{REPLACE_MESSAGE}'); END""",
]
SQLITE_REMOVE = [
    "DROP TRIGGER IF EXISTS lineage_event_no_update",
    "DROP TRIGGER IF EXISTS lineage_event_no_delete",
    "DROP TRIGGER IF EXISTS lineage_event_no_replace",
]

POSTGRES_INSTALL = [
    f"""CREATE OR REPLACE FUNCTION lineage_event_refuse_change() RETURNS trigger AS $$
        BEGIN RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'restrict_violation'; END;
        $$ LANGUAGE plpgsql""",
    f"""CREATE OR REPLACE TRIGGER lineage_event_no_change BEFORE UPDATE OR DELETE ON {TABLE}
        FOR EACH ROW EXECUTE FUNCTION lineage_event_refuse_change()""",
    f"""CREATE OR REPLACE TRIGGER lineage_event_no_truncate BEFORE TRUNCATE ON {TABLE}
        FOR EACH STATEMENT EXECUTE FUNCTION lineage_event_refuse_change()""",
]
POSTGRES_REMOVE = [
    f"DROP TRIGGER IF EXISTS lineage_event_no_change ON {TABLE}",
    f"DROP TRIGGER IF EXISTS lineage_event_no_truncate ON {TABLE}",
]


def _statements(connection: BaseDatabaseWrapper, *, install: bool) -> list[str]:
    if connection.vendor == "sqlite":
        return SQLITE_INSTALL if install else SQLITE_REMOVE
    if connection.vendor == "postgresql":
        return POSTGRES_INSTALL if install else POSTGRES_REMOVE
    raise NotImplementedError(
        f"append-only triggers are written for SQLite and PostgreSQL, not {connection.vendor}"
    )


def triggers_install(connection: BaseDatabaseWrapper) -> None:
    with connection.cursor() as cursor:
        for statement in _statements(connection, install=True):
            cursor.execute(statement)


def triggers_remove(connection: BaseDatabaseWrapper) -> None:
    with connection.cursor() as cursor:
        for statement in _statements(connection, install=False):
            cursor.execute(statement)
