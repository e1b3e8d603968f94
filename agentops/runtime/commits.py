"""The engine's most frequent commits, each as one statement, on PostgreSQL.

A model turn (with its started call, when one runs at once), a call started by itself,
and a call's outcome are nearly all that a run commits. As a transaction each is a
BEGIN, three statements and a COMMIT: five round trips to the server. Here each is one
statement that commits by itself: its parts are data-modifying CTEs, all gated on the
first, the fence, so it writes everything or nothing, and its commit is flushed to disk
like any other.

The fence is the engine's (``engine.fence``: this worker still holds the running run's
lease) plus the lineage chain's head, which this thread remembers from its last append
(``lineage.services.head_hint``): the events written here follow that head, so it must
still be the last. When any part's check fails (the lease is gone, the head moved, the
step is no longer ``started``) the statement writes nothing, and the engine takes its
ordinary path, a transaction that tells those cases apart. So do SQLite (its round trips
are function calls) and a thread with no head in memory.

Raw SQL, because the ORM cannot gate one write on another in one statement. The columns
come from the models, and every value from its field (``lineage.services.rows_insert``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.models import Field, Model

from lineage.services import (
    SQL,
    events_chained,
    events_insert,
    head_guard,
    head_hint,
    head_remember,
    rows_insert,
)
from tasks.models import Run, RunStatus, Step, StepStatus

STEP_COLUMNS = tuple(f.name for f in Step._meta.concrete_fields if not f.primary_key)
LENGTH = re.compile(r"\([0-9, ]+\)")


def database() -> Any:
    """The engine's database connection, if this module serves it (PostgreSQL)."""
    db = connections[DEFAULT_DB_ALIAS]
    return db if db.vendor == "postgresql" else None


class PreparedCursor(ServerBindingCursor):
    """Django's server-binding cursor, preparing every statement it runs: the two
    statements here run at every step, and a plan made once saves the server planning
    them each time. Django's own cursors stay as Django makes them: parameters merged
    by the driver, nothing prepared."""

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None, **kw: Any):
        return super().execute(query, params, prepare=True if prepare is None else prepare, **kw)


@contextmanager
def statement_cursor(db: Any) -> Iterator[Any]:
    """A cursor for the statements here, wrapped as Django wraps its own (errors, query
    logging, execute wrappers). DATABASE_URL's ``prepare_threshold``, when given, rules
    instead: ``none`` for a connection pooler that cannot keep prepared statements."""
    db.ensure_connection()
    db.validate_thread_sharing()
    prepares = "prepare_threshold" not in db.settings_dict["OPTIONS"]
    if prepares and db.connection.prepare_threshold is None:
        # psycopg prepares nothing while the threshold is None, even when asked: make it
        # out of reach instead, so that only statements that ask are prepared.
        db.connection.prepare_threshold = 2**31 - 1
    with db.wrap_database_errors:
        raw = (PreparedCursor if prepares else ServerBindingCursor)(db.connection)
    cursor = db.make_debug_cursor(raw) if db.queries_logged else db.make_cursor(raw)
    with cursor:
        yield cursor


def assignments(db: Any, model: type[Model], values: dict[str, Any], added: dict[str, Any]) -> SQL:
    """``column = %s, ...`` for ``values`` and ``column = column + %s, ...`` for
    ``added``, each value prepared by its field."""
    sql = assignments_sql(db.alias, model, tuple(values), tuple(added))
    params = [
        model._meta.get_field(name).get_db_prep_save(value, db)
        for name, value in (*values.items(), *added.items())
    ]
    return SQL(sql, params)


def typed_slot(db: Any, field: Field) -> str:
    """``%s`` cast to the field's column type without its length: a cast to varchar(n)
    would cut a long value short instead of refusing it."""
    return f"CAST(%s AS {LENGTH.sub('', field.db_type(db))})"


@functools.cache
def assignments_sql(
    alias: str, model: type[Model], set_names: tuple[str, ...], add_names: tuple[str, ...]
) -> str:
    db = connections[alias]
    quote = db.ops.quote_name
    parts = []
    for name in set_names:
        field = model._meta.get_field(name)
        parts.append(f"{quote(field.column)} = {typed_slot(db, field)}")
    for name in add_names:
        field = model._meta.get_field(name)
        column = quote(field.column)
        parts.append(f"{column} = {column} + {typed_slot(db, field)}")
    return ", ".join(parts)


def fenceable(run: Run) -> tuple[Any, tuple[int, str]] | None:
    """The connection and the chain's head a one-statement commit needs: None on
    SQLite, or when this thread has not appended to the run's chain yet."""
    db = database()
    head = head_hint(db, run.pk) if db else None
    return None if head is None else (db, head)


