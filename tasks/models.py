from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from agentops import states

TOOL_NAME_VALIDATOR = RegexValidator(
    r"^[A-Za-z0-9_-]{1,64}$",
    "Use 1 to 64 letters, digits, underscores or hyphens (the model sees this name).",
)


def zero_or_at_least_two(value: int) -> None:
    if value == 1:
        raise ValidationError("0 turns loop detection off; otherwise a loop is 2 repeats or more.")


class SideEffect(models.TextChoices):
    READ = "read", "Read only"
    REVERSIBLE = "reversible", "Reversible"
    IRREVERSIBLE = "irreversible", "Irreversible"


class AutonomyLevel(models.IntegerChoices):
    SHADOW = 0, "0 · Shadow"
    SUPERVISED = 1, "1 · Supervised"
    GUARDED = 2, "2 · Guarded"
    AUTONOMOUS = 3, "3 · Autonomous"


class Tool(models.Model):
    """A typed action an agent may be granted. Python tools are declared in code with
    ``@agentops.runtime.tools.tool`` and synced here; the operator sets ``always_approve``."""

    class Kind(models.TextChoices):
        PYTHON = "python", "Python function"
        HTTP = "http", "HTTP request"
        SQL = "sql", "SQL query"
        EMAIL = "email", "Email"
        MCP = "mcp", "MCP server tool"

    class Idempotency(models.TextChoices):
        NONE = "none", "None: a repeat may repeat the effect"
        KEY = "key", "Key: a repeat with the same key has no new effect"

    name = models.CharField(max_length=64, unique=True, validators=[TOOL_NAME_VALIDATOR])
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.PYTHON)
    description = models.TextField(blank=True)
    input_schema = models.JSONField(default=dict)
    side_effect = models.CharField(max_length=16, choices=SideEffect.choices)
    idempotency = models.CharField(max_length=8, choices=Idempotency.choices, default="none")
    always_approve = models.BooleanField(
        default=False, help_text="Hold every call for a person, whatever the task's autonomy."
    )
    retry_max_attempts = models.PositiveSmallIntegerField(
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text="Attempts when the call fails transiently without effect.",
    )
    retry_backoff_seconds = models.FloatField(
        default=0.5,
        validators=[MinValueValidator(0.0), MaxValueValidator(60.0)],
        help_text="The first retry's delay; each next one doubles, with jitter.",
    )
    available = models.BooleanField(
        default=True, help_text="False when the code that implements the tool is gone."
    )
    config = models.JSONField(
        default=dict,
        blank=True,
        help_text="What the tool's kind needs (URL, database, server...). Credentials are "
        "named as secret:NAME and read from the environment at call time.",
    )
    timeout_seconds = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600.0)],
        help_text="How long one call may take (http, sql, email and mcp tools; python tools "
        "too on the async worker, where a call past it is reported failed, as it may still "
        "take effect).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def idempotent(self) -> bool:
        return self.idempotency == self.Idempotency.KEY


