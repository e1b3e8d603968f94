"""How fast the whole trail is verified: ``manage.py bench_lineage``.

Seeds a scratch PostgreSQL database (made beside the configured one, dropped after)
with chains of real events (canonical text, chained hashes, a signed checkpoint over
every chain), then times ``verify_lineage``'s check of all of it: each event's hash
recomputed from its stored text, its columns held against that text, each chain against
the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from lineage.anchoring import FileSink, chain_entry, ledger_load, statement_append
from lineage.models import GENESIS_HASH, HASH_CANONICAL, LineageEvent
from lineage.services import event_document, json_canonical
from lineage.triggers import POSTGRES_INSTALL
from lineage.verification import conninfo_for, trail_verify


class Command(BaseCommand):
    help = (
        "Seed a scratch PostgreSQL database with lineage chains and time their verification"
        " (events per second)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--events", type=int, default=1_000_000)
        parser.add_argument("--chains", type=int, default=100_000)
        parser.add_argument(
            "--workers", type=int, default=os.cpu_count() or 1, help="verifying processes"
        )

    def handle(self, *args, **options):
        events, chains, workers = options["events"], options["chains"], options["workers"]
        for name, value in (("--events", events), ("--chains", chains), ("--workers", workers)):
            if value < 1:
                raise CommandError(f"{name} {value}: must be at least 1")
        if chains > events:
            raise CommandError(f"--chains {chains} is more than --events {events}")
        default = connections["default"]
        if default.vendor != "postgresql":
            raise CommandError(
                "bench_lineage needs PostgreSQL (DATABASE_URL=postgres://...),"
                f" not {default.vendor}"
            )
        scratch = f"agentops_bench_lineage_{os.getpid()}"
        quoted = default.ops.quote_name(scratch)
        with default._nodb_cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {quoted}")
        conninfo = {**conninfo_for(default), "dbname": scratch}
        try:
            with (
                tempfile.TemporaryDirectory() as directory,
                psycopg.connect(**conninfo, autocommit=True) as db,
            ):
                sink = FileSink(f"{directory}/checkpoints.jsonl")
                self.bench(db, conninfo, events, chains, workers, sink)
        finally:
            with default._nodb_cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")

    def bench(
        self,
        db: psycopg.Connection,
        conninfo: dict,
        events: int,
        chains: int,
        workers: int,
        sink: FileSink,
    ) -> None:
        # The table as migrations make it, and its triggers: the statements Django
        # would run, run on the scratch database.
        with connections["default"].schema_editor(collect_sql=True, atomic=False) as editor:
            editor.create_model(LineageEvent)
        for statement in [*editor.collected_sql, *POSTGRES_INSTALL]:
            db.execute(statement)
        started = time.perf_counter()
        entries = self.seed(db, events, chains)
        seeded = time.perf_counter() - started
        self.stdout.write(
            f"seeded {events:,} events in {chains:,} chains in {seeded:.1f} s"
            f" ({events / seeded:,.0f} events/s)"
        )
        started = time.perf_counter()
        statement_append(chains=entries, reason="periodic", complete=True, sink=sink)
        ledger = ledger_load(sink=sink)
        signed = time.perf_counter() - started
        self.stdout.write(
            f"signed and read back a checkpoint of {chains:,} chains in {signed:.1f} s"
        )
        started = time.perf_counter()
        report = trail_verify(ledger=ledger, workers=workers, conninfo=conninfo)
        seconds = time.perf_counter() - started
        if report.events != events or report.chains != chains or not report.intact:
            raise CommandError(
                f"the verification read {report.events} events in {report.chains} chains,"
                f" {len(report.broken)} broken: expected {events} intact events in {chains}"
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"verified {events:,} events in {chains:,} chains ({report.anchored:,} held"
                f" against the checkpoint) in {seconds:.2f} s with {workers} workers:"
                f" {events / seconds:,.0f} events/s"
            )
        )

    def seed(self, db: psycopg.Connection, events: int, chains: int) -> list[dict]:
        """COPY the chains in, each with real hashes over real canonical text; returns
        the checkpoint entries for them."""
        base = datetime(2026, 1, 1, tzinfo=UTC)
        per_chain, extra = divmod(events, chains)
        entries = []
        columns = (
            "run_uuid, seq, at, kind, actor, payload, prev_hash, hash, canonical, hash_version"
        )
        with (
            db.cursor() as cursor,
            cursor.copy(f"COPY lineage_lineageevent ({columns}) FROM STDIN") as copy,
        ):
            for number in range(chains):
                run_uuid = uuid.uuid4()
                length = per_chain + (number < extra)
                prev, hashes, kinds = GENESIS_HASH, [], set()
                for seq in range(1, length + 1):
                    kind = "run.succeeded" if seq == length else "tool.succeeded"
                    at = base + timedelta(seconds=number, microseconds=seq)
                    payload = {"n": seq, "tool": "ledger.lookup", "result": {"amount": 12.5}}
                    canonical = json_canonical(
                        event_document(
                            run_uuid=run_uuid,
                            seq=seq,
                            at=at,
                            kind=kind,
                            actor="engine",
                            payload=payload,
                        )
                    )
                    digest = hashlib.sha256((prev + canonical).encode()).hexdigest()
                    copy.write_row(
                        (
                            run_uuid,
                            seq,
                            at,
                            kind,
                            "engine",
                            json_canonical(payload),
                            prev,
                            digest,
                            canonical,
                            HASH_CANONICAL,
                        )
                    )
                    prev = digest
                    hashes.append(digest)
                    kinds.add(kind)
                entries.append(chain_entry(str(run_uuid), hashes, kinds))
        db.execute("ANALYZE lineage_lineageevent")
        return entries
