"""Checking the trail: every event recomputed from the bytes it was hashed over, every
chain held against the latest signed checkpoint (lineage.anchoring), every run reported
by itself, whatever another run's chain holds.

What each finding means, in the words the pages and ``verify_lineage`` use:

- changed: an event's text no longer matches its hash, a column shown on the pages
  (kind, actor, time) disagrees with the text that was hashed, or an event does not
  link to the one before it;
- removed: numbers are missing from the chain, or a checkpointed chain is gone;
- reordered: an event stands at a number other than the one it was written with;
- moved: an event stands in another run's chain than the one it was written for;
- truncated: the chain is shorter than its checkpoint counted;
- rewritten: the chain is whole, but its event at the checkpointed length is not the
  one signed (its hashes were recomputed after a change);
- appended: events follow the run's end (its terminal event, or its final checkpoint)
  that the run did not leave open (lineage.afterend);
- broken: a signed checkpoint saw the chain broken and refused to seal it; reported for
  good, whatever the chain holds now (a repair after the fact is a forgery);
- unanchored: a chain that began before the last full checkpoint, which does not list
  it (made later with old dates, such as a cut tail moved to a fresh run UUID).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from django.db import connections, transaction
from django.utils.dateparse import parse_datetime

# What may follow a run's end: one rule, shared with the export's verifier.
from lineage.afterend import KEPT_KINDS, TERMINAL_KINDS, RunEnd, record_of
from lineage.models import GENESIS_HASH, HASH_CANONICAL, HASH_COLUMNS, LineageEvent

END_WATCHED = KEPT_KINDS | TERMINAL_KINDS

# A chain with this many findings is reported with the first of them: past that, one
# more line tells an auditor nothing the first did not.
FINDINGS_KEPT = 20


@dataclass(frozen=True)
class Anchor:
    """A chain as a signed checkpoint saw it."""

    run_uuid: str
    size: int
    head: str
    root: str
    final: bool
    number: int  # the statement's number in the checkpoint log
    at: str
    # Shorter anchors of the chain signed later (a checkpoint that read the chain before
    # it grew): still checked, never taken for the chain's length.
    earlier: tuple[Anchor, ...] = ()


@dataclass(frozen=True)
class Finding:
    what: str
    seq: int | None
    text: str
    event_id: int | None = None


@dataclass
class ChainReport:
    run_uuid: uuid.UUID
    events: int
    findings: list[Finding] = field(default_factory=list)
    anchor: Anchor | None = None

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def broken_seq(self) -> int | None:
        return self.findings[0].seq if self.findings else None

    @property
    def broken_event_id(self) -> int | None:
        return self.findings[0].event_id if self.findings else None

    @property
    def problem(self) -> str:
        return self.findings[0].text if self.findings else ""

    def found(self, what: str, seq: int | None, text: str, event_id: int | None = None) -> None:
        if len(self.findings) < FINDINGS_KEPT:
            self.findings.append(Finding(what, seq, text, event_id))


@dataclass
class TrailReport:
    events: int = 0
    chains: int = 0
    broken: list[ChainReport] = field(default_factory=list)
    anchored: int = 0
    log_problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.broken and not self.log_problems


# The columns a check reads, in this order. The time as the canonical text writes it (so
# it is compared as text, not parsed), and the jsonb payload only for the events hashed
# over it (version 0): it is most of a row's bytes, and version 1 never needs it.
AT_TEXT = {
    "postgresql": """to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""",
    "sqlite": "at",  # text already; made canonical by rows_normalised
}


# The payload as text on every driver (a raw psycopg cursor would parse jsonb, and a
# payload that is a JSON string would then be parsed twice).
PAYLOAD_TEXT = {"postgresql": "payload::text", "sqlite": "payload"}


def row_columns(vendor: str) -> str:
    return (
        f"id, run_uuid, seq, {AT_TEXT[vendor]}, kind, actor, canonical, hash_version,"
        f" CASE WHEN hash_version = {HASH_COLUMNS} THEN {PAYLOAD_TEXT[vendor]} END,"
        " prev_hash, hash"
    )


def at_text(value: Any) -> str:
    """A time as the canonical text writes it, from what a driver gives (SQLite: text
    in UTC, without the fraction when it is zero)."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def rows_normalised(rows: Iterable[tuple], vendor: str) -> Iterable[tuple]:
    if vendor == "postgresql":
        return rows
    return ((*row[:3], at_text(row[3]), *row[4:]) for row in rows)