class Task(models.Model):
    """A named definition operators author. Editing it makes a new TaskVersion the next
    time it is saved or started; a Run pins the version it started on."""

    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    objective_template = models.TextField(
        help_text="What the agent is asked to achieve. {field} inserts a top-level input field."
    )
    instructions = models.TextField(blank=True, help_text="Standing guidance for the agent.")
    input_schema = models.JSONField(
        default=dict, blank=True, help_text="JSON Schema the run's input must match."
    )
    example_input = models.JSONField(default=dict, blank=True)
    model = models.CharField(
        max_length=200,
        blank=True,
        help_text="Model name on the OpenAI-compatible server (blank: AGENTOPS_MODEL), "
        "or scripted:NAME for a scripted, offline model.",
    )
    max_steps = models.PositiveIntegerField(
        default=30,
        validators=[MinValueValidator(1), MaxValueValidator(10_000)],
        help_text="Every model turn, plan revision, self-check and tool call is a step.",
    )
    max_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Tokens in and out, all model calls together. Blank: no limit.",
    )
    max_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Seconds of work (time waiting for a person or in the queue not counted). "
        "Blank: no limit.",
    )
    max_spend = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text="Model spend, from the model price table. Blank: no limit.",
    )
    on_budget_breach = models.CharField(
        max_length=8,
        choices=[("halt", "Halt the run"), ("ask", "Ask a person for more")],
        default="halt",
    )
    loop_repeat_limit = models.PositiveSmallIntegerField(
        default=3,
        validators=[zero_or_at_least_two],
        help_text="The same call returning the same result this many times is a loop. 0: off.",
    )
    stall_limit = models.PositiveSmallIntegerField(
        default=8,
        help_text="This many tool calls in a row without a new result is a stall. 0: off.",
    )
    on_loop = models.CharField(
        max_length=8,
        choices=[("halt", "Halt the run"), ("ask", "Ask a person whether to go on")],
        default="halt",
    )
    self_check = models.BooleanField(
        default=True,
        help_text="Before finishing, the agent checks its outcome and reports its confidence.",
    )
    confidence_threshold = models.FloatField(
        default=0.7,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text=(
            "Below this self-reported confidence, a person reviews the outcome; at Guarded, a "
            "reversible call below it waits for a person."
        ),
    )
    model_max_attempts = models.PositiveSmallIntegerField(
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text="Attempts per model call when the server fails transiently (429, 5xx, timeouts).",
    )
    autonomy_level = models.PositiveSmallIntegerField(
        choices=AutonomyLevel.choices, default=AutonomyLevel.SUPERVISED
    )
    tools = models.ManyToManyField(Tool, through="ToolGrant", related_name="tasks")
    approver_group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        # Deleting the group would clear it, letting anyone with the decide permission
        # approve, with no second person (tasks.governance): a group in use stays.
        on_delete=models.PROTECT,
        related_name="+",
        help_text="Who decides this task's approvals (members holding the decide permission). "
        "Blank: anyone holding it.",
    )
    max_live_runs = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Runs of this task that may be live (queued, running or waiting) at once; a "
        "trigger's firing past it is refused and recorded. Blank: no limit.",
    )
    four_eyes = models.BooleanField(
        default=False, help_text="Nobody decides an approval on a run they started."
    )
    approval_timeout_minutes = models.PositiveIntegerField(
        default=24 * 60,
        validators=[MinValueValidator(1)],
        help_text="How long an approval waits before it expires.",
    )
    on_approval_expiry = models.CharField(
        max_length=10,
        choices=[
            ("reject", "Reject it (an action: the agent re-plans; any other kind halts)"),
            ("halt", "Halt the run"),
            ("escalate", "Pass it to the escalation group, then reject"),
        ],
        default="reject",
    )
    step_down_rejections = models.PositiveSmallIntegerField(
        default=3,
        help_text="This many rejections among the last 20 decided actions lower the "
        "autonomy level by one, by itself. 0: never.",
    )
    escalation_group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Who gets an approval that expired unseen, when the task escalates.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(max_spend__isnull=True) | models.Q(max_spend__gte=0),
                name="task_max_spend_not_negative",
            )
        ]

    def __str__(self) -> str:
        return self.name


class AutonomyChange(models.Model):
    """A turn of a task's autonomy dial. Raising it above Supervised needs a second
    person's confirmation; lowering takes effect at once; the track record can lower it
    by itself (requested_by is then empty)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPLIED = "applied"
        DECLINED = "declined"
        # The dial moved, or a newer request was made, before anyone decided.
        WITHDRAWN = "withdrawn"

    task = models.ForeignKey("Task", on_delete=models.CASCADE, related_name="autonomy_changes")
    from_level = models.PositiveSmallIntegerField(choices=AutonomyLevel.choices)
    to_level = models.PositiveSmallIntegerField(choices=AutonomyLevel.choices)
    reason = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    confirmed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.task.slug}: {self.from_level} → {self.to_level} ({self.status})"


class Incident(models.Model):
    """An operator flags a run as having gone wrong: it counts against the task's record
    and steps its autonomy down."""

    run = models.ForeignKey("Run", on_delete=models.CASCADE, related_name="incidents")
    note = models.TextField()
    flagged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"incident on {self.run_id}: {self.note[:60]}"


class TaskVersion(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    definition = models.JSONField()
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["task", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["task", "number"], name="task_version_unique")
        ]

    def __str__(self) -> str:
        return f"{self.task.slug} v{self.number}"


class ToolGrant(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="grants")
    tool = models.ForeignKey(Tool, on_delete=models.PROTECT, related_name="grants")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tool__name"]
        constraints = [models.UniqueConstraint(fields=["task", "tool"], name="tool_grant_unique")]

    def __str__(self) -> str:
        return f"{self.task.slug} → {self.tool.name}"


class GrantRule(models.Model):
    """A rule over a granted tool's arguments, in CEL: ``args.amount > 1000``."""

    class Effect(models.TextChoices):
        ALLOW = "allow", "Allow (calls must match an allow rule)"
        DENY = "deny", "Deny"
        APPROVE = "approve", "Require a person's approval"

    grant = models.ForeignKey(ToolGrant, on_delete=models.CASCADE, related_name="rules")
    position = models.PositiveSmallIntegerField(default=0)
    expression = models.TextField(help_text="CEL over args, e.g. args.amount > 1000")
    effect = models.CharField(max_length=8, choices=Effect.choices)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["grant", "position", "pk"]

    def __str__(self) -> str:
        return f"{self.effect}: {self.expression}"

    def clean(self) -> None:
        from agentops.runtime.rules import RuleError, rule_check

        try:
            rule_check(self.expression)
        except RuleError as error:
            raise ValidationError({"expression": str(error)}) from None


