from __future__ import annotations

import json
from typing import Any

from django.db import models

GENESIS_HASH = "0" * 64

# How an event's hash was computed. 0: over canonical JSON rebuilt from the columns and
# the jsonb payload (events written before migration 0003; PostgreSQL's jsonb rewrites
# some numbers, so such an event may read back unlike what was hashed). 1: over
# ``canonical``, the exact text hashed, kept in a text column the database stores as is.
HASH_COLUMNS = 0
HASH_CANONICAL = 1
UNREADABLE = "[this event's recorded text is not an event: it was changed]"


class LineageEvent(models.Model):
    """One immutable entry in a run's trail.

    ``hash = sha256(prev_hash || canonical)``, where ``canonical`` is the event (run,
    seq, at, kind, actor, payload) as ASCII JSON, stored as the very text that was
    hashed; so a changed, removed or reordered event breaks every hash after it. The
    other columns are copies for queries and lists: the verifier checks that they agree
    with the canonical text, and pages show the payload read from it (``body``), since
    ``payload`` is jsonb on PostgreSQL, which may rewrite numbers and cannot hold every
    string. The database refuses UPDATE, DELETE and REPLACE (lineage.triggers). The run
    is stored by UUID, not by foreign key, so no delete anywhere can cascade into the
    trail.
    """

    run_uuid = models.UUIDField(db_index=False)
    seq = models.PositiveIntegerField()
    at = models.DateTimeField()
    kind = models.CharField(max_length=64)
    actor = models.CharField(max_length=150)
    payload = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)
    canonical = models.TextField(default="", blank=True)
    hash_version = models.PositiveSmallIntegerField(default=HASH_COLUMNS)

    class Meta:
        ordering = ["run_uuid", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run_uuid", "seq"], name="lineage_event_run_seq_unique")
        ]
        # A period's export (lineage.export_lines) reads every trail's events by time.
        indexes = [
            models.Index(fields=["at"], name="lineage_event_at"),
            # /metrics counts lease recoveries at every scrape (agentops.metrics).
            models.Index(
                fields=["kind"],
                condition=models.Q(kind="run.recovered"),
                name="lineage_event_recovered",
            ),
        ]
        # Reading a run's trail needs a login; taking every trail of a period away at once
        # is a bulk export, and needs this.
        permissions = [("export_period", "Can export every trail's events in a period")]

    def __str__(self) -> str:
        return f"{self.run_uuid} #{self.seq} {self.kind}"

    @property
    def body(self) -> Any:
        """The payload exactly as it was hashed: read from the canonical text when there
        is one (``payload`` is only the storable copy)."""
        if self.hash_version != HASH_CANONICAL:
            return self.payload
        try:
            return json.loads(self.canonical)["payload"]
        except (ValueError, KeyError, TypeError):
            # Only a hand changing the table makes this; the verifier reports it.
            return UNREADABLE