def chain_check(
    run_uuid: uuid.UUID,
    rows: Iterable[tuple],
    *,
    anchor: Anchor | None = None,
    unanchored_before: datetime | None = None,
    seen_broken: str = "",
) -> ChainReport:
    """Check one chain's rows (``row_columns``, in seq order): each event against its
    own text and the one before it, then the chain against its checkpoint. Goes on past
    a broken event, taking the stored hash as the next link, so one change is one
    finding and later changes are found too."""
    report = ChainReport(run_uuid, 0, anchor=anchor)
    run_text = str(run_uuid)
    sha256, quoted = hashlib.sha256, encode_basestring_ascii
    prev, expected, first_at, last_seq = GENESIS_HASH, 1, None, 0
    hash_at_anchor, seen_canonical, end = None, False, RunEnd()
    anchor_size = anchor.size if anchor else -1
    # Earlier, shorter checkpoints of the chain (lineage.anchoring keeps the longest):
    # each one's event must still stand at its length.
    earlier = {stale.size: stale for stale in anchor.earlier} if anchor else {}
    if seen_broken:
        report.found("broken", None, seen_broken)
    for pk, _, seq, at, kind, actor, canonical, version, payload, prev_hash, digest in rows:
        report.events += 1
        if first_at is None:
            first_at = at
        if seq != expected:
            missing = f"#{expected}" if seq == expected + 1 else f"#{expected} to #{seq - 1}"
            report.found("removed", seq, f"events {missing} are missing before #{seq}", pk)
        elif prev_hash != prev:
            report.found(
                "changed",
                seq,
                f"#{seq} does not link to the event before it: one of them was changed or replaced",
                pk,
            )
        if version == HASH_CANONICAL:
            seen_canonical = True
            if sha256((prev_hash + canonical).encode()).hexdigest() != digest:
                report.found("changed", seq, f"#{seq}'s text does not match its hash", pk)
            # The text is canonical (sorted keys, no spaces): what the columns show must
            # be its beginning and its end, word for word. Cheaper than parsing it; only a
            # mismatch is parsed, to say what differs.
            elif not (
                canonical.startswith(
                    f'{{"actor":{quoted(actor)},"at":"{at}","kind":{quoted(kind)},"payload":'
                )
                and canonical.endswith(f',"run":"{run_text}","seq":{seq}}}')
            ):
                columns_compare(report, canonical, pk, seq, at, kind, actor, run_text)
        elif version == HASH_COLUMNS:
            if seen_canonical:
                report.found(
                    "changed", seq, f"#{seq} claims the old hash form after the new one", pk
                )
            if canonical:
                report.found(
                    "changed", seq, f"#{seq} claims the old hash form but holds new text", pk
                )
            if not old_hash_holds(run_uuid, seq, at, kind, actor, payload, prev_hash, digest):
                report.found("changed", seq, f"#{seq}'s content does not match its hash", pk)
        else:
            report.found("changed", seq, f"#{seq} names an unknown hash version {version}", pk)
        # Most events neither end the run nor matter to what may follow its end: the
        # rule is not called for them (the verifier reads millions of rows).
        if (end.at is not None or kind in END_WATCHED) and not end.allows(
            seq, kind, record_of(version, canonical, payload)
        ):
            report.found(
                "appended", seq, f"#{seq} ({kind}) was added after the run ended at #{end.at}", pk
            )
        if seq == anchor_size:
            hash_at_anchor = digest
        if seq in earlier and earlier[seq].head != digest:
            stale = earlier[seq]
            report.found(
                "rewritten",
                seq,
                f"event #{seq} is not the one signed in checkpoint #{stale.number} of"
                f" {stale.at}: the events up to it were changed and their hashes recomputed",
                pk,
            )
        prev, expected, last_seq = digest, seq + 1, seq
    if anchor is not None:
        signed = f"checkpoint #{anchor.number} of {anchor.at}"
        if last_seq < anchor.size:
            report.found(
                "truncated",
                last_seq + 1,
                f"the trail ends at #{last_seq}, but {signed} counted {anchor.size} events",
            )
        elif hash_at_anchor != anchor.head:
            report.found(
                "rewritten",
                anchor.size,
                f"event #{anchor.size} is not the one signed in {signed}: the events up to it"
                " were changed, removed or reordered and their hashes recomputed",
            )
        # With its end in the trail, each event after it was judged above.
        if anchor.final and last_seq > anchor.size and end.at is None:
            report.found(
                "appended",
                anchor.size + 1,
                f"{last_seq - anchor.size} events were added after the run's end, which"
                f" {signed} sealed at #{anchor.size}",
            )
    elif unanchored_before and first_at and first_at < at_text(unanchored_before):
        report.found(
            "unanchored",
            1,
            "this trail began before the last full checkpoint, which does not list it:"
            " it was made later with old dates (a cut tail moved to a new run, or a"
            " forgery)",
        )
    return report