def trigger_public_id() -> str:
    """An unguessable id for a trigger's URL (192 bits)."""
    import secrets

    return secrets.token_urlsafe(24)


class Trigger(models.Model):
    """How runs of a task start on their own: a schedule, a webhook, a queue message or
    an inbound email (a person's Run button needs no row). Every firing names a key
    unique to the trigger (the slot, the webhook-id, the message id, the Message-ID), so
    a firing seen twice (two schedulers, a redelivered message, a retried webhook)
    starts one run. What each kind needs is in ``config``, checked by
    ``triggers.config.config_errors``; the firings are ``triggers.Firing`` rows."""

    class Kind(models.TextChoices):
        MANUAL = "manual", "Manual (a person, the shell)"
        CRON = "cron", "Schedule (cron)"
        WEBHOOK = "webhook", "Webhook"
        QUEUE = "queue", "Queue message"
        EMAIL = "email", "Inbound email"

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="triggers")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.MANUAL)
    name = models.CharField(max_length=120)
    enabled = models.BooleanField(default=True)
    config = models.JSONField(
        default=dict, blank=True, help_text="What this kind of trigger needs (see the guide)."
    )
    input_mapping = models.TextField(
        blank=True,
        help_text="A JMESPath expression that makes the run's input from what arrived "
        "(a webhook's JSON body, a message, an email's fields). Blank: all of it.",
    )
    public_id = models.CharField(
        max_length=40,
        unique=True,
        default=trigger_public_id,
        editable=False,
        help_text="The unguessable part of a webhook's URL.",
    )
    secret = models.CharField(
        max_length=100, blank=True, editable=False, help_text="A webhook's signing secret."
    )
    previous_secret = models.CharField(max_length=100, blank=True, editable=False)
    previous_secret_until = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="Until when the previous secret holds."
    )
    max_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Runs this trigger may start in any minute; a firing past it is refused "
        "and recorded. Blank: no limit.",
    )
    max_per_hour = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Runs this trigger may start in any hour. Blank: no limit.",
    )
    cursor = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="A schedule's last slot considered: fired, skipped or refused.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["task", "name", "pk"]

    def __str__(self) -> str:
        return f"{self.task.slug}: {self.name}"


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HALTED = "halted"
    CANCELLED = "cancelled"


LIVE_RUN_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


