"""Writing and checking the trail. ``event_append`` is the only way events are made."""

from __future__ import annotations

import hashlib
import json
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
    """Append one event to the run's chain.

    Callers hold the run's row lock (or SQLite's write lock) inside the transaction that
    changes the run, so the chain's head cannot move under them; the unique (run, seq)
    constraint turns any slip into an error instead of a fork.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("event_append must run inside the transaction that changes the run")
    head = (
        LineageEvent.objects.filter(run_uuid=run_uuid)
        .order_by("-seq")
        .values_list("seq", "hash")
        .first()
    )
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    at = timezone.now()
    body = json_plain(payload or {})
    canonical = event_canonical(
        run_uuid=run_uuid, seq=seq, at=at, kind=kind, actor=actor, payload=body
    )
    return LineageEvent.objects.create(
        run_uuid=run_uuid,
        seq=seq,
        at=at,
        kind=kind,
        actor=actor,
        payload=body,
        prev_hash=prev_hash,
        hash=event_hash(prev_hash, canonical),
    )


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
