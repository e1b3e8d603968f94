from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand, CommandError

from lineage.models import LineageEvent
from lineage.services import chain_verify


class Command(BaseCommand):
    help = "Recompute every lineage hash chain (or one run's) and report the first break."

    def add_arguments(self, parser):
        parser.add_argument("--run", dest="run", help="check only this run's chain (its UUID)")

    def handle(self, *args, **options):
        if options["run"]:
            try:
                run_uuids = [uuid.UUID(options["run"])]
            except ValueError:
                raise CommandError(f"--run {options['run']!r} is not a UUID") from None
            if not LineageEvent.objects.filter(run_uuid=run_uuids[0]).exists():
                raise CommandError(f"no lineage events for run {run_uuids[0]}")
        else:
            run_uuids = list(
                LineageEvent.objects.order_by("run_uuid")
                .values_list("run_uuid", flat=True)
                .distinct()
            )
        events = 0
        for run_uuid in run_uuids:
            report = chain_verify(run_uuid)
            events += report.events
            if not report.intact:
                raise CommandError(
                    f"BROKEN: run {run_uuid}, event #{report.broken_seq} "
                    f"(id {report.broken_event_id}): {report.problem}. "
                    f"Checked {counted(events, 'event')} in "
                    f"{counted(run_uuids.index(run_uuid) + 1, 'chain')}."
                )
        self.stdout.write(
            self.style.SUCCESS(
                f"OK: checked {counted(events, 'event')} in {counted(len(run_uuids), 'chain')}; "
                "every chain intact."
            )
        )


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