def fence_cte(
    db: Any,
    run: Run,
    owner: str,
    head: tuple[int, str],
    *,
    lease_expires_at: Any,
    added: dict[str, Any],
    also: SQL | None = None,
) -> SQL:
    """``fence AS (UPDATE run ... RETURNING 1)``, renewing the lease and adding
    ``added`` to the run's counters: one row if this worker still holds the running run,
    ``head`` is still its chain's last event, and ``also`` holds (what the statement's
    other parts need); none otherwise. Every other part is gated on it, so the statement
    writes all of its parts or none."""
    changes = assignments(db, Run, {"lease_expires_at": lease_expires_at}, added)
    quote = db.ops.quote_name
    guard = head_guard(db, run.pk, head)
    also = also or SQL("TRUE", [])
    pk = Run._meta.pk.get_db_prep_save(run.pk, db)
    return SQL(
        f"fence AS (UPDATE {quote(Run._meta.db_table)} SET {changes.sql}"
        f" WHERE {quote('id')} = %s AND {quote('status')} = %s"
        f" AND {quote('lease_owner')} = %s AND {guard.sql} AND {also.sql} RETURNING 1)",
        [*changes.params, pk, RunStatus.RUNNING, owner, *guard.params, *also.params],
    )


def statement_run(db: Any, cursor: Any, statement: str, params: list[Any]) -> bool:
    """Run a one-statement commit; False if it broke a unique constraint, which writes
    nothing. That happens only if another transaction appended to the chain after this
    statement's snapshot was taken and before it inserted (it read the head before
    waiting for the run's row lock): the transaction path reads the head afresh. Inside
    a transaction (the tests' own) the error stands, as it would have aborted it."""
    try:
        cursor.execute(statement, params)
    except IntegrityError:
        if db.in_atomic_block:
            raise
        return False
    return True


def steps_insert_commit(
    *,
    run: Run,
    owner: str,
    lease_expires_at: Any,
    added: dict[str, Any],
    steps: list[Step],
    events: list[tuple[str, str, dict[str, Any]]],
) -> bool:
    """Fence the run (renew the lease, add to its counters), insert the new steps and
    their events: one statement. True if it was written, and the steps have their ids;
    False if a check failed and nothing was written."""
    fenced_by = fenceable(run)
    if fenced_by is None:
        return False
    db, head = fenced_by
    quote = db.ops.quote_name
    rows = events_chained(run.pk, head, events)
    fence = fence_cte(db, run, owner, head, lease_expires_at=lease_expires_at, added=added)
    fenced = SQL("EXISTS (SELECT 1 FROM fence)", [])
    new_steps = rows_insert(db, steps, STEP_COLUMNS, fenced)
    new_events = events_insert(db, rows, fenced)
    statement = (
        f"WITH {fence.sql}, "
        f"new_steps AS ({new_steps.sql} RETURNING {quote('id')}, {quote('number')}), "
        f"new_events AS ({new_events.sql}) "
        f"SELECT {quote('id')}, {quote('number')} FROM new_steps"
    )
    with statement_cursor(db) as cursor:
        if not statement_run(
            db, cursor, statement, [*fence.params, *new_steps.params, *new_events.params]
        ):
            return False
        written = {number: pk for pk, number in cursor.fetchall()}
    if not written:
        return False
    for step in steps:
        step.pk = written[step.number]
    head_remember(db, run.pk, rows)
    return True


def outcome_commit(
    *,
    run: Run,
    owner: str,
    lease_expires_at: Any,
    added: dict[str, Any],
    step: Step,
    to: str,
    fields: dict[str, Any],
    event: tuple[str, str, dict[str, Any]],
) -> bool:
    """Fence the run, move the ``started`` step to ``to`` with ``fields``, append its
    event: one statement. True if it was written; False if a check failed (the lease,
    the chain's head, or the step no longer ``started``) and nothing was written."""
    fenced_by = fenceable(run)
    if fenced_by is None or step.status != StepStatus.STARTED:
        return False
    db, head = fenced_by
    quote = db.ops.quote_name
    rows = events_chained(run.pk, head, [event])
    pk = Step._meta.pk.get_db_prep_save(step.pk, db)
    table = quote(Step._meta.db_table)
    started = SQL(
        f"EXISTS (SELECT 1 FROM {table} WHERE {quote('id')} = %s AND {quote('status')} = %s)",
        [pk, StepStatus.STARTED],
    )
    fence = fence_cte(
        db, run, owner, head, lease_expires_at=lease_expires_at, added=added, also=started
    )
    moves = assignments(db, Step, {"status": to, **fields}, {})
    new_events = events_insert(db, rows, SQL("EXISTS (SELECT 1 FROM moved)", []))
    statement = (
        f"WITH {fence.sql}, "
        f"moved AS (UPDATE {table} SET {moves.sql}"
        f" WHERE {quote('id')} = %s AND {quote('status')} = %s"
        f" AND EXISTS (SELECT 1 FROM fence) RETURNING 1), "
        f"new_events AS ({new_events.sql}) "
        f"SELECT count(*) FROM moved"
    )
    params = [*fence.params, *moves.params, pk, StepStatus.STARTED, *new_events.params]
    with statement_cursor(db) as cursor:
        if not statement_run(db, cursor, statement, params):
            return False
        (moved,) = cursor.fetchone()
    if moved != 1:
        return False
    head_remember(db, run.pk, rows)
    return True
