from __future__ import annotations

from django.conf import settings
from django.db import models

from tasks.models import Run, Step


class ApprovalKind(models.TextChoices):
    ACTION = "action", "Approve an action"
    UNKNOWN_OUTCOME = "unknown_outcome", "Resolve an unknown outcome"
    OUTCOME_REVIEW = "outcome_review", "Review an outcome"
    BUDGET_EXTENSION = "budget_extension", "Extend a budget"
    LOOP_REVIEW = "loop_review", "Review a possible loop"
    QUESTION = "question", "Answer the agent's question"


class Resolution(models.TextChoices):
    """How a person resolves a call whose outcome is unknown."""

    HAPPENED = "happened", "It happened"
    REFIRE = "refire", "It did not happen: make the call"
    STOP = "stop", "Stop the run"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Approval(models.Model):
    """A human checkpoint. For an action it is bound to one exact call: ``call_digest``
    is the hash of the tool name and arguments, and the engine fires only a call whose
    digest matches an approved Approval."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="approvals")
    step = models.ForeignKey(
        Step, null=True, blank=True, on_delete=models.CASCADE, related_name="approvals"
    )
    kind = models.CharField(max_length=16, choices=ApprovalKind.choices)
    status = models.CharField(
        max_length=16, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING
    )
    tool_name = models.CharField(max_length=64, blank=True)
    arguments = models.JSONField(null=True, blank=True)
    call_digest = models.CharField(max_length=64, blank=True)
    side_effect = models.CharField(max_length=16, blank=True)
    gate = models.CharField(max_length=300, help_text="The rule or gate that stopped the call.")
    reasoning = models.TextField(blank=True, help_text="What the agent said before this call.")
    group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Who may decide it now. Blank: anyone holding the decide permission.",
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    escalated = models.BooleanField(default=False)
    reminded_at = models.DateTimeField(null=True, blank=True)
    edited_arguments = models.JSONField(
        null=True, blank=True, help_text="The arguments as a person edited them, if they did."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    decision_reason = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    context = models.JSONField(
        default=dict,
        blank=True,
        help_text="Budget used and left, the proposed extension, evidence.",
    )
    resolution = models.CharField(max_length=16, choices=Resolution.choices, blank=True)
    resolution_result = models.JSONField(
        null=True, blank=True, help_text="The call's result, as the person knows it."
    )

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["status", "created_at"], name="approval_status_created"),
            models.Index(fields=["status", "expires_at"], name="approval_status_expires"),
            # The inbox's decided list and a task's track record, latest decision first.
            models.Index(fields=["-decided_at"], name="approval_decided"),
        ]
        permissions = [("decide_approval", "Can decide approvals")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.tool_name} ({self.status})"

    @property
    def is_pending(self) -> bool:
        return self.status == ApprovalStatus.PENDING
