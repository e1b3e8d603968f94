"""Chains anchored outside the database: signed checkpoints of every chain's head.

Whoever can write the lineage table can recompute every hash in it, so the hashes alone
prove nothing against them. A checkpoint records each chain's length, last hash and
Merkle root (lineage.merkle), is signed with an Ed25519 key the database never holds,
and is written where the database cannot reach: a JSON-lines file by default, and any
sink a deployment names (``AGENTOPS_LINEAGE_SINK``), such as ``WebhookSink``. Anyone
with the public key can check a checkpoint; only the key's holder can make one.

One line per statement::

    {"signed": {"format", "number", "previous", "at", "reason", "complete", "size",
                "root"},
     "chains": [{"run", "size", "head", "root", "final"}
               | {"run", "size", "head", "finding", "broken": true}, ...],
     "key": "<key id>", "signature": "<base64 Ed25519 over the canonical signed part>"}

``signed.root`` is the Merkle root over the ``chains`` entries (each entry's canonical
JSON is a leaf), so one chain's entry can be shown with a path to the signed root,
without the rest (``lineage.export``). ``previous`` is the SHA-256 of the previous
statement's signed part: statements cut from the middle of the log are found. A
statement is ``complete`` when, with the statements before it, it lists every chain as
the database held them when it was made (the periodic checkpoint); a run's end writes
one for that run alone. A chain a checkpoint found broken is not sealed: it is listed
with ``broken: true`` and the first finding, and from then on the log says so for good,
whatever the chain later holds (a repair after the fact is a forgery).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import itertools
import json
import logging
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from agentops import background
from lineage.afterend import TERMINAL_KINDS
from lineage.merkle import leaf_hash, tree_root
from lineage.models import GENESIS_HASH, LineageEvent
from lineage.services import json_canonical
from lineage.verification import (
    Anchor,
    ChainReport,
    chain_check,
    row_columns,
    rows_normalised,
)

logger = logging.getLogger("agentops.lineage")

FORMAT = "agentops-lineage-checkpoint/1"


# Keys ------------------------------------------------------------------------------


def key_decode(name: str, text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ImproperlyConfigured(
            f"{name} is not an Ed25519 key: expected 32 bytes in base64 (44 characters)"
        )
    return raw


def key_encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def new_seed() -> bytes:
    """A new Ed25519 private key's 32-byte seed (``key_encode`` writes it as the settings
    take it)."""
    return Ed25519PrivateKey.generate().private_bytes_raw()


def signing_key() -> Ed25519PrivateKey:
    """The key that signs checkpoints: ``AGENTOPS_LINEAGE_SIGNING_KEY`` (base64 of the
    32-byte seed), else the file ``AGENTOPS_LINEAGE_SIGNING_KEY_FILE``; in development
    (DEBUG) that file is made on first use, as SECRET_KEY's is. Never in the database."""
    value = getattr(settings, "AGENTOPS_LINEAGE_SIGNING_KEY", "")
    if value:
        return Ed25519PrivateKey.from_private_bytes(
            key_decode("AGENTOPS_LINEAGE_SIGNING_KEY", value)
        )
    path = Path(settings.AGENTOPS_LINEAGE_SIGNING_KEY_FILE)
    if not path.exists():
        if not settings.DEBUG:
            raise ImproperlyConfigured(
                "no lineage signing key: set AGENTOPS_LINEAGE_SIGNING_KEY, or put one in"
                f" AGENTOPS_LINEAGE_SIGNING_KEY_FILE ({path}); `manage.py lineage_checkpoint"
                " --new-key` prints one (with DEBUG on, one is made for you)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Created private and exclusively: of two processes starting together, one
            # writes the key and the other reads that same key.
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            seed = new_seed()
            with os.fdopen(descriptor, "w") as handle:
                handle.write(key_encode(seed) + "\n")
    return Ed25519PrivateKey.from_private_bytes(
        key_decode(f"AGENTOPS_LINEAGE_SIGNING_KEY_FILE ({path})", path.read_text())
    )


def public_key() -> Ed25519PublicKey:
    """The key that checks checkpoints: ``AGENTOPS_LINEAGE_PUBLIC_KEY`` where set (an
    auditor's machine, which holds no signing key), else the signing key's."""
    value = getattr(settings, "AGENTOPS_LINEAGE_PUBLIC_KEY", "")
    if value:
        return Ed25519PublicKey.from_public_bytes(key_decode("AGENTOPS_LINEAGE_PUBLIC_KEY", value))
    return signing_key().public_key()


def public_key_text(key: Ed25519PublicKey) -> str:
    return key_encode(key.public_bytes_raw())


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


def public_key_parse(text: str, *, name: str = "the public key") -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(key_decode(name, text))


# Sinks ------------------------------------------------------------------------------


class FileSink:
    """An append-only JSON-lines file (``AGENTOPS_LINEAGE_CHECKPOINT_FILE``), each
    statement appended under an exclusive lock, so that statements from several
    processes on one machine are numbered and linked in the order they were written."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path or settings.AGENTOPS_LINEAGE_CHECKPOINT_FILE)

    def append(self, build: Callable[[dict | None], dict]) -> dict:
        """Append ``build(last statement or None)``; returns it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            line = build(self.last(descriptor))
            os.write(descriptor, (json_canonical(line) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)  # closing releases the lock
        return line

    def last(self, descriptor: int) -> dict | None:
        end = os.lseek(descriptor, 0, os.SEEK_END)
        if end == 0:
            return None
        chunk, position = b"", end
        while position > 0 and chunk.count(b"\n") < 2:
            step = min(65536, position)
            position -= step
            chunk = os.pread(descriptor, step, position) + chunk
        if not chunk.endswith(b"\n"):
            raise RuntimeError(
                f"the checkpoint file {self.path} ends in an unfinished line: repair it"
                " (keep a copy) before more checkpoints are written"
            )
        text = chunk[:-1].rsplit(b"\n", 1)[-1]
        try:
            return json.loads(text)
        except ValueError:
            raise RuntimeError(
                f"the last line of the checkpoint file {self.path} is not JSON"
            ) from None

    def holds(self, offset: int, line: bytes) -> bool:
        """Whether ``line`` still ends at ``offset`` (the file was not rewritten)."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset - len(line))
                return handle.read(len(line)) == line
        except (FileNotFoundError, OSError, ValueError):
            return False

    def lines(self, offset: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset after it, line) for each whole line from ``offset``."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    return  # being written: read next time
                offset += len(line)
                yield offset, line


class WebhookSink(FileSink):
    """The file, and each statement POSTed as JSON to ``AGENTOPS_LINEAGE_WEBHOOK_URL``
    (a log service, an object store's gateway, another organisation): a copy that
    nobody with rights on this machine alone can rewrite. The file stays the local copy
    the verifier reads; a failed POST is an error the caller logs."""

    def __init__(self, path: Path | str | None = None, url: str | None = None) -> None:
        super().__init__(path)
        self.url = url or getattr(settings, "AGENTOPS_LINEAGE_WEBHOOK_URL", "")
        if not self.url.startswith(("https://", "http://")):
            raise ImproperlyConfigured(
                f"AGENTOPS_LINEAGE_WEBHOOK_URL={self.url!r} is not an http(s) URL"
            )

    def append(self, build: Callable[[dict | None], dict]) -> dict:
        line = super().append(build)
        request = urllib.request.Request(
            self.url,
            data=json_canonical(line).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError as error:
            raise RuntimeError(
                f"checkpoint #{line['signed']['number']} was not delivered to {self.url}: {error}"
            ) from None
        if not 200 <= status < 300:
            raise RuntimeError(
                f"checkpoint #{line['signed']['number']} was refused by {self.url}: HTTP {status}"
            )
        return line


def sink_configured() -> FileSink:
    path = getattr(settings, "AGENTOPS_LINEAGE_SINK", "") or "lineage.anchoring.FileSink"
    try:
        sink_class = import_string(path)
    except ImportError as error:
        raise ImproperlyConfigured(
            f"AGENTOPS_LINEAGE_SINK={path!r} cannot be imported: {error}"
        ) from None
    return sink_class()


# Reading the log -------------------------------------------------------------------


@dataclass
class Ledger:
    """What the checkpoint log says: the longest anchor of each chain (a later, shorter
    one is kept beside it, as ``Anchor.earlier``), the chains a checkpoint saw broken,
    and the problems with the log itself (a bad signature, a statement missing, an
    unfinished last line, no complete statement for too long)."""

    anchors: dict[str, Anchor] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # run -> what the checkpoint saw
    statement_problems: list[str] = field(default_factory=list)
    tail_problems: list[str] = field(default_factory=list)  # remade at each load
    statements: int = 0
    last: dict | None = None
    complete_at: datetime | None = None
    complete_number: int = 0
    grace: float = 0.0

    @property
    def problems(self) -> list[str]:
        return [*self.statement_problems, *self.tail_problems]

    @property
    def unanchored_before(self) -> datetime | None:
        if self.complete_at is None:
            return None
        return self.complete_at - timedelta(seconds=self.grace)

    def read(self, raw: bytes, key: Ed25519PublicKey, where: str) -> None:
        """Check one statement and take in its anchors (none, if it fails a check)."""
        try:
            line = json.loads(raw)
            signed, chains = line["signed"], line["chains"]
            number = signed["number"]
        except (ValueError, KeyError, TypeError):
            self.statement_problems.append(f"{where} is not a checkpoint statement")
            return
        try:
            key.verify(base64.b64decode(line["signature"]), json_canonical(signed).encode())
        except (InvalidSignature, KeyError, ValueError, TypeError):
            self.statement_problems.append(
                f"checkpoint #{number} ({where}) does not carry a valid signature by key"
                f" {key_id(key)}: it was forged or altered, or signed by another key"
            )
            return
        expected = self.last["signed"]["number"] + 1 if self.last else 1
        previous = statement_digest(self.last) if self.last else GENESIS_HASH
        if number != expected or signed.get("previous") != previous:
            self.statement_problems.append(
                f"checkpoint #{number} ({where}) does not follow #{expected - 1}: statements"
                " between them were removed, or the log was spliced"
            )
        root = tree_root(leaf_hash(json_canonical(entry).encode()) for entry in chains)
        if root.hex() != signed.get("root") or len(chains) != signed.get("size"):
            self.statement_problems.append(
                f"checkpoint #{number} ({where}) lists chains it did not sign"
            )
            return
        for entry in chains:
            if entry.get("broken"):
                self.broken.setdefault(
                    entry["run"],
                    f"checkpoint #{number} of {signed['at']} saw this trail broken at"
                    f" {entry['size']} events and refused to seal it: {entry['finding']}",
                )
                continue
            self.anchor_take(
                Anchor(
                    run_uuid=entry["run"],
                    size=entry["size"],
                    head=entry["head"],
                    root=entry["root"],
                    final=entry["final"],
                    number=number,
                    at=signed["at"],
                )
            )
        if signed.get("complete"):
            self.complete_at = datetime.fromisoformat(signed["at"])
            self.complete_number = number
        self.last = line
        self.statements += 1

    def anchor_take(self, new: Anchor) -> None:
        """Keep the chain's longest anchor: a checkpoint that read the chain before it
        grew may be written after one that read it later (a periodic one racing the
        run's end), and must not lower its length nor unseal its end."""
        old = self.anchors.get(new.run_uuid)
        if old is None:
            self.anchors[new.run_uuid] = new
        elif new.size > old.size:
            self.anchors[new.run_uuid] = replace(
                new, final=new.final or old.final, earlier=old.earlier
            )
        elif new.size < old.size:
            self.anchors[new.run_uuid] = replace(old, earlier=(*old.earlier, new))
        elif new.head != old.head:
            self.statement_problems.append(
                f"checkpoints #{old.number} and #{new.number} sign run {new.run_uuid} at"
                f" {new.size} events with different last events: one of them was made from"
                " a changed trail"
            )
        elif new.final and not old.final:
            self.anchors[new.run_uuid] = replace(new, earlier=old.earlier)


def statement_digest(line: dict) -> str:
    return hashlib.sha256(json_canonical(line["signed"]).encode()).hexdigest()


# Parsed logs, by file and key: (inode, offset read to, the last line read, the ledger).
# A log only grows, so each read takes in the lines added since; if the line before the
# offset is not the one read there, the file was rewritten, and it is read from the top.
_ledgers: dict[tuple[str, str], tuple[int, int, bytes, Ledger]] = {}


def ledger_load(*, sink: FileSink | None = None, key: Ed25519PublicKey | None = None) -> Ledger:
    """The checkpoint log, every statement's signature checked with ``key`` (by
    default the configured public key). Without a key to check with, no anchors and
    a problem saying so, unless the log is empty (a trail that was never anchored)."""
    sink = sink or sink_configured()
    grace = float(getattr(settings, "AGENTOPS_LINEAGE_CHECKPOINT_GRACE", 300.0))
    if key is None:
        try:
            key = public_key()
        except ImproperlyConfigured as error:
            ledger = Ledger(grace=grace)
            if sink.path.exists() and sink.path.stat().st_size:
                ledger.statement_problems.append(f"the checkpoints cannot be checked: {error}")
            return ledger
    cache_key = (str(sink.path), key_id(key))
    try:
        inode = sink.path.stat().st_ino
    except FileNotFoundError:
        inode = 0
    cached = _ledgers.get(cache_key)
    if cached is None or cached[0] != inode or not sink.holds(cached[1], cached[2]):
        cached = (inode, 0, b"", Ledger())
    _, offset, last_raw, ledger = cached
    ledger.grace = grace
    offset, last_raw = ledger_read_lines(ledger, sink, key, offset, last_raw)
    if sink_tail(sink, offset):
        # Perhaps a statement being written: wait for its writer's lock, read on.
        with sink_shared_lock(sink):
            offset, last_raw = ledger_read_lines(ledger, sink, key, offset, last_raw)
            tail = sink_tail(sink, offset)
    else:
        tail = 0
    _ledgers[cache_key] = (inode, offset, last_raw, ledger)
    ledger.tail_problems = []
    if tail:
        ledger.tail_problems.append(
            f"{sink.path.name} ends in an unfinished line ({tail} bytes after statement"
            f" #{ledger.statements}): a statement was cut or its end altered, and no"
            " checkpoint can be written after it until the file is repaired (keep a copy)"
        )
    # The periodic checkpoint runs every five minutes (tasks migration 0018, Celery
    # beat): a log whose last complete statement is older than the setting has stopped
    # being written, and says so once it holds a complete statement at all (a deployment
    # that never ran the periodic checkpoint is not told it stopped).
    max_age = settings.AGENTOPS_LINEAGE_CHECKPOINT_MAX_AGE
    if max_age > 0 and ledger.complete_at is not None:
        age = (timezone.now() - ledger.complete_at).total_seconds()
        if age > max_age:
            ledger.tail_problems.append(
                f"the last complete checkpoint (#{ledger.complete_number}, of"
                f" {ledger.complete_at.isoformat()}) is {age / 60:.0f} minutes old: the"
                " periodic checkpoint (`manage.py lineage_checkpoint`) has stopped, so"
                " changes since then are not sealed"
            )
    return ledger


def ledger_read_lines(
    ledger: Ledger, sink: FileSink, key: Ed25519PublicKey, offset: int, last_raw: bytes
) -> tuple[int, bytes]:
    for number, (after, raw) in enumerate(sink.lines(offset), start=ledger.statements + 1):
        ledger.read(raw, key, f"line {number} of {sink.path.name}")
        offset, last_raw = after, raw
    return offset, last_raw


def sink_tail(sink: FileSink, offset: int) -> int:
    """How many bytes follow the last whole line read (at ``offset``)."""
    try:
        return max(sink.path.stat().st_size - offset, 0)
    except FileNotFoundError:
        return 0


class sink_shared_lock:  # a context manager read as a phrase: with sink_shared_lock(..)
    """A shared lock on the sink's file: FileSink.append writes under an exclusive one."""

    def __init__(self, sink: FileSink) -> None:
        self.path = sink.path
        self.descriptor: int | None = None

    def __enter__(self) -> None:
        try:
            self.descriptor = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        fcntl.flock(self.descriptor, fcntl.LOCK_SH)

    def __exit__(self, *exc: object) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)


# Writing checkpoints --------------------------------------------------------------


def chain_entry(run_uuid: str, hashes: list[str], kinds: set[str]) -> dict[str, Any]:
    return {
        "run": run_uuid,
        "size": len(hashes),
        "head": hashes[-1],
        "root": tree_root(leaf_hash(bytes.fromhex(h)) for h in hashes).hex(),
        "final": bool(kinds & TERMINAL_KINDS),
    }


def statement_append(
    *, chains: list[dict[str, Any]], reason: str, complete: bool, sink: FileSink | None = None
) -> dict:
    """Sign and write one statement over ``chains``; returns its line."""
    key = signing_key()
    sink = sink or sink_configured()
    chains = sorted(chains, key=lambda entry: entry["run"])
    root = tree_root(leaf_hash(json_canonical(entry).encode()) for entry in chains)

    def build(last: dict | None) -> dict:
        signed = {
            "format": FORMAT,
            "number": last["signed"]["number"] + 1 if last else 1,
            "previous": statement_digest(last) if last else GENESIS_HASH,
            "at": timezone.now().astimezone(UTC).isoformat(timespec="microseconds"),
            "reason": reason,
            "complete": complete,
            "size": len(chains),
            "root": root.hex(),
        }
        signature = key.sign(json_canonical(signed).encode())
        return {
            "signed": signed,
            "chains": chains,
            "key": key_id(key.public_key()),
            "signature": base64.b64encode(signature).decode(),
        }

    return sink.append(build)


@dataclass
class CheckpointResult:
    line: dict | None
    anchored: int = 0
    refused: list[Any] = field(default_factory=list)  # ChainReports of broken chains


def chains_read(run_uuids: list[str] | None) -> Iterator[tuple[uuid.UUID, list[tuple]]]:
    """(run, rows) for the given chains (all, if None), rows as ``row_columns``."""
    connection = connections["default"]
    table = connection.ops.quote_name(LineageEvent._meta.db_table)
    field_ = LineageEvent._meta.get_field("run_uuid")
    batches: list[list[str] | None] = (
        [None]
        if run_uuids is None
        else [run_uuids[i : i + 500] for i in range(0, len(run_uuids), 500)]
    )
    for batch in batches:
        sql, params = f"SELECT {row_columns(connection.vendor)} FROM {table}", []
        if batch is not None:
            sql += f" WHERE run_uuid IN ({', '.join('%s' for _ in batch)})"
            params = [field_.get_db_prep_value(uuid.UUID(run), connection) for run in batch]
        # A server-side cursor on PostgreSQL: the first checkpoint reads the whole trail,
        # which need not fit in memory; one chain at a time does.
        with connection.chunked_cursor() as cursor:
            cursor.execute(sql + " ORDER BY run_uuid, seq", params)
            rows = itertools.chain.from_iterable(iter(lambda: cursor.fetchmany(2_000), []))
            rows = rows_normalised(rows, connection.vendor)
            for run, chain_rows in itertools.groupby(rows, key=lambda row: row[1]):
                yield uuid.UUID(str(run)), list(chain_rows)


def heads_read() -> dict[str, tuple[int, str]]:
    """Every chain's (length, last hash), by run UUID."""
    connection = connections["default"]
    table = connection.ops.quote_name(LineageEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT e.run_uuid, e.seq, e.hash FROM {table} e JOIN"
            f" (SELECT run_uuid, MAX(seq) AS seq FROM {table} GROUP BY run_uuid) h"
            " ON e.run_uuid = h.run_uuid AND e.seq = h.seq"
        )
        return {str(uuid.UUID(str(run))): (seq, digest) for run, seq, digest in cursor}


def chains_anchor(
    run_uuids: list[str] | None, *, reason: str, complete: bool, ledger: Ledger
) -> CheckpointResult:
    """Check the chains against their last anchors, and sign the new heads of those
    that hold; a chain that fails is left out (its report in ``refused``), so a change
    is never sealed as if it were the record."""
    entries, refused = [], []
    for run_uuid, rows in chains_read(run_uuids):
        key = str(run_uuid)
        anchor = ledger.anchors.get(key)
        try:
            report = chain_check(
                run_uuid,
                rows,
                anchor=anchor,
                unanchored_before=ledger.unanchored_before,
                seen_broken=ledger.broken.get(key, ""),
            )
        except Exception as error:  # one chain's content never stops the others' seal
            logger.exception("lineage: run %s could not be checked", run_uuid)
            report = ChainReport(run_uuid, len(rows))
            report.found("changed", None, f"the trail could not be checked: {error!r}")
        if not report.intact:
            refused.append(report)
            logger.error(
                "lineage: run %s not checkpointed, its trail is broken: %s",
                run_uuid,
                report.problem,
            )
            if key not in ledger.broken:
                # Signed into the statement: the refusal is evidence, kept for good.
                entries.append(
                    {
                        "run": key,
                        "size": len(rows),
                        "head": rows[-1][-1] if rows else GENESIS_HASH,
                        "finding": report.problem,
                        "broken": True,
                    }
                )
            continue
        entry = chain_entry(str(run_uuid), [row[-1] for row in rows], {row[4] for row in rows})
        if anchor and (anchor.size, anchor.head, anchor.final) == (
            entry["size"],
            entry["head"],
            entry["final"],
        ):
            continue
        entries.append(entry)
    if not entries and not complete:
        return CheckpointResult(None, 0, refused)
    line = statement_append(chains=entries, reason=reason, complete=complete)
    return CheckpointResult(line, sum(not entry.get("broken") for entry in entries), refused)


def run_checkpoint(*, run_uuid: uuid.UUID) -> CheckpointResult:
    """Sign the run's chain as it stands (when it ended, it is sealed: ``final``)."""
    return chains_anchor([str(run_uuid)], reason="run-end", complete=False, ledger=ledger_load())


def trail_checkpoint() -> CheckpointResult:
    """Sign every chain that grew since its last checkpoint, as one complete statement
    (the periodic checkpoint: ``manage.py lineage_checkpoint``)."""
    ledger = ledger_load()
    heads = heads_read()
    anchors = ledger.anchors
    changed = [
        run
        for run, head in heads.items()
        if run not in anchors or (anchors[run].size, anchors[run].head) != head
    ]
    # One ordered pass beats thousands of IN-lists when most of the trail is new.
    selection = None if len(changed) > len(heads) // 2 else changed
    if selection is not None and not selection:
        return CheckpointResult(statement_append(chains=[], reason="periodic", complete=True))
    result = chains_anchor(selection, reason="periodic", complete=True, ledger=ledger)
    return result


def run_seal_on_commit(*, run_uuid: uuid.UUID) -> None:
    """Checkpoint the run's trail once the transaction that ends it commits. A failure
    (no key, a sink down) is logged and never undoes the run's end: the periodic
    checkpoint takes the chain in."""

    def seal() -> None:
        try:
            run_checkpoint(run_uuid=run_uuid)
        except ImproperlyConfigured as error:
            logger.error(
                "lineage: the trail of run %s could not be checkpointed: %s", run_uuid, error
            )
        except Exception:
            logger.exception("lineage: the trail of run %s could not be checkpointed", run_uuid)

    transaction.on_commit(lambda: background.soon(seal))
