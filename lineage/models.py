from __future__ import annotations

from django.db import models

GENESIS_HASH = "0" * 64


class LineageEvent(models.Model):
    """One immutable entry in a run's trail.

    ``hash = sha256(prev_hash || canonical JSON of the event)``, so a changed, removed or
    reordered event breaks every hash after it. The database refuses UPDATE and DELETE
    (triggers installed by migration 0002). The run is stored by UUID, not by foreign
    key, so no delete anywhere can cascade into the trail.
    """

    run_uuid = models.UUIDField(db_index=False)
    seq = models.PositiveIntegerField()
    at = models.DateTimeField()
    kind = models.CharField(max_length=64)
    actor = models.CharField(max_length=150)
    payload = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["run_uuid", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["run_uuid", "seq"], name="lineage_event_run_seq_unique")
        ]

    def __str__(self) -> str:
        return f"{self.run_uuid} #{self.seq} {self.kind}"
