from __future__ import annotations

import time
import uuid
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from lineage.anchoring import FileSink, ledger_load, public_key_parse
from lineage.models import LineageEvent
from lineage.verification import ChainReport, run_verify, trail_verify


class Command(BaseCommand):
    help = (
        "Recompute every lineage chain (or one run's) from the text its hashes cover, hold"
        " each against the latest signed checkpoint, and report every broken chain by run."
    )

    def add_arguments(self, parser):
        parser.add_argument("--run", dest="run", help="check only this run's chain (its UUID)")
        parser.add_argument(
            "--checkpoints",
            help="read the signed checkpoints from this JSON-lines file (a copy an auditor"
            " holds, or the webhook's) instead of AGENTOPS_LINEAGE_CHECKPOINT_FILE",
        )
        parser.add_argument(
            "--public-key",
            help="check the checkpoints' signatures with this Ed25519 public key (base64)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            help="processes reading the trail at once on PostgreSQL"
            " (default AGENTOPS_LINEAGE_VERIFY_WORKERS)",
        )

    def handle(self, *args, **options):
        try:
            key = (
                public_key_parse(options["public_key"], name="--public-key")
                if options["public_key"]
                else None
            )
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        sink = None
        if options["checkpoints"]:
            path = Path(options["checkpoints"])
            if not path.is_file():
                raise CommandError(f"--checkpoints {path}: no such file")
            sink = FileSink(path)
        workers = options["workers"]
        if workers is None:
            workers = settings.AGENTOPS_LINEAGE_VERIFY_WORKERS
        if workers < 1:
            raise CommandError(f"--workers {workers}: must be at least 1")
        try:
            ledger = ledger_load(sink=sink, key=key)
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        started = time.perf_counter()
        if options["run"]:
            try:
                run_uuid = uuid.UUID(options["run"])
            except ValueError:
                raise CommandError(f"--run {options['run']!r} is not a UUID") from None
            if (
                not LineageEvent.objects.filter(run_uuid=run_uuid).exists()
                and str(run_uuid) not in ledger.anchors
                and str(run_uuid) not in ledger.broken
            ):
                raise CommandError(f"no lineage events for run {run_uuid}")
            chain = run_verify(run_uuid=run_uuid, ledger=ledger)
            events, chains, anchored = chain.events, 1, int(chain.anchor is not None)
            broken = [] if chain.intact else [chain]
        else:
            report = trail_verify(ledger=ledger, workers=workers)
            events, chains, anchored, broken = (
                report.events,
                report.chains,
                report.anchored,
                report.broken,
            )
        seconds = time.perf_counter() - started
        checked = (
            f"checked {counted(events, 'event')} in {counted(chains, 'chain')}"
            f" ({anchored} held against a signed checkpoint, {ledger.statements} checkpoints"
            f" read) in {seconds:.2f} s"
        )
        lines = [f"CHECKPOINTS: {problem}" for problem in ledger.problems]
        for chain in broken:
            lines.extend(chain_lines(chain))
        if lines:
            raise CommandError(
                f"BROKEN: {counted(len(broken), 'chain')} of {chains}, "
                f"{counted(len(ledger.problems), 'problem')} with the checkpoints; "
                f"{checked}.\n" + "\n".join(lines)
            )
        self.stdout.write(self.style.SUCCESS(f"OK: {checked}; every chain intact."))


def chain_lines(chain: ChainReport) -> list[str]:
    lines = []
    for finding in chain.findings:
        where = f", event #{finding.seq}" if finding.seq is not None else ""
        where += f" (id {finding.event_id})" if finding.event_id is not None else ""
        lines.append(f"BROKEN: run {chain.run_uuid}{where}: {finding.what}: {finding.text}")
    return lines


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