def columns_compare(
    report: ChainReport,
    canonical: str,
    pk: int,
    seq: int,
    at: str,
    kind: str,
    actor: str,
    run_text: str,
) -> None:
    """Say how the columns differ from the text hashed (which ``chain_check`` found)."""
    try:
        document = json.loads(canonical)
        written = {name: document[name] for name in ("run", "seq", "at", "kind", "actor")}
    except (ValueError, KeyError, TypeError):
        report.found("changed", seq, f"#{seq}'s text is not an event", pk)
        return
    before = len(report.findings)
    if written["seq"] != seq:
        report.found("reordered", seq, f"#{seq} was written as #{written['seq']}", pk)
    if written["run"] != run_text:
        report.found("moved", seq, f"#{seq} was written for run {written['run']}", pk)
    for name, shown in (("kind", kind), ("actor", actor)):
        if written[name] != shown:
            report.found(
                "changed",
                seq,
                f"#{seq}'s {name} shows {shown!r}, but {written[name]!r} was written",
                pk,
            )
    if written["at"] != at:
        report.found(
            "changed", seq, f"#{seq}'s time shows {at}, but {written['at']} was written", pk
        )
    if len(report.findings) == before:
        report.found("changed", seq, f"#{seq}'s text is not in canonical form", pk)


def old_hash_holds(
    run_uuid: uuid.UUID,
    seq: int,
    at: str,
    kind: str,
    actor: str,
    payload: Any,
    prev_hash: str,
    digest: str,
) -> bool:
    """Whether an event hashed the old way (version 0: over canonical JSON rebuilt from
    the columns) still matches its hash."""
    from lineage.services import event_canonical

    # Row content is evidence, never trusted to parse: what does not is a mismatch.
    try:
        if isinstance(payload, str | bytes):
            payload = json.loads(payload)
        text = event_canonical(
            run_uuid=run_uuid,
            seq=seq,
            at=datetime.fromisoformat(at),
            kind=kind,
            actor=actor,
            payload=payload,
        )
    except (ValueError, TypeError, OverflowError, RecursionError):
        return False
    return hashlib.sha256((prev_hash + text).encode()).hexdigest() == digest


def anchor_missing(anchor: Anchor, seen_broken: str = "") -> ChainReport:
    report = ChainReport(uuid.UUID(anchor.run_uuid), 0, anchor=anchor)
    if seen_broken:
        report.found("broken", None, seen_broken)
    report.found(
        "removed",
        1,
        f"the whole trail is gone: checkpoint #{anchor.number} of {anchor.at} counted"
        f" {anchor.size} events",
    )
    return report


def run_verify(*, run_uuid: uuid.UUID, ledger: Any = None) -> ChainReport:
    """One run's chain, checked (``chain_check``) against the checkpoint log."""
    from lineage.anchoring import ledger_load

    ledger = ledger if ledger is not None else ledger_load()
    anchor = ledger.anchors.get(str(run_uuid))
    connection = connections["default"]
    table = connection.ops.quote_name(LineageEvent._meta.db_table)
    param = LineageEvent._meta.get_field("run_uuid").get_db_prep_value(run_uuid, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {row_columns(connection.vendor)} FROM {table} WHERE run_uuid = %s"
            " ORDER BY seq",
            [param],
        )
        rows = list(rows_normalised(cursor.fetchall(), connection.vendor))
    if not rows and anchor is not None:
        return anchor_missing(anchor, ledger.broken.get(str(run_uuid), ""))
    return chain_check(
        run_uuid,
        rows,
        anchor=anchor,
        unanchored_before=ledger.unanchored_before,
        seen_broken=ledger.broken.get(str(run_uuid), ""),
    )


# The whole trail ------------------------------------------------------------------


def chains_check(
    rows: Iterable[tuple],
    anchors: dict[str, Anchor],
    unanchored_before: datetime | None,
    counts: dict[str, int],
    broken: dict[str, str] | None = None,
) -> Iterator[ChainReport]:
    """Reports of the broken chains among ``rows`` (``row_columns``, in run and seq
    order), and of the anchored chains that never came; ``counts`` gets events, chains."""
    seen: set[str] = set()
    broken = broken or {}
    for run_value, chain_rows in itertools.groupby(rows, key=lambda row: row[1]):
        run_uuid = run_value if isinstance(run_value, uuid.UUID) else uuid.UUID(run_value)
        key = str(run_uuid)
        seen.add(key)
        report = chain_check(
            run_uuid,
            chain_rows,
            anchor=anchors.get(key),
            unanchored_before=unanchored_before,
            seen_broken=broken.get(key, ""),
        )
        counts["events"] += report.events
        counts["chains"] += 1
        counts["anchored"] += report.anchor is not None
        if not report.intact:
            yield report
    for key, anchor in anchors.items():
        if key not in seen:
            yield anchor_missing(anchor, broken.get(key, ""))
    for key, text in broken.items():
        if key not in seen and key not in anchors:
            gone = ChainReport(uuid.UUID(key), 0)
            gone.found("broken", None, text)
            yield gone


