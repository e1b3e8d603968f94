"""Any part of the trail as lines to take away: one run's trail, or every event whose
time falls in a period, as JSON Lines or CSV, one event a line.

Each line carries the event's columns (run, seq, at, kind, actor, payload), its
``prev_hash`` and ``hash``, and the exact text the hash covers (``canonical``), so the
file checks itself: ``lines_verify`` recomputes every hash, holds each line's columns
against its hashed text, and follows each run's chain from line to line.

How this differs from lineage.export (``manage.py lineage_export``): that one is one
run's trail with the signed checkpoint and its Merkle proof, which proves the trail
complete and unchanged to anyone with the public key. These lines prove less: each
line is the event its hash says and each run's lines link up, but someone able to
rewrite the file can recompute every hash, and a cut tail cannot be seen. They are for
reading, searching and spreadsheets; for proof, use the signed export.

The checking half imports neither Django nor the database:
``python -m lineage.export_lines FILE`` runs it anywhere the package is.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# The signed export's helpers: the one canonical form and the text a hash covers.
from lineage.export import GENESIS_HASH, canonical, event_text

FORMATS = ("jsonl", "csv")
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
LINE_FIELDS = (
    "run",
    "seq",
    "at",
    "kind",
    "actor",
    "payload",
    "prev_hash",
    "hash",
    "hash_version",
    "canonical",
)
# Lines joined into one piece of a streamed response or one write to a file.
LINES_PER_CHUNK = 500
# Rows read from the database at a time (a server-side cursor on PostgreSQL).
ROWS_PER_FETCH = 2_000
# A broken file is reported with its first problems; the rest are counted.
PROBLEMS_KEPT = 50


class ExportInputError(ValueError):
    """What to export was asked for wrongly; the message says what and how."""


@dataclass(frozen=True)
class Scope:
    """What to export: one trail (``run_uuid``), or the events with ``at`` in
    [``since``, ``until``) of every trail (either end may be open)."""

    run_uuid: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None

    def described(self) -> str:
        if self.run_uuid is not None:
            return f"the trail of {self.run_uuid}"
        since = self.since.isoformat() if self.since else "the first event"
        until = self.until.isoformat() if self.until else "now"
        return f"every event from {since} until (not including) {until}"

    def filename(self, fmt: str) -> str:
        if self.run_uuid is not None:
            return f"lineage-{self.run_uuid}.{fmt}"
        since = utc_stamp(self.since) if self.since else "start"
        until = utc_stamp(self.until) if self.until else "now"
        return f"lineage-{since}-{until}.{fmt}"


def utc_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def period_parse(since: str, until: str) -> Scope:
    """A period from two ISO 8601 dates or times ("2026-12-01", "2026-12-01T09:30",
    "2026-12-01T09:30:00+01:00"); a time without an offset is in the server's
    TIME_ZONE, a date is its midnight there. Either may be empty (open), not both."""
    from django.utils import timezone
    from django.utils.dateparse import parse_date, parse_datetime

    def moment(text: str, name: str) -> datetime | None:
        text = text.strip()
        if not text:
            return None
        if "\x00" in text or len(text) > 64:
            raise ExportInputError(f"{name}: not a date or time")
        try:
            parsed = parse_datetime(text)
            if parsed is None:
                day = parse_date(text)
                if day is None:
                    raise ValueError
                parsed = datetime(day.year, day.month, day.day)
            if timezone.is_naive(parsed):
                parsed = timezone.make_aware(parsed)
            parsed.astimezone(UTC)  # a time the database cannot hold fails here
        except (ValueError, OverflowError):
            raise ExportInputError(
                f"{name}: {text[:40]!r} is not an ISO 8601 date or time"
                " (2026-12-01, 2026-12-01T09:30 or 2026-12-01T09:30:00+01:00)"
            ) from None
        return parsed

    start, end = moment(since, "since"), moment(until, "until")
    if start is None and end is None:
        raise ExportInputError("give a period: since, until or both")
    if start is not None and end is not None and end <= start:
        raise ExportInputError(
            f"until ({end.isoformat()}) must come after since ({start.isoformat()})"
        )
    return Scope(since=start, until=end)


def scope_lines(scope: Scope) -> Iterator[dict[str, Any]]:
    """The scope's events as lines (``LINE_FIELDS``), in run and seq order, read a few
    thousand rows at a time so a period of millions of events is never held whole."""
    from django.db.models import Case, JSONField, When

    from lineage.models import HASH_COLUMNS, LineageEvent

    events = LineageEvent.objects.all()
    if scope.run_uuid is not None:
        events = events.filter(run_uuid=scope.run_uuid)
    if scope.since is not None:
        events = events.filter(at__gte=scope.since)
    if scope.until is not None:
        events = events.filter(at__lt=scope.until)
    rows = (
        events.order_by("run_uuid", "seq")
        # The jsonb copy is read only for the events hashed over it (version 0).
        .annotate(
            columns_payload=Case(
                When(hash_version=HASH_COLUMNS, then="payload"), output_field=JSONField()
            )
        )
        .values_list(
            "run_uuid",
            "seq",
            "at",
            "kind",
            "actor",
            "hash_version",
            "canonical",
            "columns_payload",
            "prev_hash",
            "hash",
        )
        .iterator(chunk_size=ROWS_PER_FETCH)
    )
    for run_uuid, seq, at, kind, actor, version, text, payload, prev_hash, digest in rows:
        yield {
            "run": str(run_uuid),
            "seq": seq,
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "kind": kind,
            "actor": actor,
            "payload": payload if version == HASH_COLUMNS else hashed_payload(text),
            "prev_hash": prev_hash,
            "hash": digest,
            "hash_version": version,
            "canonical": text,
        }


def hashed_payload(text: str) -> Any:
    """The payload in an event's hashed text; None where the text is not an event
    (only a hand changing the table makes one, and its hash then fails)."""
    try:
        return json.loads(text)["payload"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def jsonl_pieces(lines: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The lines as JSON Lines, ``LINES_PER_CHUNK`` to a piece. ASCII, so NUL and
    unpaired surrogates travel as escapes, as in the hashed text."""
    for chunk in chunked(lines):
        yield "".join(json.dumps(line, ensure_ascii=True) + "\n" for line in chunk)