class Run(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="runs")
    task_version = models.ForeignKey(TaskVersion, on_delete=models.PROTECT, related_name="runs")
    trigger = models.ForeignKey(Trigger, null=True, blank=True, on_delete=models.SET_NULL)
    trigger_kind = models.CharField(max_length=16, default=Trigger.Kind.MANUAL)
    firing_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    input = models.JSONField(default=dict)
    objective = models.TextField()
    model_label = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    outcome = models.TextField(blank=True, help_text="The agent's final answer.")
    reason = models.TextField(blank=True, help_text="Why the run failed, halted or waits.")
    steps_used = models.PositiveIntegerField(default=0)
    tokens_in = models.PositiveBigIntegerField(default=0)
    tokens_out = models.PositiveBigIntegerField(default=0)
    spend = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    seconds_used = models.FloatField(default=0.0, help_text="Seconds of work so far.")
    budget_extra = models.JSONField(
        default=dict, blank=True, help_text="Budget granted by people on top of the task's."
    )
    plan = models.JSONField(default=list, blank=True, help_text="The agent's current plan.")
    confidence = models.FloatField(null=True, blank=True)
    loops_accepted_through = models.PositiveIntegerField(
        default=0, help_text="A person let the run go on past a loop up to this step."
    )
    queued_at = models.DateTimeField(
        null=True, blank=True, help_text="When the run last went to the queue."
    )
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    waiting_on = models.CharField(
        max_length=200,
        blank=True,
        help_text="What the run's worker waits for now, when not the model or a tool "
        "themselves: its provider's capacity (AGENTOPS_PROVIDER_LIMITS).",
    )
    recoveries = models.PositiveSmallIntegerField(
        default=0,
        help_text="Times in a row a worker stopped while working on the run, with no step "
        "recorded in between.",
    )
    recovery_progress = models.PositiveIntegerField(
        default=0,
        help_text="How far the run had got when it was last recovered: its last step's "
        "number plus its settled steps.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("start_run", "Can start runs"), ("cancel_run", "Can cancel runs")]
        indexes = [
            # The runs list, newest first, and the overview's month of runs: without it
            # PostgreSQL sorts every run to show fifty.
            models.Index(fields=["-created_at"], name="run_created"),
            models.Index(fields=["status", "created_at"], name="run_status_created"),
            models.Index(fields=["task", "-created_at"], name="run_task_created"),
        ]

    def __str__(self) -> str:
        return f"{self.task.slug} {self.id}"

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_RUN_STATUSES

    @property
    def is_finished(self) -> bool:
        return states.RUN.terminal(self.status)

    @property
    def is_scripted(self) -> bool:
        return self.model_label.startswith("scripted:")

    @property
    def step_limit(self) -> int:
        """The task version's step budget plus any steps people granted this run."""
        return self.task_version.definition["max_steps"] + self.budget_extra.get("steps", 0)


class ModelPrice(models.Model):
    """What a model costs, per million tokens; the spend budget is counted with it."""

    model = models.CharField(max_length=200, unique=True, help_text="As the task names it.")
    # A negative price would shrink the spend counted, and no spend budget would bind.
    input_per_million = models.DecimalField(
        max_digits=12, decimal_places=4, validators=[MinValueValidator(Decimal(0))]
    )
    output_per_million = models.DecimalField(
        max_digits=12, decimal_places=4, validators=[MinValueValidator(Decimal(0))]
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(input_per_million__gte=0, output_per_million__gte=0),
                name="model_price_not_negative",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model}: {self.input_per_million} in, {self.output_per_million} out per 1M"


class StepKind(models.TextChoices):
    MODEL = "model"
    TOOL = "tool"
    PLAN = "plan"
    CHECK = "check"
    HUMAN = "human"


class StepStatus(models.TextChoices):
    PROPOSED = "proposed"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    REFUSED = "refused"
    SIMULATED = "simulated"


class Step(models.Model):
    """One numbered unit of work in a run. A model step records the model's turn (its
    text and the tool calls it asked for); a tool step is the ledger entry of one call."""

    # No index of its own: the unique (run, number) index below serves every lookup by
    # run, and one index fewer is one write fewer for each step a run records.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps", db_index=False)
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=8, choices=StepKind.choices)
    status = models.CharField(max_length=16, choices=StepStatus.choices)
    content = models.TextField(blank=True, help_text="The model's text for this turn.")
    tool_calls = models.JSONField(default=list, blank=True)
    tool = models.ForeignKey(Tool, null=True, blank=True, on_delete=models.PROTECT)
    tool_name = models.CharField(max_length=64, blank=True)
    tool_call_id = models.CharField(max_length=100, blank=True)
    arguments = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=100, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    gate = models.CharField(max_length=300, blank=True, help_text="Why the call was held.")
    confidence = models.FloatField(
        null=True, blank=True, help_text="The agent's confidence in this call, from 0 to 1."
    )
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "number"]
        constraints = [models.UniqueConstraint(fields=["run", "number"], name="step_run_number")]
        indexes = [
            # The tools list and a tool's page: a tool's calls counted, its latest ones,
            # their outcomes and latency, all read from the index alone (the id too, as
            # Count("pk") counts it). Only tool steps are in it, so the steps of model
            # turns and plans (most of them) cost it no write.
            models.Index(
                fields=["tool", "-created_at"],
                include=["id", "status", "duration_ms"],
                condition=models.Q(tool__isnull=False),
                name="step_tool_created",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.number} {self.kind} {self.status}"


class ConfigChange(models.Model):
    """A change to a task (its fields, grants and rules) or to a tool that lets more run
    without a person: it waits here until a second person confirms it, as raising the
    autonomy dial does (tasks.governance). Exactly one of ``task`` and ``tool`` is set.

    ``operations`` holds each change with the value it replaces, so a change that no
    longer applies (the object moved meanwhile) is refused, not applied over it. Nothing
    edits a change once it is made: it is decided, or superseded."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPLIED = "applied"
        REJECTED = "rejected"
        # The object changed, or a newer request replaced this one, before anyone decided.
        SUPERSEDED = "superseded"

    task = models.ForeignKey(
        Task, null=True, blank=True, on_delete=models.CASCADE, related_name="config_changes"
    )
    tool = models.ForeignKey(
        Tool, null=True, blank=True, on_delete=models.CASCADE, related_name="config_changes"
    )
    operations = models.JSONField()
    summary = models.TextField(help_text="What the change does, one line per operation.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    reason = models.TextField(blank=True, help_text="Why it was rejected or superseded.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(task__isnull=False, tool__isnull=True)
                | models.Q(task__isnull=True, tool__isnull=False),
                name="config_change_one_target",
            )
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="config_change_status")]

    def __str__(self) -> str:
        target = self.task.slug if self.task_id else self.tool.name
        return f"{target}: {self.summary.splitlines()[0] if self.summary else ''} ({self.status})"

    @property
    def target(self) -> Task | Tool:
        return self.task if self.task_id else self.tool
