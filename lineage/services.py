"""Writing and checking the trail. ``event_append`` is the only way events are made."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from lineage.models import GENESIS_HASH, LineageEvent


def json_plain(value: Any) -> Any:
    """``value`` as it will read back from a JSON column: plain JSON types only
    (decimals, dates and UUIDs become strings). Raises TypeError for anything else."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def event_canonical(
    *, run_uuid: uuid.UUID, seq: int, at: datetime, kind: str, actor: str, payload: dict
) -> str:
    document = {
        "run": str(run_uuid),
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "kind": kind,
        "actor": actor,
        "payload": payload,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


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


def events_append(
    *, run_uuid: uuid.UUID, events: list[tuple[str, str, dict[str, Any] | None]]
) -> list[LineageEvent]:
    """Append ``(kind, actor, payload)`` events to the run's chain, in order, in one
    INSERT. The events returned have no primary key.

    Callers hold the run's row lock (or SQLite's write lock) inside the transaction that
    changes the run, so the chain's head cannot move under them; the unique (run, seq)
    constraint turns any slip into an error instead of a fork.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise RuntimeError("event_append must run inside the transaction that changes the run")
    heads = _heads.__dict__.setdefault(connection.alias, {})
    head = heads.get(run_uuid)
    for _ in range(2):
        if head is None:
            head = chain_head(run_uuid)
        rows = events_chained(run_uuid, head, events)
        if rows_insert_after_head(connection, run_uuid, head, rows):
            if len(heads) >= HEADS_KEPT:
                heads.clear()
            heads[run_uuid] = (rows[-1].seq, rows[-1].hash)
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
    seq, prev_hash = head
    at = timezone.now()
    rows = []
    for kind, actor, payload in events:
        seq += 1
        body = json_plain(payload or {})
        canonical = event_canonical(
            run_uuid=run_uuid, seq=seq, at=at, kind=kind, actor=actor, payload=body
        )
        digest = event_hash(prev_hash, canonical)
        rows.append(
            LineageEvent(
                run_uuid=run_uuid,
                seq=seq,
                at=at,
                kind=kind,
                actor=actor,
                payload=body,
                prev_hash=prev_hash,
                hash=digest,
            )
        )
        prev_hash = digest
    return rows


COLUMNS = ("run_uuid", "seq", "at", "kind", "actor", "payload", "prev_hash", "hash")


def rows_insert_after_head(
    connection: Any, run_uuid: uuid.UUID, head: tuple[int, str], rows: list[LineageEvent]
) -> bool:
    """INSERT the rows only if ``head`` is still the chain's last event, checked in the
    same statement (so a stale hint can neither fork the chain nor leave a gap); False,
    and nothing written, if it is not. Raw SQL, because the ORM has no conditional
    multi-row INSERT."""
    meta = LineageEvent._meta
    fields = [meta.get_field(name) for name in COLUMNS]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    if connection.vendor == "postgresql":
        # VALUES in a SELECT has no column types to infer from: name them.
        slot = "(" + ", ".join(f"CAST(%s AS {f.db_type(connection)})" for f in fields) + ")"
    else:
        slot = "(" + ", ".join("%s" for _ in fields) + ")"
    params: list[Any] = []
    for row in rows:
        params.extend(f.get_db_prep_save(getattr(row, f.attname), connection) for f in fields)
    run_column, seq_column, hash_column = quote("run_uuid"), quote("seq"), quote("hash")
    run_param = fields[0].get_db_prep_save(run_uuid, connection)
    seq, last_hash = head
    guard = f"NOT EXISTS (SELECT 1 FROM {table} WHERE {run_column} = %s AND {seq_column} > %s)"
    params.extend([run_param, seq])
    if seq:
        guard += (
            f" AND EXISTS (SELECT 1 FROM {table} WHERE {run_column} = %s"
            f" AND {seq_column} = %s AND {hash_column} = %s)"
        )
        params.extend([run_param, seq, last_hash])
    sql = (
        f"INSERT INTO {table} ({', '.join(quote(c) for c in COLUMNS)}) "
        f"SELECT * FROM (VALUES {', '.join(slot for _ in rows)}) AS new_events WHERE {guard}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount == len(rows)


@dataclass(frozen=True)
class ChainReport:
    run_uuid: uuid.UUID
    events: int
    broken_event_id: int | None = None
    broken_seq: int | None = None
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_event_id is None


def chain_verify(run_uuid: uuid.UUID) -> ChainReport:
    """Recompute the run's chain from the first event; report the first that fails."""
    prev_hash = GENESIS_HASH
    count = 0
    expected_seq = 1
    for event in LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq").iterator():
        count += 1
        problem = ""
        if event.seq != expected_seq:
            problem = f"sequence gap: expected #{expected_seq}, found #{event.seq}"
        elif event.prev_hash != prev_hash:
            problem = "prev_hash does not match the hash of the event before it"
        else:
            canonical = event_canonical(
                run_uuid=event.run_uuid,
                seq=event.seq,
                at=event.at,
                kind=event.kind,
                actor=event.actor,
                payload=event.payload,
            )
            if event_hash(prev_hash, canonical) != event.hash:
                problem = "hash does not match the event's content (changed after it was written)"
        if problem:
            return ChainReport(run_uuid, count, event.pk, event.seq, problem)
        prev_hash = event.hash
        expected_seq += 1
    return ChainReport(run_uuid, count)
