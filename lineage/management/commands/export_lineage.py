"""``manage.py export_lineage``: one run's trail, or every event of a period, as JSON
Lines or CSV; and ``--verify FILE`` to check such a JSON Lines file."""

from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand, CommandError

from lineage.export_lines import (
    FORMATS,
    ExportInputError,
    Scope,
    lines_verify,
    period_parse,
    pieces_for,
    scope_lines,
)


class Command(BaseCommand):
    help = (
        "Export lineage events as JSON Lines or CSV, one event a line with its columns,"
        " the exact text its hash covers and the hash: one run's trail (--run UUID) or"
        " every event whose time is in a period (--since/--until, ISO 8601 dates or"
        " times; a time without an offset is in TIME_ZONE). --verify FILE checks a JSON"
        " Lines export: each line's hash, its columns against its hashed text, and the"
        " links between each run's lines. Unlike lineage_export, which writes one run's"
        " trail with its signed checkpoint and Merkle proof (proof, for an auditor with"
        " the public key, that the trail is complete and unchanged), these files carry no"
        " signature: they are for reading, searching and spreadsheets, and a file"
        " rewritten with new hashes, or cut short, still verifies."
    )

    def add_arguments(self, parser):
        parser.add_argument("--run", help="the UUID of the run (or task or tool trail)")
        parser.add_argument("--since", default="", help="the period's start, included")
        parser.add_argument("--until", default="", help="the period's end, not included")
        parser.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl or csv")
        parser.add_argument("--output", help="write to this new file (default: standard output)")
        parser.add_argument("--verify", metavar="FILE", help="check a JSON Lines export")

    def handle(self, *args, **options):
        if options["verify"]:
            if options["run"] or options["since"] or options["until"] or options["output"]:
                raise CommandError("--verify FILE checks a file: give it alone")
            return self.verify(options["verify"])
        scope = self.scope(options)
        counted = [0]  # the events written, for the closing line

        def lines():
            for line in scope_lines(scope):
                counted[0] += 1
                yield line

        pieces = pieces_for(options["format"], lines())
        if not options["output"]:
            for piece in pieces:
                self.stdout.write(piece, ending="")
            return
        try:
            # "x": an export never overwrites a file (lineage_export does the same).
            with open(options["output"], "x", encoding="utf-8", newline="") as handle:
                for piece in pieces:
                    handle.write(piece)
        except OSError as error:
            raise CommandError(f"--output {options['output']}: {error.strerror}") from None
        self.stderr.write(
            f"{scope.described()}: {counted[0]} events written to {options['output']}"
            f" ({options['format']})"
        )

    def scope(self, options) -> Scope:
        period = options["since"] or options["until"]
        if options["run"] and period:
            raise CommandError("give --run or a period (--since/--until), not both")
        if options["run"]:
            try:
                return Scope(run_uuid=uuid.UUID(options["run"]))
            except ValueError:
                raise CommandError(f"--run: {options['run']!r} is not a UUID") from None
        if not period:
            raise CommandError("say what to export: --run UUID, or --since and/or --until")
        try:
            return period_parse(options["since"], options["until"])
        except ExportInputError as error:
            raise CommandError(str(error)) from None

    def verify(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                report = lines_verify(handle)
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"{path}: cannot be read: {error}") from None
        if not report.intact:
            self.stderr.write(report.said())
            raise CommandError(f"{path} is broken") from None
        self.stdout.write(report.said())
