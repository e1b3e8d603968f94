"""Each attack from issue 11 on the trail, and what catches it: the database, or the
verifier holding every chain against the signed checkpoints kept outside it."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, InternalError, connection, transaction

from lineage.anchoring import run_checkpoint, trail_checkpoint
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append, events_append, json_canonical
from tests.conftest import PLANNED, run_until_rest
from tests.lineage.forgery import chain_write, events_of, rewrite, run_param, tamper

pytestmark = pytest.mark.django_db

REFUSED = (IntegrityError, InternalError)


def finished_run(length: int = 36, *, sealed: bool = True) -> uuid.UUID:
    """A run's trail of ``length`` events that ends as runs end, sealed by the
    checkpoint its end writes."""
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "olivia", {"input": {}}),
                *[("tool.succeeded", "engine", {"n": n}) for n in range(length - 3)],
                ("approval.approved", "victor", {"approval": 1}),
                ("run.succeeded", "engine", {"from": "running"}),
            ],
        )
    if sealed:
        run_checkpoint(run_uuid=run_uuid)
    return run_uuid


def whats(run_uuid: uuid.UUID) -> list[str]:
    return [finding.what for finding in chain_verify(run_uuid).findings]


def test_numbers_and_text_jsonb_would_rewrite_verify_as_written():
    # jsonb stores 1e20 as 100000000000000000000 and -0.0 as 0.0: the text hashed is
    # kept as written, so an untouched trail verifies, and reads back exactly.
    payload = {"a": 1e20, "b": -0.0, "c": 10**40, "d": 1e-300, "e": "nul\x00 and \ud800"}
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload=payload)
    assert chain_verify(run_uuid).intact
    event = LineageEvent.objects.get(run_uuid=run_uuid)
    assert json_canonical(event.body) == json_canonical(payload)
    assert event.payload["e"] == "nul\ufffd and \ufffd"  # the jsonb copy, made storable


def test_a_run_that_ends_is_sealed_by_a_checkpoint(
    make_task, operator, django_capture_on_commit_callbacks
):
    from tasks.services import run_start

    task = make_task([PLANNED, {"content": "done"}])
    with django_capture_on_commit_callbacks(execute=True):
        run = run_start(task=task, run_input={}, user=operator)
        run_until_rest(run)
    report = chain_verify(run.pk)
    assert run.status == "succeeded" and report.intact
    assert report.anchor is not None and report.anchor.final
    assert report.anchor.size == report.events


def test_sqlite_refuses_insert_or_replace_and_upsert():
    if connection.vendor != "sqlite":
        pytest.skip("INSERT OR REPLACE is SQLite's")
    run_uuid = finished_run(4)
    event = LineageEvent.objects.get(run_uuid=run_uuid, kind="approval.approved")
    columns = "run_uuid, seq, at, kind, actor, payload, prev_hash, hash, canonical, hash_version"
    forged = columns.replace("actor", "'mallory'")
    copy = f"SELECT id, {forged} FROM lineage_lineageevent WHERE id = {event.pk}"
    into = f"lineage_lineageevent (id, {columns})"
    for statement in (
        f"INSERT OR REPLACE INTO {into} {copy}",
        f"REPLACE INTO {into} {copy}",
        f"INSERT INTO {into} {copy} ON CONFLICT(id) DO UPDATE SET actor = 'mallory'",
    ):
        with (
            pytest.raises(IntegrityError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(statement)
    assert LineageEvent.objects.get(pk=event.pk).actor == "victor"


@pytest.mark.postgres
def test_postgres_refuses_upsert():
    if connection.vendor != "postgresql":
        pytest.skip("ON CONFLICT DO UPDATE, on PostgreSQL")
    run_uuid = finished_run(4)
    event = LineageEvent.objects.get(run_uuid=run_uuid, kind="approval.approved")
    statement = (
        "INSERT INTO lineage_lineageevent"
        " (run_uuid, seq, at, kind, actor, payload, prev_hash, hash, canonical, hash_version)"
        " SELECT run_uuid, seq, at, kind, actor, payload, prev_hash, hash, canonical,"
        " hash_version FROM lineage_lineageevent WHERE id = %s"
        " ON CONFLICT (hash) DO UPDATE SET actor = 'mallory'"
    )
    with (
        pytest.raises(REFUSED, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement, [event.pk])
    assert LineageEvent.objects.get(pk=event.pk).actor == "victor"


def test_an_actor_rewritten_with_hashes_recomputed_is_caught_by_the_checkpoint():
    # What REPLACE did on SQLite, and what the table's owner can do on either database.
    run_uuid = finished_run(36)

    def approver_changed(events):
        for event in events:
            if event["kind"] == "approval.approved":
                event["actor"] = "mallory"
        return events

    rewrite(run_uuid, approver_changed)
    report = chain_verify(run_uuid)
    assert [f.what for f in report.findings] == ["rewritten"]
    assert "event #36 is not the one signed in checkpoint #1" in report.problem


def test_a_cut_tail_is_caught():
    run_uuid = finished_run(36)
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq > 20", [run_param(run_uuid)]
    )
    report = chain_verify(run_uuid)
    assert report.events == 20
    assert [f.what for f in report.findings] == ["truncated"]
    assert "ends at #20, but checkpoint #1" in report.problem and "counted 36" in report.problem


def test_a_tail_moved_to_a_fresh_uuid_is_caught_on_both_chains():
    run_uuid, fresh = finished_run(36), uuid.uuid4()
    tamper(
        "UPDATE lineage_lineageevent SET run_uuid = %s WHERE run_uuid = %s AND seq > 20",
        [run_param(fresh), run_param(run_uuid)],
    )
    assert whats(run_uuid) == ["truncated"]
    moved = chain_verify(fresh)
    assert moved.findings[0].what == "removed" and "#1 to #20 are missing" in moved.problem
    assert "moved" in [f.what for f in moved.findings]


def test_a_tail_moved_renumbered_and_rehashed_is_caught_by_the_full_checkpoint(settings):
    settings.AGENTOPS_LINEAGE_CHECKPOINT_GRACE = 0
    run_uuid, fresh = finished_run(36), uuid.uuid4()
    trail_checkpoint()
    tail = events_of(run_uuid)[20:]
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq > 20", [run_param(run_uuid)]
    )
    from lineage.triggers import triggers_install, triggers_remove

    triggers_remove(connection)
    try:
        chain_write(fresh, tail)
    finally:
        triggers_install(connection)
    assert whats(run_uuid) == ["truncated"]
    assert whats(fresh) == ["unanchored"]


def test_events_appended_after_the_end_are_caught():
    run_uuid = finished_run(5)
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="mallory", payload={})
    report = chain_verify(run_uuid)
    assert {f.what for f in report.findings} == {"appended"}
    assert "#6 (tool.succeeded) was added after the run ended at #5" in report.problem


def test_a_checkpointed_chain_that_is_gone_is_reported_removed():
    run_uuid = finished_run(5)
    tamper("DELETE FROM lineage_lineageevent WHERE run_uuid = %s", [run_param(run_uuid)])
    report = chain_verify(run_uuid)
    assert whats(run_uuid) == ["removed"] and "the whole trail is gone" in report.problem


def test_swapped_events_are_reported_reordered():
    run_uuid = finished_run(5, sealed=False)
    second = LineageEvent.objects.get(run_uuid=run_uuid, seq=2)
    third = LineageEvent.objects.get(run_uuid=run_uuid, seq=3)
    tamper("UPDATE lineage_lineageevent SET seq = 99 WHERE id = %s", [second.pk])
    tamper("UPDATE lineage_lineageevent SET seq = 2 WHERE id = %s", [third.pk])
    tamper("UPDATE lineage_lineageevent SET seq = 3 WHERE id = %s", [second.pk])
    assert "reordered" in whats(run_uuid)


def test_a_displayed_column_changed_alone_is_caught():
    run_uuid = finished_run(5, sealed=False)
    event = LineageEvent.objects.get(run_uuid=run_uuid, kind="approval.approved")
    tamper("UPDATE lineage_lineageevent SET actor = 'mallory' WHERE id = %s", [event.pk])
    report = chain_verify(run_uuid)
    assert whats(run_uuid) == ["changed"]
    assert "actor shows 'mallory', but 'victor' was written" in report.problem


def test_a_chain_is_not_sealed_when_it_is_already_broken():
    run_uuid = finished_run(5)
    rewrite(run_uuid, lambda events: [*events[:2], *events[3:]])
    result = run_checkpoint(run_uuid=run_uuid)
    # Refused, and the refusal signed into the log: the chain is reported broken for good.
    assert result.refused and result.anchored == 0
    assert result.line["chains"][0]["broken"] is True
    assert whats(run_uuid) == ["broken", "truncated"]


def test_verify_lineage_reports_every_broken_chain_by_run():
    intact, cut, rewritten = finished_run(6), finished_run(6), finished_run(6)
    tamper("DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq > 3", [run_param(cut)])
    rewrite(rewritten, lambda events: [{**e, "actor": "mallory"} for e in events])
    with pytest.raises(CommandError) as error:
        call_command("verify_lineage", stdout=StringIO())
    message = str(error.value)
    assert message.startswith("BROKEN: 2 chains of 3")
    assert f"run {cut}, event #4: truncated" in message
    assert f"run {rewritten}, event #6: rewritten" in message
    assert str(intact) not in message


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_parallel_reading_of_postgresql_reports_every_broken_chain():
    if connection.vendor != "postgresql":
        pytest.skip("the trail is read by several processes on PostgreSQL only")
    from lineage.verification import trail_verify

    chains = [finished_run(6) for _ in range(12)]
    cut, changed = chains[3], chains[8]
    tamper("DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq > 2", [run_param(cut)])
    event = LineageEvent.objects.get(run_uuid=changed, seq=4)
    tamper("UPDATE lineage_lineageevent SET actor = 'mallory' WHERE id = %s", [event.pk])
    report = trail_verify(workers=2)
    assert (report.events, report.chains, report.anchored) == (12 * 6 - 4, 12, 12)
    found = {str(chain.run_uuid): [f.what for f in chain.findings] for chain in report.broken}
    assert found == {str(cut): ["truncated"], str(changed): ["changed"]}


def late_outcome_after_a_sealed_cancel() -> uuid.UUID:
    """A run cancelled with call 1 in flight and approval 7 open (withdrawn at the
    end), sealed by its checkpoint, and then call 1's outcome: a genuine late outcome."""
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "olivia", {}),
                ("tool.started", "engine", {"step": 1, "tool": "ledger.post"}),
                ("approval.requested", "engine", {"approval": 7, "step": 2}),
                ("run.cancelled", "olivia", {"from": "running"}),
                ("approval.cancelled", "olivia", {"approval": 7}),
            ],
        )
    run_checkpoint(run_uuid=run_uuid)
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload={"step": 1})
    assert chain_verify(run_uuid).intact
    return run_uuid


