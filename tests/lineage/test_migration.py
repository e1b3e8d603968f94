"""Events written before the canonical text (hash version 0) still verify after the
upgrade, beside new ones; the rebuilt table keeps its triggers."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import pytest
from django.db import IntegrityError, InternalError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

from lineage.models import GENESIS_HASH, HASH_COLUMNS, LineageEvent
from lineage.services import chain_verify, event_append


def migrate_to(*targets):
    executor = MigrationExecutor(connection)
    executor.migrate(list(targets))
    executor.loader.build_graph()
    return executor.loader.project_state(list(targets)).apps


@pytest.mark.django_db(transaction=True)
def test_events_hashed_the_old_way_verify_after_the_upgrade():
    old = migrate_to(("lineage", "0002_append_only_triggers"))
    OldEvent = old.get_model("lineage", "LineageEvent")
    run_uuid, prev = uuid.uuid4(), GENESIS_HASH
    for seq in (1, 2):
        at = datetime(2026, 11, 1, 12, 0, seq, 123456, tzinfo=UTC)
        document = {
            "run": str(run_uuid),
            "seq": seq,
            "at": at.isoformat(timespec="microseconds"),
            "kind": "test.old",
            "actor": "olivia",
            "payload": {"n": seq, "text": "é"},
        }
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256((prev + text).encode()).hexdigest()
        OldEvent.objects.create(
            run_uuid=run_uuid,
            seq=seq,
            at=at,
            kind="test.old",
            actor="olivia",
            payload=document["payload"],
            prev_hash=prev,
            hash=digest,
        )
        prev = digest

    migrate_to(*MigrationLoader(connection).graph.leaf_nodes())
    assert set(LineageEvent.objects.values_list("hash_version", flat=True)) == {HASH_COLUMNS}
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="test.new", actor="engine", payload={"n": 3})
    report = chain_verify(run_uuid)
    assert report.intact and report.events == 3, report.findings
    with pytest.raises((IntegrityError, InternalError), match="append-only"), transaction.atomic():
        LineageEvent.objects.filter(run_uuid=run_uuid).update(actor="mallory")
    if connection.vendor == "sqlite":  # the table was rebuilt: the new trigger is there too
        with (
            pytest.raises(IntegrityError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(
                "INSERT OR REPLACE INTO lineage_lineageevent SELECT * FROM"
                " lineage_lineageevent WHERE seq = 1"
            )
