"""Tampering found by an attacker's review of the trail: each attack, and the secure
behaviour the verifier and the checkpoints keep against it (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from io import StringIO
from unittest import mock

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from lineage import anchoring
from lineage import export as lineage_export
from lineage.anchoring import (
    ledger_load,
    public_key,
    public_key_text,
    run_checkpoint,
    trail_checkpoint,
)
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append, events_append
from tests.lineage.forgery import rewrite, run_param, tamper
from tests.lineage.test_attacks import late_outcome_after_a_sealed_cancel

pytestmark = pytest.mark.django_db


def ended_run_with_calls(calls: int = 3, *, seal: bool = True) -> uuid.UUID:
    """A run whose calls all fired and finished before it succeeded: nothing in flight."""
    run_uuid = uuid.uuid4()
    events = [("run.queued", "olivia", {})]
    for step in range(1, calls + 1):
        events.append(("tool.started", "engine", {"step": step, "tool": "ledger.post"}))
        events.append(("tool.succeeded", "engine", {"step": step, "result": {"ok": True}}))
    events.append(("run.succeeded", "engine", {"from": "running"}))
    with transaction.atomic():
        events_append(run_uuid=run_uuid, events=events)
    if seal:
        run_checkpoint(run_uuid=run_uuid)
    return run_uuid


def raw_insert(run_uuid, seq, kind, canonical, prev_hash, digest, *, version=1, payload="{}"):
    """What the app's role can do after the lock-down: INSERT any row it likes."""
    postgres = connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO lineage_lineageevent (run_uuid, seq, at, kind, actor, payload,"
            " prev_hash, hash, canonical, hash_version) VALUES (%s, %s, %s, %s, 'engine',"
            f" {'CAST(%s AS jsonb)' if postgres else '%s'}, %s, %s, %s, %s)",
            [
                run_param(run_uuid),
                seq,
                "2024-01-01T00:00:00+00:00" if postgres else "2024-01-01 00:00:00",
                kind,
                payload,
                prev_hash,
                digest,
                canonical,
                version,
            ],
        )


def whats(run_uuid: uuid.UUID) -> list[str]:
    return [finding.what for finding in chain_verify(run_uuid).findings]


# 1. Row content never makes the verifier or the checkpoint raise --------------------


@pytest.mark.parametrize("kind", ["tool.succeeded", "tool.late_outcome"])
@pytest.mark.parametrize("text", ["not json", "[]", '{"payload": 3}'])
def test_an_unparseable_event_after_the_end_is_a_finding_and_other_chains_are_sealed(
    kind, text, operator_client
):
    run_uuid = ended_run_with_calls(1)
    other = uuid.uuid4()  # an honest chain that grows and must still be sealed
    with transaction.atomic():
        event_append(run_uuid=other, kind="run.queued", actor="olivia", payload={})
    last = LineageEvent.objects.filter(run_uuid=run_uuid).order_by("-seq").first()
    raw_insert(
        run_uuid,
        last.seq + 1,
        kind,
        text,
        last.hash,
        hashlib.sha256((last.hash + text).encode()).hexdigest(),
    )
    result = trail_checkpoint()
    assert [str(report.run_uuid) for report in result.refused] == [str(run_uuid)]
    assert ledger_load().anchors[str(other)].size == 1
    assert "changed" in whats(run_uuid)
    with pytest.raises(CommandError, match="BROKEN"):
        call_command("verify_lineage", stdout=StringIO())
    response = operator_client.get(reverse("runs:lineage:run", args=[run_uuid]))
    assert response.status_code == 200
    assert "Not verified" in response.content.decode()


# 2. After the end: only what the run left open, once --------------------------------


def test_outcomes_of_calls_settled_before_the_end_and_unrequested_withdrawals_are_appended():
    run_uuid = ended_run_with_calls(3)
    assert chain_verify(run_uuid).anchor.final
    with transaction.atomic():
        for step in (1, 2, 3):
            event_append(
                run_uuid=run_uuid,
                kind="tool.succeeded",
                actor="mallory",
                payload={"step": step, "result": {"paid": 1_000_000}, "late": True},
            )
        for number in range(5):
            event_append(
                run_uuid=run_uuid,
                kind="approval.cancelled",
                actor="mallory",
                payload={"approval": number, "note": "anything at all"},
            )
    assert whats(run_uuid) == ["appended"] * 8


