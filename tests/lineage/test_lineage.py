"""The trail: append-only in the database, hash-chained, and verifiable from the shell."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, InternalError, connection, transaction

from lineage.models import GENESIS_HASH, LineageEvent
from lineage.services import chain_verify, event_append
from tests.lineage.forgery import run_param, tamper

pytestmark = pytest.mark.django_db

# SQLite's RAISE(ABORT) surfaces as IntegrityError; PostgreSQL's exception as InternalError.
REFUSED = (IntegrityError, InternalError)


def chain(length: int = 3) -> uuid.UUID:
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        for number in range(length):
            event_append(run_uuid=run_uuid, kind="test.event", actor="test", payload={"n": number})
    return run_uuid


def test_events_chain_from_genesis():
    run_uuid = chain(3)
    events = list(LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq"))
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0].prev_hash == GENESIS_HASH
    assert events[1].prev_hash == events[0].hash and events[2].prev_hash == events[1].hash
    assert chain_verify(run_uuid).intact


def test_a_rolled_back_append_leaves_no_gap_in_the_chain():
    # The appending thread remembers the head it wrote; after a rollback that head is
    # gone, and the next append must chain onto the last event that exists.
    run_uuid = chain(2)
    with pytest.raises(RuntimeError), transaction.atomic():
        event_append(run_uuid=run_uuid, kind="test.rolled_back", actor="test")
        raise RuntimeError("the step failed")
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="test.after", actor="test")
    kinds = list(
        LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq").values_list("seq", "kind")
    )
    assert kinds == [(1, "test.event"), (2, "test.event"), (3, "test.after")]
    assert chain_verify(run_uuid).intact


def test_an_append_by_another_writer_is_chained_onto_not_forked():
    run_uuid = chain(1)
    # Another writer appends (another process would not share this thread's memory of
    # the head): written here behind the appender's back, as the next event in the chain.
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="test.other", actor="other")
    from lineage import services

    services._heads.__dict__[connection.alias][run_uuid] = tuple(
        LineageEvent.objects.filter(run_uuid=run_uuid, seq=1).values_list("seq", "hash").get()
    )
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="test.mine", actor="test")
    events = LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq")
    assert list(events.values_list("kind", flat=True)) == ["test.event", "test.other", "test.mine"]
    assert chain_verify(run_uuid).intact


@pytest.mark.django_db(transaction=True)
def test_append_outside_a_transaction_is_refused():
    with pytest.raises(RuntimeError, match="inside the transaction"):
        event_append(run_uuid=uuid.uuid4(), kind="x", actor="test")


def test_the_database_refuses_update():
    run_uuid = chain(1)
    with pytest.raises(REFUSED, match="append-only"), transaction.atomic():
        LineageEvent.objects.filter(run_uuid=run_uuid).update(kind="changed")
    assert LineageEvent.objects.get(run_uuid=run_uuid).kind == "test.event"


def test_the_database_refuses_delete():
    run_uuid = chain(1)
    with pytest.raises(REFUSED, match="append-only"), transaction.atomic():
        LineageEvent.objects.filter(run_uuid=run_uuid).delete()
    assert LineageEvent.objects.filter(run_uuid=run_uuid).count() == 1


def test_the_database_refuses_raw_sql_update_and_delete():
    run_uuid = chain(1)
    for statement in (
        "UPDATE lineage_lineageevent SET actor = 'x'",
        "DELETE FROM lineage_lineageevent",
    ):
        with pytest.raises(REFUSED), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement)
    assert LineageEvent.objects.filter(run_uuid=run_uuid).count() == 1


def test_verify_finds_a_changed_payload():
    run_uuid = chain(3)
    second = LineageEvent.objects.get(run_uuid=run_uuid, seq=2)
    forged = second.canonical.replace('"n":1', '"n":99')
    tamper("UPDATE lineage_lineageevent SET canonical = %s WHERE id = %s", [forged, second.pk])
    report = chain_verify(run_uuid)
    assert not report.intact
    assert report.broken_seq == 2 and report.broken_event_id == second.pk
    assert report.findings[0].what == "changed"
    assert "#2's text does not match its hash" in report.problem
    assert len(report.findings) == 1  # the next event still links to the stored hash


def test_the_pages_show_the_payload_hashed_not_the_jsonb_copy():
    run_uuid = chain(2)
    first = LineageEvent.objects.get(run_uuid=run_uuid, seq=1)
    tamper("UPDATE lineage_lineageevent SET payload = %s WHERE id = %s", ['{"n": 99}', first.pk])
    assert LineageEvent.objects.get(pk=first.pk).body == {"n": 0}
    assert chain_verify(run_uuid).intact


def test_verify_finds_a_removed_event():
    run_uuid = chain(3)
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq = 2",
        [run_param(run_uuid)],
    )
    report = chain_verify(run_uuid)
    assert report.broken_seq == 3
    assert report.findings[0].what == "removed"
    assert "events #2 are missing before #3" in report.problem


def test_verify_lineage_command_reports_every_chain_intact():
    chain(2)
    chain(3)
    out = StringIO()
    call_command("verify_lineage", stdout=out)
    assert "checked 5 events in 2 chains" in out.getvalue()


def test_verify_lineage_command_names_the_first_broken_event():
    chain(2)
    run_uuid = chain(3)
    third = LineageEvent.objects.get(run_uuid=run_uuid, seq=3)
    tamper("UPDATE lineage_lineageevent SET actor = %s WHERE id = %s", ["mallory", third.pk])
    with pytest.raises(CommandError) as error:
        call_command("verify_lineage", stdout=StringIO())
    message = str(error.value)
    assert f"run {run_uuid}, event #3 (id {third.pk})" in message
    assert "BROKEN" in message


def test_verify_lineage_for_one_run_and_a_bad_run_argument():
    run_uuid = chain(2)
    out = StringIO()
    call_command("verify_lineage", "--run", str(run_uuid), stdout=out)
    assert "checked 2 events in 1 chain (" in out.getvalue()
    with pytest.raises(CommandError, match="is not a UUID"):
        call_command("verify_lineage", "--run", "nope")
    with pytest.raises(CommandError, match="no lineage events"):
        call_command("verify_lineage", "--run", str(uuid.uuid4()))


def test_verify_lineage_refuses_a_bad_worker_count():
    with pytest.raises(CommandError, match="--workers 0: must be at least 1"):
        call_command("verify_lineage", "--workers", "0")
