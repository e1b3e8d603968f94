"""One run's trail as a file an auditor can check with nothing but the public key.

The file holds the run's events (each with the exact text its hash covers), the signed
checkpoint statement that sealed the chain, the chain's entry in that statement and the
Merkle path from the entry to the statement's signed root (RFC 9162 inclusion proof).
``export_verify`` recomputes every hash and the chain's Merkle root, checks the path and
the signature: the trail is complete (as long as the checkpoint counted, ending where it
sealed) and unchanged, or it says what is wrong.

The checking half imports neither Django nor the database:
``python -m lineage.export FILE --public-key KEY`` runs it anywhere the package and
``cryptography`` are installed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from lineage.afterend import RunEnd, record_of
from lineage.merkle import inclusion_path, inclusion_verify, leaf_hash, tree_root

FORMAT = "agentops-lineage-export/1"
GENESIS_HASH = "0" * 64
# The fields each exported event carries: the text hashed (version 1), or the columns
# it was rebuilt from (version 0).
EVENT_FIELDS = {
    1: ("seq", "prev_hash", "hash", "hash_version", "canonical"),
    0: ("seq", "prev_hash", "hash", "hash_version", "at", "kind", "actor", "payload"),
}


def canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


class ExportRefused(Exception):
    """The run's trail cannot be exported as proven: no checkpoint, or it is broken."""


def run_export(*, run_uuid: uuid.UUID, checkpoint: bool = True) -> dict[str, Any]:
    """The run's trail as far as its latest checkpoint sealed it, with the proof. With
    ``checkpoint``, the chain is checkpointed first, so the export reaches its end."""
    from lineage.anchoring import FileSink, ledger_load, run_checkpoint, sink_configured
    from lineage.models import LineageEvent
    from lineage.verification import run_verify

    if checkpoint:
        result = run_checkpoint(run_uuid=run_uuid)
        if result.refused:
            raise ExportRefused(
                f"the trail of run {run_uuid} is broken: {result.refused[0].problem}"
            )
    ledger = ledger_load()
    report = run_verify(run_uuid=run_uuid, ledger=ledger)
    if not report.intact:
        raise ExportRefused(f"the trail of run {run_uuid} is broken: {report.problem}")
    anchor = report.anchor
    if anchor is None:
        raise ExportRefused(
            f"no checkpoint holds the trail of run {run_uuid}: run `manage.py"
            " lineage_checkpoint` (or export with the checkpoint made first)"
        )
    sink: FileSink = sink_configured()
    line = next(
        (line for line in statements(sink) if line["signed"]["number"] == anchor.number), None
    )
    if line is None:
        raise ExportRefused(f"checkpoint #{anchor.number} is not in {sink.path}")
    entries = line["chains"]
    index = next(i for i, entry in enumerate(entries) if entry["run"] == str(run_uuid))
    leaves = [leaf_hash(canonical(entry).encode()) for entry in entries]
    events = LineageEvent.objects.filter(run_uuid=run_uuid, seq__lte=anchor.size).order_by("seq")
    return {
        "format": FORMAT,
        "run": str(run_uuid),
        "events": [
            {
                "seq": event.seq,
                "prev_hash": event.prev_hash,
                "hash": event.hash,
                "hash_version": event.hash_version,
                "canonical": event.canonical,
                # Only the old form (version 0) is hashed over these: chosen by the
                # version the row claims, so a row that claims the wrong one is
                # exported as it is and fails its hash, never the export.
                **(
                    {}
                    if event.hash_version == 1
                    else {
                        "at": event.at.isoformat(),
                        "kind": event.kind,
                        "actor": event.actor,
                        "payload": event.payload,
                    }
                ),
            }
            for event in events
        ],
        "checkpoint": {key: line[key] for key in ("signed", "key", "signature")},
        "entry": entries[index],
        "entry_index": index,
        "entry_path": [node.hex() for node in inclusion_path(index, leaves)],
    }


def statements(sink: Any) -> Iterator[dict[str, Any]]:
    """The sink's statements that parse (the verifier reports the others)."""
    for _, raw in sink.lines():
        try:
            line = json.loads(raw)
            line["signed"]["number"]
        except (ValueError, KeyError, TypeError):
            continue
        yield line