def test_what_a_run_left_open_may_follow_its_end_once_each():
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[
                ("run.queued", "olivia", {}),
                ("tool.started", "engine", {"step": 1, "tool": "ledger.post"}),
                ("tool.unknown", "engine", {"step": 1}),
                ("approval.requested", "engine", {"approval": 4, "step": 1}),
                ("approval.approved", "victor", {"approval": 4, "step": 1}),
                # A person said it happened: settled, but its first call may still answer.
                ("tool.succeeded", "engine", {"step": 1, "approval": 4}),
                ("tool.started", "engine", {"step": 2, "tool": "ledger.post"}),
                ("approval.requested", "engine", {"approval": 5, "step": 3}),
                ("approval.requested", "engine", {"approval": 6, "step": 3}),
                ("approval.expired", "system", {"approval": 6}),
                ("run.cancelled", "olivia", {"from": "running"}),
                ("approval.cancelled", "olivia", {"approval": 5, "reason": "the run ended"}),
            ],
        )
    run_checkpoint(run_uuid=run_uuid)
    with transaction.atomic():
        event_append(
            run_uuid=run_uuid, kind="tool.late_outcome", actor="engine", payload={"step": 1}
        )
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload={"step": 2})
    assert chain_verify(run_uuid).intact
    with transaction.atomic():
        for step in (1, 2):
            event_append(
                run_uuid=run_uuid, kind="tool.failed", actor="engine", payload={"step": step}
            )
        for approval in (5, 6):
            event_append(
                run_uuid=run_uuid,
                kind="approval.cancelled",
                actor="engine",
                payload={"approval": approval},
            )
    report = chain_verify(run_uuid)
    assert [(f.what, f.seq) for f in report.findings] == [
        ("appended", 15),
        ("appended", 16),
        ("appended", 17),
        ("appended", 18),
    ]


def test_an_incident_flagged_after_the_end_verifies_and_is_sealed_once_per_incident():
    # incident_flag writes only on a run that has ended: never a finding, and since a
    # refusal is kept for good, never a refusal either.
    run_uuid = ended_run_with_calls(1)
    with transaction.atomic():
        event_append(
            run_uuid=run_uuid,
            kind="incident.flagged",
            actor="user:olivia",
            payload={"incident": 3, "note": "wrong account"},
        )
    assert chain_verify(run_uuid).intact
    assert not trail_checkpoint().refused
    assert ledger_load().anchors[str(run_uuid)].size == 5
    with transaction.atomic():
        for incident in (3, None):
            event_append(
                run_uuid=run_uuid,
                kind="incident.flagged",
                actor="mallory",
                payload={"incident": incident, "note": "again"},
            )
    assert whats(run_uuid) == ["appended", "appended"]


# 3. A refusal is signed, and a chain once seen broken stays reported ----------------


def test_a_chain_broken_then_repaired_is_never_sealed_and_stays_reported():
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[("run.queued", "olivia", {}), ("approval.approved", "victor", {"approval": 1})],
        )
    first = LineageEvent.objects.get(run_uuid=run_uuid, seq=1)
    tamper("UPDATE lineage_lineageevent SET canonical = canonical || ' ' WHERE id = %s", [first.pk])
    refusal = trail_checkpoint()
    assert refusal.refused
    (entry,) = refusal.line["chains"]
    assert entry["run"] == str(run_uuid) and entry["broken"] is True and entry["size"] == 2
    assert "#1's text does not match its hash" in entry["finding"]
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="run.succeeded", actor="engine", payload={})
    assert run_checkpoint(run_uuid=run_uuid).refused
    # The repair: the approver changed and every hash recomputed.
    rewrite(
        run_uuid,
        lambda events: [
            {**e, "actor": "mallory"} if e["kind"] == "approval.approved" else e for e in events
        ],
    )
    assert trail_checkpoint().refused
    report = chain_verify(run_uuid)
    assert report.findings[0].what == "broken"
    assert f"checkpoint #{refusal.line['signed']['number']}" in report.problem
    assert str(run_uuid) not in ledger_load().anchors
    with pytest.raises(CommandError, match=f"run {run_uuid}.*saw this trail broken"):
        call_command("verify_lineage", stdout=StringIO())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_chain_seen_broken_is_reported_by_every_reader_even_once_deleted(workers):
    kept, gone = uuid.uuid4(), uuid.uuid4()
    for run_uuid in (kept, gone):
        with transaction.atomic():
            event_append(run_uuid=run_uuid, kind="run.queued", actor="olivia", payload={})
        tamper(
            "UPDATE lineage_lineageevent SET actor = 'mallory' WHERE run_uuid = %s",
            [run_param(run_uuid)],
        )
    assert len(trail_checkpoint().refused) == 2
    tamper("DELETE FROM lineage_lineageevent WHERE run_uuid = %s", [run_param(gone)])
    with pytest.raises(CommandError) as error:
        call_command("verify_lineage", "--workers", workers, stdout=StringIO())
    for run_uuid in (kept, gone):
        assert f"BROKEN: run {run_uuid}: broken: checkpoint #1 of" in str(error.value)
    with pytest.raises(CommandError, match=f"run {gone}: broken"):
        call_command("verify_lineage", "--run", str(gone), stdout=StringIO())