def csv_pieces(lines: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The lines as CSV with a header, every cell safe to open in a spreadsheet
    (``cell_safe``); the payload as canonical JSON."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(LINE_FIELDS)
    for chunk in chunked(lines):
        for line in chunk:
            writer.writerow(
                [
                    cell_safe(canonical(line[name]) if name == "payload" else str(line[name]))
                    for name in LINE_FIELDS
                ]
            )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def pieces_for(fmt: str, lines: Iterable[dict[str, Any]]) -> Iterator[str]:
    return jsonl_pieces(lines) if fmt == "jsonl" else csv_pieces(lines)


# A cell a spreadsheet would read as a formula (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell_safe(value: str) -> str:
    """``value``, with a ``'`` before it when it begins as a formula would, so that a
    spreadsheet shows it as text. The JSON Lines file is the one to verify: these
    cells are for reading."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def chunked(lines: Iterable[Any]) -> Iterator[list[Any]]:
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, LINES_PER_CHUNK)):
        yield chunk


# Checking a JSON Lines file ------------------------------------------------------


@dataclass
class LinesReport:
    """What checking a file of lines found."""

    events: int = 0
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # run -> (seq, hash)
    starts: dict[str, int] = field(default_factory=dict)  # run -> first seq in the file
    problems: list[str] = field(default_factory=list)
    problems_total: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems_total

    def found(self, text: str) -> None:
        self.problems_total += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(text)

    def said(self) -> str:
        """The verdict in words, as the command and ``python -m`` print it."""
        trails = len(self.heads)
        if not self.intact:
            more = self.problems_total - len(self.problems)
            lines = [f"BROKEN: {self.problems_total} problem(s) in {self.events} events:"]
            lines += [f"  {problem}" for problem in self.problems]
            if more:
                lines.append(f"  and {more} more")
            return "\n".join(lines)
        later = sorted(run for run, seq in self.starts.items() if seq != 1)
        text = (
            f"OK: {self.events} events of {trails} trail{'s' if trails != 1 else ''}: each"
            " line's text matches its hash and its columns, and each links to the line"
            " before it."
        )
        if later:
            text += (
                f" {len(later)} trail{'s' if len(later) != 1 else ''} start after their"
                " first event (a period's export begins mid-trail), e.g. "
                f"{later[0]} at #{self.starts[later[0]]}."
            )
        return (
            text + " This does not prove that no event is missing at a trail's end, or that"
            " the file was not rewritten with new hashes: for that, verify a signed"
            " export (manage.py lineage_export)."
        )


def lines_verify(lines: Iterable[str]) -> LinesReport:
    """Check a JSON Lines export, line by line: each line's hash recomputed from its
    text (``lineage.export.event_text``), its columns held against that text, and each
    run's lines in seq order, each linking to the one before it (the first of a run at
    #1 to the genesis hash). Lines of several runs may interleave."""
    report = LinesReport()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            report.found(f"line {number} is not JSON")
            continue
        missing = [name for name in LINE_FIELDS if not isinstance(line, dict) or name not in line]
        if missing:
            report.found(f"line {number} is not an event: it lacks {', '.join(missing)}")
            continue
        line_check(report, number, line)
    return report


def line_check(report: LinesReport, number: int, line: dict[str, Any]) -> None:
    run, seq, version = line["run"], line["seq"], line["hash_version"]
    where = f"line {number} (event #{seq} of {run})"
    if not isinstance(run, str) or not isinstance(seq, int) or version not in (0, 1):
        report.found(f"line {number}: run, seq or hash_version is not of its kind")
        return
    report.events += 1
    try:
        text = event_text(run, line)
        digest = hashlib.sha256((str(line["prev_hash"]) + text).encode()).hexdigest()
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        digest = None
    if digest != line["hash"]:
        report.found(f"{where}: its text does not match its hash: the line was changed")
    elif version == 1:
        columns_check(report, where, line)
    head = report.heads.get(run)
    if head is None:
        report.starts[run] = seq
        if seq == 1 and line["prev_hash"] != GENESIS_HASH:
            report.found(f"{where}: the first event does not start from the genesis hash")
    elif seq <= head[0]:
        report.found(f"{where}: comes after event #{head[0]}: lines are reordered or repeated")
    elif seq != head[0] + 1:
        gap = f"#{head[0] + 1}" if seq == head[0] + 2 else f"#{head[0] + 1} to #{seq - 1}"
        report.found(f"{where}: events {gap} are missing before it")
    elif line["prev_hash"] != head[1]:
        report.found(f"{where}: does not link to the line before it (event #{head[0]})")
    report.heads[run] = (seq, str(line["hash"]))


def columns_check(report: LinesReport, where: str, line: dict[str, Any]) -> None:
    """A line whose hash holds: its columns must say what its hashed text says."""
    try:
        written = json.loads(line["canonical"])
        differ = [
            name for name in ("run", "seq", "at", "kind", "actor") if written[name] != line[name]
        ]
        if canonical(written["payload"]) != canonical(line["payload"]):
            differ.append("payload")
    except (ValueError, KeyError, TypeError, RecursionError):
        report.found(f"{where}: its hashed text is not an event")
        return
    if differ:
        report.found(
            f"{where}: its {', '.join(differ)} column{'s' if len(differ) > 1 else ''}"
            " differ from the text its hash covers: the line was changed"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lineage.export_lines",
        description="Check a JSON Lines lineage export (manage.py export_lineage).",
    )
    parser.add_argument("file", help="the .jsonl file to check")
    options = parser.parse_args(argv)
    try:
        with open(options.file, encoding="utf-8") as handle:
            report = lines_verify(handle)
    except (OSError, UnicodeDecodeError) as error:
        print(f"{options.file}: cannot be read: {error}", file=sys.stderr)
        return 2
    print(report.said(), file=sys.stdout if report.intact else sys.stderr)
    return 0 if report.intact else 1


if __name__ == "__main__":
    sys.exit(main())