def event_text(run: str, event: dict[str, Any]) -> str:
    """The text an exported event's hash covers."""
    if event.get("hash_version") == 1:
        return event["canonical"]
    from datetime import UTC, datetime

    document = {
        "run": run,
        "seq": event["seq"],
        "at": datetime.fromisoformat(event["at"])
        .astimezone(UTC)
        .isoformat(timespec="microseconds"),
        "kind": event["kind"],
        "actor": event["actor"],
        "payload": event["payload"],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def export_verify(document: dict[str, Any], public_key: bytes) -> list[str]:
    """What is wrong with an exported trail, checked with the 32-byte Ed25519 public
    key alone; empty when it is complete and unchanged."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        run, events = document["run"], document["events"]
        checkpoint, entry = document["checkpoint"], document["entry"]
        signed = checkpoint["signed"]
        index, path = document["entry_index"], [bytes.fromhex(h) for h in document["entry_path"]]
    except (KeyError, TypeError, ValueError):
        return ["this is not a lineage export"]
    if document.get("format") != FORMAT:
        return [f"this export's format is {document.get('format')!r}, not {FORMAT}"]
    problems = []
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            base64.b64decode(checkpoint["signature"]), canonical(signed).encode()
        )
    except (InvalidSignature, ValueError, binascii.Error):
        problems.append("the checkpoint's signature is not valid for this public key")
    if not inclusion_verify(
        index,
        signed["size"],
        leaf_hash(canonical(entry).encode()),
        path,
        bytes.fromhex(signed["root"]),
    ):
        problems.append("the chain's entry is not in the signed checkpoint")
    if entry.get("run") != run:
        problems.append(f"the checkpoint's entry is for run {entry.get('run')}, not {run}")
    prev, hashes, end = GENESIS_HASH, [], RunEnd()
    for number, event in enumerate(events, start=1):
        seq = event.get("seq") if isinstance(event, dict) else None
        if seq != number:
            problems.append(f"event #{number} is numbered {seq}: events are missing or reordered")
        if not isinstance(event, dict):
            problems.append(f"event #{number} is not an event")
            continue
        version = event.get("hash_version")
        missing = [name for name in EVENT_FIELDS.get(version, ()) if name not in event]
        if version not in EVENT_FIELDS or missing:
            problems.append(
                f"event #{seq} lacks {', '.join(missing)}"
                if missing
                else f"event #{seq} names an unknown hash version {version!r}"
            )
            prev = event.get("hash")
            hashes.append(str(prev))
            continue
        if event["prev_hash"] != prev:
            problems.append(f"event #{seq} does not link to the event before it")
        try:
            text = event_text(run, event)
            digest = hashlib.sha256((str(event["prev_hash"]) + text).encode()).hexdigest()
        except (ValueError, TypeError, AttributeError):
            text, digest = "", None
        if digest != event["hash"]:
            problems.append(f"event #{seq}'s text does not match its hash")
        if version == 1:
            try:
                written = json.loads(text)
            except ValueError:
                written = None
            if not isinstance(written, dict):
                problems.append(f"event #{seq}'s text is not an event")
                written = {}
            elif (written.get("run"), written.get("seq")) != (run, seq):
                problems.append(
                    f"event #{seq} was written as #{written.get('seq')} of run {written.get('run')}"
                )
            kind = written.get("kind")
        else:
            if event.get("canonical"):
                problems.append(f"event #{seq} claims the old hash form but holds new text")
            kind = event.get("kind")
        record = record_of(version, event.get("canonical", ""), event.get("payload"))
        if not end.allows(seq, str(kind), record):
            problems.append(f"event #{seq} ({kind}) follows the run's end at #{end.at}")
        prev = event["hash"]
        hashes.append(event["hash"])
    if len(events) != entry.get("size"):
        problems.append(
            f"the export holds {len(events)} events; the checkpoint counted {entry.get('size')}"
        )
    elif hashes and hashes[-1] != entry.get("head"):
        problems.append("the last event is not the one the checkpoint sealed")
    try:
        root = tree_root(leaf_hash(bytes.fromhex(h)) for h in hashes).hex()
    except (ValueError, TypeError):
        root = ""
    if root != entry.get("root"):
        problems.append("the events' Merkle root is not the one the checkpoint signed")
    if entry.get("broken"):
        problems.append("the checkpoint saw this trail broken and did not seal it")
    if entry.get("final") and end.at is None:
        problems.append("the checkpoint sealed the run as ended, but no event ends it")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lineage.export", description="Check an exported lineage trail."
    )
    parser.add_argument("file", help="the export (JSON) to check")
    parser.add_argument("--public-key", required=True, help="the Ed25519 public key (base64)")
    options = parser.parse_args(argv)
    try:
        key = base64.b64decode(options.public_key, validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        print("--public-key is not an Ed25519 public key (32 bytes in base64)", file=sys.stderr)
        return 2
    try:
        with open(options.file, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        print(f"{options.file}: cannot be read as JSON: {error}", file=sys.stderr)
        return 2
    problems = export_verify(document, key)
    if problems:
        print(f"BROKEN: run {document.get('run')}:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    signed = document["checkpoint"]["signed"]
    if document["entry"]["final"]:
        print(
            f"OK: run {document['run']}: {len(document['events'])} events, complete and"
            f" unchanged as checkpoint #{signed['number']} of {signed['at']} sealed them"
            " (the run had ended)."
        )
    else:
        print(
            f"OK: run {document['run']}: {len(document['events'])} events, unchanged as far"
            f" as checkpoint #{signed['number']} of {signed['at']}; the run had not ended"
            " then, so later events are not in this export."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