# 4. A trail forged with old dates is refused by the periodic checkpoint -------------


def test_a_whole_trail_forged_with_old_dates_is_not_sealed_by_the_next_checkpoint(settings):
    settings.AGENTOPS_LINEAGE_CHECKPOINT_GRACE = 0
    ended_run_with_calls(1, seal=False)
    trail_checkpoint()
    forged = uuid.uuid4()
    a_year_ago = timezone.now() - dt.timedelta(days=365)
    with mock.patch.object(timezone, "now", return_value=a_year_ago), transaction.atomic():
        events_append(
            run_uuid=forged,
            events=[
                ("run.queued", "olivia", {}),
                ("approval.approved", "victor", {"approval": 1}),
                ("run.succeeded", "engine", {}),
            ],
        )
    assert whats(forged) == ["unanchored"]
    result = trail_checkpoint()
    assert [str(report.run_uuid) for report in result.refused] == [str(forged)]
    assert whats(forged) == ["broken", "unanchored"]


# 5. A checkpoint that read the chain before the run's end never unseals it ----------


def test_a_periodic_checkpoint_that_read_before_the_run_end_does_not_unseal_it(monkeypatch):
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(
            run_uuid=run_uuid,
            events=[("run.queued", "olivia", {}), ("approval.approved", "victor", {})],
        )
    original = anchoring.statement_append
    raced = []

    def racing(**kwargs):
        if not raced and kwargs.get("reason") == "periodic":
            raced.append(True)  # the run ends while the periodic checkpoint was checking
            with transaction.atomic():
                event_append(run_uuid=run_uuid, kind="run.succeeded", actor="engine", payload={})
            run_checkpoint(run_uuid=run_uuid)
        return original(**kwargs)

    monkeypatch.setattr(anchoring, "statement_append", racing)
    trail_checkpoint()
    monkeypatch.setattr(anchoring, "statement_append", original)
    anchor = chain_verify(run_uuid).anchor
    assert anchor.final and anchor.size == 3
    assert [earlier.size for earlier in anchor.earlier] == [2]
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq = 3", [run_param(run_uuid)]
    )
    trail_checkpoint()
    assert whats(run_uuid)[-1] == "truncated"
    with pytest.raises(CommandError, match="truncated"):
        call_command("verify_lineage", stdout=StringIO())


def test_a_later_checkpoint_with_another_head_at_the_same_length_is_a_log_problem():
    ledger = anchoring.Ledger()
    base = {"run_uuid": str(uuid.uuid4()), "size": 2, "root": "", "final": False, "at": "t"}
    ledger.anchor_take(anchoring.Anchor(**base, head="a" * 64, number=1))
    ledger.anchor_take(anchoring.Anchor(**base, head="b" * 64, number=2))
    assert ledger.anchors[base["run_uuid"]].head == "a" * 64
    assert "different last events" in ledger.problems[0]


def test_a_shorter_later_anchor_whose_event_was_rewritten_is_found(monkeypatch):
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        events_append(run_uuid=run_uuid, events=[("run.queued", "olivia", {})] * 3)
    ledger = anchoring.Ledger()
    rows = list(LineageEvent.objects.filter(run_uuid=run_uuid).order_by("seq"))
    common = {"run_uuid": str(run_uuid), "root": "", "final": False, "at": "t"}
    ledger.anchor_take(anchoring.Anchor(**common, size=3, head=rows[2].hash, number=1))
    ledger.anchor_take(anchoring.Anchor(**common, size=2, head="f" * 64, number=2))
    from lineage.verification import run_verify

    report = run_verify(run_uuid=run_uuid, ledger=ledger)
    assert [(f.what, f.seq) for f in report.findings] == [("rewritten", 2)]


# 6. The export's verifier applies the same after-end rule ---------------------------


