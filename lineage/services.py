"""Writing the trail. Events are made only here: ``event_append`` and
``events_append``, and ``events_insert``, which agentops.runtime.commits puts inside its
one-statement commits. Checking it is lineage.verification's."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, transaction
from django.utils import timezone

from agentops.strict_json import json_storable
from lineage.models import GENESIS_HASH, HASH_CANONICAL, LineageEvent

if TYPE_CHECKING:
    from lineage.verification import ChainReport


def json_plain(value: Any) -> Any:
    """``value`` as it will read back from a JSON column: plain JSON types only
    (decimals, dates and UUIDs become strings). Raises TypeError for anything else."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def json_canonical(value: Any) -> str:
    """The one text of a JSON value that is hashed and kept: keys sorted, no spaces,
    ASCII only, so NUL and unpaired surrogates travel as escapes that any text column
    stores as they are. Raises ValueError for NaN and the infinities (not JSON)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def event_document(
    *, run_uuid: uuid.UUID, seq: int, at: datetime, kind: str, actor: str, payload: Any
) -> dict[str, Any]:
    return {
        "run": str(run_uuid),
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "kind": kind,
        "actor": actor,
        "payload": payload,
    }


def event_canonical(
    *, run_uuid: uuid.UUID, seq: int, at: datetime, kind: str, actor: str, payload: dict
) -> str:
    """Hash version 0's text (events written before migration 0003), rebuilt from the
    columns: kept only to verify those events."""
    document = event_document(
        run_uuid=run_uuid, seq=seq, at=at, kind=kind, actor=actor, payload=payload
    )
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def payload_exact(payload: Any) -> Any:
    """The payload as it is hashed: plain JSON (``json_plain``), exactly. What no JSON
    can hold (NaN, the infinities, an int too long to write) is first made storable
    (``json_storable``), since an event must be written whatever a tool returned."""
    try:
        plain = json_plain(payload)
        json_canonical(plain)
    except ValueError:
        plain = json_plain(json_storable(payload)[0])
    return plain


def event_append(
    *, run_uuid: uuid.UUID, kind: str, actor: str, payload: dict[str, Any] | None = None
) -> LineageEvent:
    """Append one event to the run's chain (see ``events_append``)."""
    return events_append(run_uuid=run_uuid, events=[(kind, actor, payload)])[0]


class ChainMoved(Exception):
    """Another transaction appended to the chain while this one was appending."""


# Each thread's last known chain head per run, (seq, hash): only a hint, which saves the
# read of the head when one worker appends to a run again and again. The INSERT checks it.
_heads = threading.local()
HEADS_KEPT = 1024


def head_hint(connection: Any, run_uuid: uuid.UUID) -> tuple[int, str] | None:
    return _heads.__dict__.get(connection.alias, {}).get(run_uuid)


def head_remember(connection: Any, run_uuid: uuid.UUID, rows: list[LineageEvent]) -> None:
    """After ``rows`` were written: their last is the chain's head, as far as we know."""
    heads = _heads.__dict__.setdefault(connection.alias, {})
    if len(heads) >= HEADS_KEPT:
        heads.clear()
    heads[run_uuid] = (rows[-1].seq, rows[-1].hash)


def events_append(
    *, run_uuid: uuid.UUID, events: list[tuple[str, str, dict[str, Any] | None]]
) -> list[LineageEvent]:
    """Append ``(kind, actor, payload)`` events to the run's chain, in order, in one
    INSERT. The events returned have no primary key.

    The INSERT writes only if the head it builds on is still the chain's last event
    (``rows_insert_after_head``); if not, the head is read again and the append retried
    once. Most callers hold the run's row lock (or SQLite's write lock), so the head
    rarely moves; the unique (run, seq) constraint turns any race into an error, never a
    fork.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise RuntimeError("event_append must run inside the transaction that changes the run")
    head = head_hint(connection, run_uuid)
    for _ in range(2):
        if head is None:
            head = chain_head(run_uuid)
        rows = events_chained(run_uuid, head, events)
        if rows_insert_after_head(connection, run_uuid, head, rows):
            head_remember(connection, run_uuid, rows)
            return rows
        head = None  # the hint was out of date (a rollback, or another writer): read it
    raise ChainMoved(f"the chain of {run_uuid} moved while events were appended to it")


def chain_head(run_uuid: uuid.UUID) -> tuple[int, str]:
    """(seq, hash) of the run's last event; (0, GENESIS_HASH) before the first."""
    head = (
        LineageEvent.objects.filter(run_uuid=run_uuid)
        .order_by("-seq")
        .values_list("seq", "hash")
        .first()
    )
    return head or (0, GENESIS_HASH)