def uuid_ranges(parts: int) -> list[tuple[uuid.UUID | None, uuid.UUID | None]]:
    """``parts`` ranges that split the UUIDs evenly (random UUIDs spread evenly)."""
    bounds = [uuid.UUID(int=(i << 128) // parts) for i in range(1, parts)]
    return list(zip([None, *bounds], [*bounds, None], strict=True))


def range_verify(
    conninfo: dict[str, Any],
    table: str,
    low: uuid.UUID | None,
    high: uuid.UUID | None,
    anchors: dict[str, Anchor],
    unanchored_before: datetime | None,
    broken: dict[str, str] | None = None,
) -> tuple[dict[str, int], list[ChainReport]]:
    """One worker process's share: the chains whose run UUID is in [low, high), read in
    order through a server-side cursor on a connection of its own."""
    import psycopg

    where, params = [], []
    if low is not None:
        where.append("run_uuid >= %s")
        params.append(low)
    if high is not None:
        where.append("run_uuid < %s")
        params.append(high)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    counts = {"events": 0, "chains": 0, "anchored": 0}
    with (
        psycopg.connect(**conninfo) as db,
        db.transaction(),
        db.cursor(name="lineage_verify", binary=True) as cursor,
    ):
        cursor.itersize = 20_000
        cursor.execute(
            f"SELECT {row_columns('postgresql')} FROM {table} {clause} ORDER BY run_uuid, seq",
            params,
        )
        reports = list(chains_check(cursor, anchors, unanchored_before, counts, broken))
    return counts, reports


def conninfo_for(connection: Any) -> dict[str, Any]:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("server_side_binding", None)
    return {key: value for key, value in params.items() if value not in (None, "")}


def trail_verify(
    *,
    ledger: Any = None,
    workers: int | None = None,
    using: str = "default",
    conninfo: dict[str, Any] | None = None,
) -> TrailReport:
    """Every chain, checked against the checkpoint log. On PostgreSQL the table is read
    in run order in ``workers`` processes at once, each a range of run UUIDs through a
    server-side cursor; elsewhere (SQLite, or inside a transaction, whose rows other
    connections cannot see) in this process, in one ordered pass. ``conninfo`` names
    another PostgreSQL database to read (the benchmark's scratch one)."""
    from lineage.anchoring import ledger_load

    ledger = ledger if ledger is not None else ledger_load()
    connection = connections[using]
    report = TrailReport(log_problems=list(ledger.problems))
    workers = workers or os.cpu_count() or 1
    table = connection.ops.quote_name(LineageEvent._meta.db_table)
    parallel = conninfo is not None or (
        connection.vendor == "postgresql"
        and workers > 1
        and not transaction.get_connection(using).in_atomic_block
    )
    if not parallel:
        counts = {"events": 0, "chains": 0, "anchored": 0}
        # No transaction: one SELECT reads one snapshot, and on SQLite a transaction
        # would take the write lock (IMMEDIATE) from the workers for the whole read.
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {row_columns(connection.vendor)} FROM {table} ORDER BY run_uuid, seq"
            )
            rows = itertools.chain.from_iterable(iter(lambda: cursor.fetchmany(5_000), []))
            report.broken = list(
                chains_check(
                    rows_normalised(rows, connection.vendor),
                    ledger.anchors,
                    ledger.unanchored_before,
                    counts,
                    ledger.broken,
                )
            )
        report.events, report.chains, report.anchored = (
            counts["events"],
            counts["chains"],
            counts["anchored"],
        )
        return report
    ranges = uuid_ranges(workers * 4)
    if conninfo is None:
        conninfo = conninfo_for(connection)
        # Forked workers would inherit this process's open connection: they open their own.
        connection.close()
    # Each worker gets the anchors of its range only: one bisect per anchor.
    lows = [low.int for low, _ in ranges[1:]]
    shares_anchors: list[dict[str, Anchor]] = [{} for _ in ranges]
    for key, anchor in ledger.anchors.items():
        shares_anchors[bisect.bisect_right(lows, uuid.UUID(key).int)][key] = anchor
    shares_broken: list[dict[str, str]] = [{} for _ in ranges]
    for key, text in ledger.broken.items():
        shares_broken[bisect.bisect_right(lows, uuid.UUID(key).int)][key] = text
    shares = [
        (conninfo, table, low, high, share, ledger.unanchored_before, broken)
        for (low, high), share, broken in zip(ranges, shares_anchors, shares_broken, strict=True)
    ]
    import multiprocessing

    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("fork")
    ) as pool:
        for counts, broken in pool.map(range_verify, *zip(*shares, strict=True)):
            report.events += counts["events"]
            report.chains += counts["chains"]
            report.anchored += counts["anchored"]
            report.broken.extend(broken)
    report.broken.sort(key=lambda chain: str(chain.run_uuid))
    return report
