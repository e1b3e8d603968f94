"""``manage.py lineage_export RUN``: one run's trail with the proof that it is complete
and unchanged, for ``python -m lineage.export FILE --public-key KEY``."""

from __future__ import annotations

import json
import uuid

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from lineage.export import ExportRefused, run_export


class Command(BaseCommand):
    help = "Export one run's lineage trail with its signed checkpoint and Merkle proof (JSON)."

    def add_arguments(self, parser):
        parser.add_argument("run", help="the run's UUID")
        parser.add_argument("--output", help="write to this file (default: standard output)")
        parser.add_argument(
            "--no-checkpoint",
            action="store_true",
            help="export as far as the latest checkpoint, without making one first",
        )

    def handle(self, *args, **options):
        try:
            run_uuid = uuid.UUID(options["run"])
        except ValueError:
            raise CommandError(f"{options['run']!r} is not a run UUID") from None
        try:
            document = run_export(run_uuid=run_uuid, checkpoint=not options["no_checkpoint"])
        except (ExportRefused, ImproperlyConfigured, RuntimeError) as error:
            raise CommandError(str(error)) from None
        text = json.dumps(document, indent=1)
        if options["output"]:
            try:
                with open(options["output"], "x", encoding="utf-8") as handle:
                    handle.write(text + "\n")
            except OSError as error:
                raise CommandError(f"--output {options['output']}: {error.strerror}") from None
            self.stdout.write(
                f"run {run_uuid}: {len(document['events'])} events and their proof written to"
                f" {options['output']}"
            )
        else:
            self.stdout.write(text)
