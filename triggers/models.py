from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from tasks.models import Run, Trigger


class Firing(models.Model):
    """One thing that arrived for a trigger: a schedule's slot, a delivery, a message,
    an email. Accepted, it names the run it started; refused, it says why. Nothing else
    changes it once written.

    At most one accepted firing per (trigger, key): the database refuses a second, so
    two schedulers, a redelivered message or a retried webhook start one run. Refused
    firings do not hold their key: a delivery refused for the rate limit may come again
    and be accepted once there is room."""

    trigger = models.ForeignKey(
        Trigger,
        # A trigger with a history is disabled, not deleted: its firings are the record
        # of what started which run.
        on_delete=models.PROTECT,
        related_name="firings",
    )
    key = models.CharField(max_length=200)

    class Refusal(models.TextChoices):
        DISABLED = "disabled", "Trigger disabled"
        RATE = "rate", "Over the trigger's rate limit"
        LIVE = "live", "Over the task's live runs"
        OVERLAP = "overlap", "The previous run still live"
        MISSED = "missed", "Missed while nothing ran"
        INPUT = "input", "Input refused"

    accepted = models.BooleanField()
    refusal = models.CharField(max_length=16, choices=Refusal.choices, blank=True)
    reason = models.TextField(blank=True, help_text="Why it was refused.")
    run = models.OneToOneField(
        Run, null=True, blank=True, on_delete=models.PROTECT, related_name="firing"
    )
    payload = models.JSONField(
        default=dict, blank=True, help_text="What arrived (bounded), as the mapping read it."
    )
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-received_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["trigger", "key"],
                condition=Q(accepted=True),
                name="firing_one_run_per_key",
            )
        ]
        indexes = [
            models.Index(fields=["trigger", "accepted", "received_at"], name="firing_rate_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.trigger}: {self.key} ({'accepted' if self.accepted else 'refused'})"