def events_chained(
    run_uuid: uuid.UUID, head: tuple[int, str], events: list[tuple[str, str, dict | None]]
) -> list[LineageEvent]:
    """The events as rows that follow ``head``: numbered, chained, hashed."""
    seq, prev_hash = head
    at = timezone.now()
    rows = []
    for kind, actor, payload in events:
        seq += 1
        body = payload_exact(payload or {})
        canonical = json_canonical(
            event_document(run_uuid=run_uuid, seq=seq, at=at, kind=kind, actor=actor, payload=body)
        )
        digest = event_hash(prev_hash, canonical)
        rows.append(
            LineageEvent(
                run_uuid=run_uuid,
                seq=seq,
                at=at,
                kind=kind,
                actor=actor,
                # Only a copy for queries: jsonb may rewrite numbers, and neither
                # database's JSON holds every string. The canonical text is the record.
                payload=json_storable(body)[0],
                prev_hash=prev_hash,
                hash=digest,
                canonical=canonical,
                hash_version=HASH_CANONICAL,
            )
        )
        prev_hash = digest
    return rows


# Raw SQL, because the ORM has no conditional multi-row INSERT: the append checks the
# head it builds on in the same statement that writes.

COLUMNS = (
    "run_uuid",
    "seq",
    "at",
    "kind",
    "actor",
    "payload",
    "prev_hash",
    "hash",
    "canonical",
    "hash_version",
)


def rows_insert(
    connection: Any, objs: list[models.Model], names: tuple[str, ...], condition: SQL
) -> SQL:
    """``INSERT INTO table (names) SELECT ... WHERE condition`` for unsaved model
    instances, each value as its field makes it for saving (``pre_save``).

    On PostgreSQL the rows travel as one jsonb parameter, read back by the table's own
    row type (``jsonb_populate_recordset``): the statement's text is the same for any
    number of rows, so the driver caches it, a prepared statement
    (agentops.runtime.commits) is planned once, and every value keeps its column's type
    and limits. SQLite takes a VALUES list."""
    model = type(objs[0])
    fields = [model._meta.get_field(name) for name in names]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    table = quote(model._meta.db_table)
    if connection.vendor == "postgresql":
        # JSON null is SQL NULL there, as the ORM saves None in a nullable JSON field.
        rows = [{f.column: f.pre_save(obj, True) for f in fields} for obj in objs]
        source = f"jsonb_populate_recordset(NULL::{table}, CAST(%s AS jsonb))"
        params: list[Any] = [json.dumps(rows, default=json_scalar)]
        select = f"SELECT {columns} FROM {source} AS new_rows"
    else:
        row = "(" + ", ".join("%s" for _ in fields) + ")"
        params = []
        for obj in objs:
            params.extend(f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields)
        select = f"SELECT * FROM (VALUES {', '.join(row for _ in objs)}) AS new_rows"
    return SQL(
        f"INSERT INTO {table} ({columns}) {select} WHERE {condition.sql}",
        params + condition.params,
    )


def json_scalar(value: Any) -> Any:
    """What json.dumps cannot write itself: times in full (DjangoJSONEncoder would cut
    them to milliseconds, and an event's hash covers its microseconds), UUIDs, decimals."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def head_guard(connection: Any, run_uuid: uuid.UUID, head: tuple[int, str]) -> SQL:
    """A condition true only while ``head`` is the chain's last event (no event after
    it, and it exists as remembered, unless it is the genesis)."""
    quote = connection.ops.quote_name
    table = quote(LineageEvent._meta.db_table)
    run_column, seq_column, hash_column = quote("run_uuid"), quote("seq"), quote("hash")
    run_param = LineageEvent._meta.get_field("run_uuid").get_db_prep_save(run_uuid, connection)
    seq, last_hash = head
    sql = f"NOT EXISTS (SELECT 1 FROM {table} WHERE {run_column} = %s AND {seq_column} > %s)"
    params = [run_param, seq]
    if seq:
        sql += (
            f" AND EXISTS (SELECT 1 FROM {table} WHERE {run_column} = %s"
            f" AND {seq_column} = %s AND {hash_column} = %s)"
        )
        params += [run_param, seq, last_hash]
    return SQL(sql, params)


def events_insert(connection: Any, rows: list[LineageEvent], condition: SQL) -> SQL:
    """``INSERT`` of the rows, made only where ``condition`` holds."""
    return rows_insert(connection, rows, COLUMNS, condition)


def rows_insert_after_head(
    connection: Any, run_uuid: uuid.UUID, head: tuple[int, str], rows: list[LineageEvent]
) -> bool:
    """INSERT the rows only if ``head`` is still the chain's last event, checked in the
    same statement (so a stale hint can neither fork the chain nor leave a gap); False,
    and nothing written, if it is not."""
    statement = events_insert(connection, rows, head_guard(connection, run_uuid, head))
    with connection.cursor() as cursor:
        cursor.execute(statement.sql, statement.params)
        return cursor.rowcount == len(rows)


@dataclass(frozen=True)
class SQL:
    """A statement or a fragment of one, with its parameters."""

    sql: str
    params: list[Any]


def chain_verify(run_uuid: uuid.UUID) -> ChainReport:
    """The run's chain, every event recomputed from its stored text and checked
    against the latest signed checkpoint (lineage.verification)."""
    from lineage.verification import run_verify

    return run_verify(run_uuid=run_uuid)
