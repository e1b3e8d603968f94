"""Checkpoints outside the database: signed, chained, read back with the public key alone;
sinks (the file, a webhook); one run's trail exported with its proof."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
import uuid
from io import StringIO

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import transaction

from lineage import export as lineage_export
from lineage.anchoring import (
    public_key,
    public_key_text,
    run_checkpoint,
    run_seal_on_commit,
    signing_key,
)
from lineage.merkle import (
    EMPTY_ROOT,
    inclusion_path,
    inclusion_verify,
    leaf_hash,
    node_hash,
    tree_root,
)
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append
from tests.lineage.forgery import run_param, tamper
from tests.lineage.test_attacks import finished_run

pytestmark = pytest.mark.django_db

OTHER_KEY = "b3RoZXIta2V5LW5vdC10aGUtbGluZWFnZS1rZXktMzI="


def chain(length: int = 3) -> uuid.UUID:
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        for number in range(length):
            event_append(run_uuid=run_uuid, kind="test.event", actor="test", payload={"n": number})
    return run_uuid


def verify(*args: str) -> str:
    out = StringIO()
    call_command("verify_lineage", *args, stdout=out)
    return out.getvalue()


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162's definition, word for word (section 2.1.1)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def test_merkle_roots_and_inclusion_paths_are_rfc_9162s():
    for size in range(0, 34):
        leaves = [leaf_hash(f"event {i}".encode()) for i in range(size)]
        root = mth(leaves)
        assert tree_root(leaves) == root
        for index in range(size):
            path = inclusion_path(index, leaves)
            assert inclusion_verify(index, size, leaves[index], path, root)
            assert not inclusion_verify(index, size, leaf_hash(b"forged"), path, root)
            if size > 1:
                assert not inclusion_verify((index + 1) % size, size, leaves[index], path, root)
    assert leaf_hash(b"") != node_hash(b"", b"")  # the prefixes keep leaves from nodes


def test_the_periodic_checkpoint_seals_grown_chains_and_verify_holds_them(lineage_checkpoints):
    first, second = chain(3), chain(2)
    out = StringIO()
    call_command("lineage_checkpoint", stdout=out)
    assert "checkpoint #1" in out.getvalue() and "2 chains sealed anew" in out.getvalue()
    assert "checked 5 events in 2 chains (2 held against a signed checkpoint" in verify()
    with transaction.atomic():
        event_append(run_uuid=first, kind="test.event", actor="test", payload={})
    assert "(2 held against" in verify()  # a chain may grow past an open checkpoint
    out = StringIO()
    call_command("lineage_checkpoint", stdout=out)
    assert "checkpoint #2" in out.getvalue() and "1 chains sealed anew" in out.getvalue()
    line = json.loads(lineage_checkpoints.read_text().splitlines()[-1])
    assert line["signed"]["complete"] and [e["run"] for e in line["chains"]] == [str(first)]
    assert chain_verify(second).anchor.number == 1 and chain_verify(first).anchor.size == 4


def test_a_broken_chain_is_not_checkpointed(lineage_checkpoints):
    run_uuid = chain(3)
    tamper(
        "UPDATE lineage_lineageevent SET actor = 'mallory' WHERE run_uuid = %s AND seq = 2",
        [run_param(run_uuid)],
    )
    with pytest.raises(CommandError, match=f"run {run_uuid}: #2's actor shows 'mallory'"):
        call_command("lineage_checkpoint", stdout=StringIO())
    # Not sealed: listed as broken, with what the checkpoint found, for good.
    (entry,) = [
        entry
        for line in lineage_checkpoints.read_text().splitlines()
        for entry in json.loads(line)["chains"]
        if entry["run"] == str(run_uuid)
    ]
    assert entry["broken"] is True and "#2's actor shows 'mallory'" in entry["finding"]
    assert "root" not in entry and "final" not in entry


def test_the_checkpoint_log_itself_is_checked(lineage_checkpoints, settings):
    chain(2)
    for _ in range(3):
        chain(1)
        call_command("lineage_checkpoint", stdout=StringIO())
    lines = lineage_checkpoints.read_text().splitlines()
    # A statement removed from the middle of the log.
    lineage_checkpoints.write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(CommandError, match=r"checkpoint #3 .* does not follow #1"):
        verify()
    # A statement changed after it was signed.
    forged = json.loads(lines[1])
    forged["chains"][0]["size"] = 99
    lineage_checkpoints.write_text("\n".join([lines[0], json.dumps(forged), lines[2]]) + "\n")
    with pytest.raises(CommandError, match=r"checkpoint #2 .* lists chains it did not sign"):
        verify()
    # Checked with another key: nothing in the log holds.
    lineage_checkpoints.write_text("\n".join(lines) + "\n")
    settings.AGENTOPS_LINEAGE_PUBLIC_KEY = OTHER_KEY
    with pytest.raises(CommandError, match="does not carry a valid signature"):
        verify()


def test_an_auditor_verifies_with_the_public_key_alone(lineage_checkpoints, settings):
    run_uuid = finished_run(5)
    published = public_key_text(public_key())
    settings.AGENTOPS_LINEAGE_SIGNING_KEY = ""
    settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE = lineage_checkpoints.parent / "absent"
    with pytest.raises(ImproperlyConfigured, match="no lineage signing key"):
        signing_key()
    assert "(1 held against a signed checkpoint" in verify("--public-key", published)
    copy = lineage_checkpoints.parent / "auditors-copy.jsonl"
    copy.write_text(lineage_checkpoints.read_text())
    lineage_checkpoints.unlink()
    out = verify("--run", str(run_uuid), "--checkpoints", str(copy), "--public-key", published)
    assert "checked 5 events in 1 chain (1 held" in out
    with pytest.raises(CommandError, match="--public-key is not an Ed25519 key"):
        verify("--public-key", "not-a-key")
    with pytest.raises(CommandError, match=r"--checkpoints .*: no such file"):
        verify("--checkpoints", str(lineage_checkpoints.parent / "nothing.jsonl"))


def test_bad_keys_name_their_setting(settings):
    settings.AGENTOPS_LINEAGE_SIGNING_KEY = "c2hvcnQ="
    with pytest.raises(
        ImproperlyConfigured, match="AGENTOPS_LINEAGE_SIGNING_KEY is not an Ed25519 key"
    ):
        signing_key()
    settings.AGENTOPS_LINEAGE_PUBLIC_KEY = "%%%"
    with pytest.raises(
        ImproperlyConfigured, match="AGENTOPS_LINEAGE_PUBLIC_KEY is not an Ed25519 key"
    ):
        public_key()


def test_in_development_the_key_is_made_once_outside_the_database(settings, tmp_path):
    settings.DEBUG = True
    settings.AGENTOPS_LINEAGE_SIGNING_KEY = ""
    settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE = tmp_path / "var" / "lineage_signing_key"
    made = public_key_text(signing_key().public_key())
    assert public_key_text(signing_key().public_key()) == made
    assert oct(os.stat(settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE).st_mode & 0o777) == "0o600"


def test_a_run_end_without_a_key_is_logged_and_the_run_still_ends(
    settings, caplog, tmp_path, django_capture_on_commit_callbacks
):
    settings.AGENTOPS_LINEAGE_SIGNING_KEY = ""
    settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE = tmp_path / "absent"
    run_uuid = finished_run(3, sealed=False)
    with (
        caplog.at_level(logging.ERROR, logger="agentops.lineage"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        run_seal_on_commit(run_uuid=run_uuid)
    assert f"the trail of run {run_uuid} could not be checkpointed" in caplog.text
    assert LineageEvent.objects.filter(run_uuid=run_uuid).count() == 3


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    status = 204

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body))
        self.send_response(Receiver.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received, Receiver.status = [], 204
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/checkpoints"
    server.shutdown()
    server.server_close()


def test_the_webhook_sink_posts_each_statement_and_keeps_the_file(
    receiver, settings, lineage_checkpoints
):
    settings.AGENTOPS_LINEAGE_SINK = "lineage.anchoring.WebhookSink"
    settings.AGENTOPS_LINEAGE_WEBHOOK_URL = receiver
    run_uuid = finished_run(4)
    (posted,) = Receiver.received
    assert posted["chains"][0]["run"] == str(run_uuid) and posted["chains"][0]["final"]
    assert json.loads(lineage_checkpoints.read_text()) == posted
    # The far side's copy serves the verifier as well as the local one.
    copy = lineage_checkpoints.parent / "received.jsonl"
    copy.write_text("".join(json.dumps(line) + "\n" for line in Receiver.received))
    assert "(1 held against" in verify("--checkpoints", str(copy))

    Receiver.status = 500
    with pytest.raises(RuntimeError, match=r"checkpoint #2 was refused by .*: HTTP 500"):
        finished_run(4)
    assert len(lineage_checkpoints.read_text().splitlines()) == 2  # the file keeps it

    settings.AGENTOPS_LINEAGE_WEBHOOK_URL = "file:///etc/passwd"
    with pytest.raises(ImproperlyConfigured, match="is not an http"):
        run_checkpoint(run_uuid=run_uuid)


def test_an_exported_trail_proves_itself_with_the_public_key_alone(tmp_path, capsys):
    run_uuid = finished_run(7)
    with transaction.atomic():
        event_append(run_uuid=uuid.uuid4(), kind="other", actor="x", payload={"big": 1e20})
    call_command("lineage_checkpoint", stdout=StringIO())  # more chains in the statement
    output = tmp_path / "trail.json"
    call_command("lineage_export", str(run_uuid), "--output", str(output), stdout=StringIO())
    key = public_key_text(public_key())

    assert lineage_export.main([str(output), "--public-key", key]) == 0
    assert "OK: run" in capsys.readouterr().out

    document = json.loads(output.read_text())
    changed = json.loads(output.read_text())
    changed["events"][3]["canonical"] = changed["events"][3]["canonical"].replace(
        "engine", "mallory"
    )
    cut = {**document, "events": document["events"][:4]}
    other = {**document, "entry_index": document["entry_index"] ^ 1}
    for forged, problem in (
        (changed, "event #4's text does not match its hash"),
        (cut, "the export holds 4 events; the checkpoint counted 7"),
        (other, "the chain's entry is not in the signed checkpoint"),
    ):
        assert problem in lineage_export.export_verify(forged, public_key().public_bytes_raw())
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert lineage_export.export_verify(document, stranger) == [
        "the checkpoint's signature is not valid for this public key"
    ]
    assert lineage_export.main([str(output), "--public-key", "short"]) == 2


def test_export_refuses_a_broken_or_unknown_trail():
    run_uuid = finished_run(4)
    tamper(
        "DELETE FROM lineage_lineageevent WHERE run_uuid = %s AND seq = 4", [run_param(run_uuid)]
    )
    with pytest.raises(CommandError, match="is broken: the trail ends at #3"):
        call_command("lineage_export", str(run_uuid), stdout=StringIO())
    with pytest.raises(CommandError, match="is not a run UUID"):
        call_command("lineage_export", "nope", stdout=StringIO())
    with pytest.raises(CommandError, match="no checkpoint holds the trail"):
        call_command("lineage_export", str(uuid.uuid4()), "--no-checkpoint", stdout=StringIO())


def test_a_missing_key_is_a_warning_at_start_up(settings, tmp_path):
    from lineage.checks import lineage_key_check

    assert lineage_key_check() == []
    settings.AGENTOPS_LINEAGE_SIGNING_KEY = ""
    settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE = tmp_path / "absent"
    (warning,) = lineage_key_check()
    assert warning.id == "lineage.W003" and "no lineage signing key" in warning.msg
    settings.AGENTOPS_LINEAGE_PUBLIC_KEY = public_key_text(public_key_for_tests())
    assert lineage_key_check() == []


def public_key_for_tests():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key()
