"""What an insider with write access to the lineage table can do: lift the triggers,
change rows, and recompute every hash so the chain itself looks whole."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.db import connection

from lineage.models import GENESIS_HASH, HASH_CANONICAL, LineageEvent
from lineage.services import event_document, event_hash, json_canonical, json_storable
from lineage.triggers import triggers_install, triggers_remove


def tamper(sql: str, params: list) -> None:
    """Run ``sql`` behind the triggers' back, as the table's owner could."""
    triggers_remove(connection)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
    finally:
        triggers_install(connection)


def run_param(run_uuid: uuid.UUID) -> Any:
    return LineageEvent._meta.get_field("run_uuid").get_db_prep_value(run_uuid, connection)


def events_of(run_uuid: uuid.UUID) -> list[dict[str, Any]]:
    return [
        {"seq": e.seq, "at": e.at, "kind": e.kind, "actor": e.actor, "payload": e.body}
        for e in LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq")
    ]


def chain_write(
    run_uuid: uuid.UUID, events: list[dict[str, Any]], *, renumber: bool = True
) -> None:
    """Write ``events`` as the run's whole chain, every hash recomputed from genesis."""
    prev, rows = GENESIS_HASH, []
    for number, event in enumerate(events, start=1):
        seq = number if renumber else event["seq"]
        canonical = json_canonical(
            event_document(
                run_uuid=run_uuid,
                seq=seq,
                at=event["at"],
                kind=event["kind"],
                actor=event["actor"],
                payload=event["payload"],
            )
        )
        digest = event_hash(prev, canonical)
        rows.append(
            LineageEvent(
                run_uuid=run_uuid,
                seq=seq,
                at=event["at"],
                kind=event["kind"],
                actor=event["actor"],
                payload=json_storable(event["payload"])[0],
                prev_hash=prev,
                hash=digest,
                canonical=canonical,
                hash_version=HASH_CANONICAL,
            )
        )
        prev = digest
    LineageEvent.objects.bulk_create(rows)


def rewrite(
    run_uuid: uuid.UUID, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    """Replace the run's chain by ``edit(its events)``, hashes recomputed: a forgery that
    the chain alone cannot tell from the record."""
    events = edit(events_of(run_uuid))
    triggers_remove(connection)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "DELETE FROM lineage_lineageevent WHERE run_uuid = %s", [run_param(run_uuid)]
            )
        chain_write(run_uuid, events)
    finally:
        triggers_install(connection)
