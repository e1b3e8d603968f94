"""The JSON API's own tables (agentops.api): personal API tokens, the idempotency keys
of run starts, and each person's requests per minute (the rate limit).

A token's secret is never stored: only the SHA-256 of it. The secret is 32 random
bytes, so a fast hash is enough (nothing to guess from a dictionary), and the lookup is
by the token's public ``prefix``, the hash then compared in constant time.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class TokenScope(models.TextChoices):
    """What a token may ask for, always within its user's own permissions.

    Nested on one side: ``operate`` includes ``read``; ``approve`` includes ``read``
    and nothing of ``operate``. So a token for an approvals bot cannot start runs and a
    token for a CI job that starts runs cannot decide their approvals."""

    READ = "read", "Read: tasks, runs, approvals waiting, lineage"
    OPERATE = "operate", "Operate: read, start and cancel runs, create and change tasks"
    APPROVE = "approve", "Approve: read, decide approvals"


# What each scope grants: itself and what it includes.
SCOPE_INCLUDES: dict[str, frozenset[str]] = {
    TokenScope.READ: frozenset({TokenScope.READ}),
    TokenScope.OPERATE: frozenset({TokenScope.READ, TokenScope.OPERATE}),
    TokenScope.APPROVE: frozenset({TokenScope.READ, TokenScope.APPROVE}),
}


class ApiToken(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What the token is for.")
    scope = models.CharField(max_length=16, choices=TokenScope.choices)
    prefix = models.CharField(
        max_length=16, unique=True, help_text="The token's public start, to recognise it."
    )
    secret_hash = models.CharField(max_length=64, help_text="SHA-256 of the whole token, hex.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…, {self.scope})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: str) -> bool:
        return scope in SCOPE_INCLUDES[self.scope]


class IdempotencyKey(models.Model):
    """A run start asked with an ``Idempotency-Key``: the first request with the key
    starts the run; a retry by the same user gets the same run. Unique per user and key,
    so two concurrent requests start one run (the second waits on the first's INSERT and
    then finds its row)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=200)
    request_digest = models.CharField(
        max_length=64, help_text="SHA-256 of the request's task and input, canonical JSON."
    )
    run = models.ForeignKey("tasks.Run", null=True, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="api_idempotency_user_key")
        ]

    def __str__(self) -> str:
        return f"{self.key} -> {self.run_id}"


class ApiRateWindow(models.Model):
    """A person's requests in one minute, all their tokens together: one row per (user,
    minute), counted with an UPDATE ... SET count = count + 1, so every web process
    shares the count. Per person, not per token: a token costs nothing to make, so a
    limit per token would be no limit for someone who makes ten."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    minute = models.DateTimeField()
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "minute"], name="api_rate_user_minute")
        ]
        indexes = [models.Index(fields=["minute"], name="api_rate_minute")]

    def __str__(self) -> str:
        return f"{self.user_id} at {self.minute:%H:%M}: {self.count}"