def test_the_outcome_of_a_call_in_flight_at_the_end_may_follow_it_once():
    # A call that fired is recorded whatever became of its run: its outcome may arrive
    # after the run was cancelled, and after the checkpoint that sealed the end.
    run_uuid = late_outcome_after_a_sealed_cancel()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload={"step": 1})
        event_append(run_uuid=run_uuid, kind="tool.failed", actor="engine", payload={"step": 2})
    report = chain_verify(run_uuid)
    assert [(f.what, f.seq) for f in report.findings] == [("appended", 7), ("appended", 8)]


def test_every_change_in_a_chain_is_reported_not_only_the_first():
    run_uuid = finished_run(8, sealed=False)
    second = LineageEvent.objects.get(run_uuid=run_uuid, seq=2)
    sixth = LineageEvent.objects.get(run_uuid=run_uuid, seq=6)
    tamper("UPDATE lineage_lineageevent SET actor = 'mallory' WHERE id = %s", [second.pk])
    forged = sixth.canonical.replace('"n":4', '"n":40')
    tamper("UPDATE lineage_lineageevent SET canonical = %s WHERE id = %s", [forged, sixth.pk])
    report = chain_verify(run_uuid)
    assert [(f.what, f.seq) for f in report.findings] == [("changed", 2), ("changed", 6)]
