"""``manage.py lineage_checkpoint``: sign every chain that grew since its last checkpoint,
outside the database. Run it from a scheduler (cron, a systemd timer, django-q2's or
Celery beat's schedule) every few minutes; a run's end also writes one for that run."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from lineage.anchoring import (
    key_encode,
    key_id,
    new_seed,
    public_key,
    public_key_text,
    sink_configured,
    trail_checkpoint,
)


class Command(BaseCommand):
    help = (
        "Checkpoint every lineage chain that grew since its last checkpoint: a statement"
        " signed with the lineage key, written to the checkpoint sink."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--public-key",
            action="store_true",
            help="print the public key that checks the checkpoints (for auditors), and stop",
        )
        parser.add_argument(
            "--new-key",
            action="store_true",
            help="print a new signing key (for AGENTOPS_LINEAGE_SIGNING_KEY), and stop",
        )

    def handle(self, *args, **options):
        if options["new_key"]:
            self.stdout.write(key_encode(new_seed()))
            return
        try:
            if options["public_key"]:
                key = public_key()
                self.stdout.write(f"{public_key_text(key)}  (key id {key_id(key)})")
                return
            result = trail_checkpoint()
        except (ImproperlyConfigured, RuntimeError) as error:
            raise CommandError(str(error)) from None
        signed = result.line["signed"]
        self.stdout.write(
            f"checkpoint #{signed['number']} at {signed['at']}: {result.anchored} chains"
            f" sealed anew, written to {sink_configured().path}"
        )
        if result.refused:
            raise CommandError(
                f"{len(result.refused)} chains were not checkpointed, being broken:\n"
                + "\n".join(f"run {chain.run_uuid}: {chain.problem}" for chain in result.refused)
            )