def test_an_exported_trail_with_a_genuine_late_outcome_verifies():
    run_uuid = late_outcome_after_a_sealed_cancel()
    document = json.loads(json.dumps(lineage_export.run_export(run_uuid=run_uuid)))
    key = public_key().public_bytes_raw()
    assert lineage_export.export_verify(document, key) == []


# 8. An unfinished last line of the log, and a log that stopped ----------------------


@pytest.mark.parametrize("damage", ["newline stripped", "partial line appended"])
def test_an_unfinished_last_line_of_the_checkpoint_log_is_reported(lineage_checkpoints, damage):
    for _ in range(2):
        ended_run_with_calls(1)
    original = lineage_checkpoints.read_bytes()
    damaged = original[:-1] if damage == "newline stripped" else original + b'{"x'
    lineage_checkpoints.write_bytes(damaged)
    ledger = ledger_load()
    assert any("ends in an unfinished line" in problem for problem in ledger.problems)
    with pytest.raises(CommandError, match="unfinished line"):
        call_command("verify_lineage", stdout=StringIO())
    lineage_checkpoints.write_bytes(original)
    assert ledger_load().problems == []


def test_a_checkpoint_log_whose_last_complete_statement_is_old_is_reported(settings):
    settings.AGENTOPS_LINEAGE_CHECKPOINT_MAX_AGE = 900
    ended_run_with_calls(1, seal=False)
    with mock.patch.object(timezone, "now", return_value=timezone.now() - dt.timedelta(hours=1)):
        trail_checkpoint()
    with pytest.raises(CommandError, match=r"last complete checkpoint \(#1.*60 minutes old"):
        call_command("verify_lineage", stdout=StringIO())
    trail_checkpoint()
    call_command("verify_lineage", stdout=StringIO())
    settings.AGENTOPS_LINEAGE_CHECKPOINT_MAX_AGE = 0
    with mock.patch.object(timezone, "now", return_value=timezone.now() + dt.timedelta(days=9)):
        assert ledger_load().problems == []


# 9. A version-0 row whose payload is a JSON string ----------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_version_0_row_with_a_string_payload_is_a_finding_in_every_reader(workers):
    from lineage.verification import trail_verify

    run_uuid = uuid.uuid4()
    raw_insert(run_uuid, 1, "run.queued", "", "0" * 64, "ab" * 32, version=0, payload='"x"')
    report = trail_verify(workers=workers)
    assert [finding.what for chain in report.broken for finding in chain.findings] == ["changed"]


# 10. A hash version flipped to 0 ----------------------------------------------------


def test_a_hash_version_flipped_to_0_is_changed_and_the_export_reports_it():
    run_uuid = ended_run_with_calls(1)
    key = public_key().public_bytes_raw()
    exported = json.loads(json.dumps(lineage_export.run_export(run_uuid=run_uuid)))
    first = LineageEvent.objects.get(run_uuid=run_uuid, seq=1)
    tamper("UPDATE lineage_lineageevent SET hash_version = 0 WHERE id = %s", [first.pk])
    report = chain_verify(run_uuid)
    assert report.findings[0].what == "changed"
    assert "#1 claims the old hash form but holds new text" in report.problem
    with pytest.raises(lineage_export.ExportRefused, match="claims the old hash form"):
        lineage_export.run_export(run_uuid=run_uuid, checkpoint=False)
    # The same flip in an export: reported, never a KeyError.
    exported["events"][0]["hash_version"] = 0
    assert "event #1 lacks at, kind, actor, payload" in lineage_export.export_verify(exported, key)
    exported["events"][0].update(
        at=first.at.isoformat(), kind=first.kind, actor=first.actor, payload=first.payload
    )
    problems = lineage_export.export_verify(exported, key)
    assert "event #1 claims the old hash form but holds new text" in problems


def test_an_export_of_a_run_not_ended_says_how_far_it_reaches(tmp_path, capsys):
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="run.queued", actor="olivia", payload={})
    output = tmp_path / "trail.json"
    call_command("lineage_export", str(run_uuid), "--output", str(output), stdout=StringIO())
    key = public_key_text(public_key())
    assert lineage_export.main([str(output), "--public-key", key]) == 0
    said = capsys.readouterr().out
    assert "unchanged as far as checkpoint #1" in said and "complete" not in said
    ended, output = ended_run_with_calls(1), tmp_path / "ended.json"
    call_command("lineage_export", str(ended), "--output", str(output), stdout=StringIO())
    assert lineage_export.main([str(output), "--public-key", key]) == 0
    assert "complete and unchanged as checkpoint #2" in capsys.readouterr().out
