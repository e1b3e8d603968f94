from __future__ import annotations

import math

from django import forms
from django.contrib import admin
from django.db import models
from django.forms.models import BaseInlineFormSet

from agentops.runtime.tools import executor_for_kind
from agentops.runtime.tools.base import reserved_schema_errors, schema_errors
from agentops.strict_json import StrictJSONFormField
from tasks import validation
from tasks.models import (
    GrantRule,
    ModelPrice,
    Run,
    Step,
    Task,
    TaskVersion,
    Tool,
    ToolGrant,
)
from tasks.services import task_version_current


class ToolGrantInline(admin.TabularInline):
    model = ToolGrant
    extra = 1
    autocomplete_fields = ["tool"]
    show_change_link = True  # the grant's page holds its rules


class GrantRuleFormSet(BaseInlineFormSet):
    """A grant's rules. Each expression is checked by the rule's own clean (it must
    parse, and call only functions CEL has here); this names the rule an error is about,
    numbered as a run numbers them: from 1, by position, then in the order they were
    made, leaving out the rows being deleted and the empty ones."""

    def clean(self) -> None:
        super().clean()
        rules = [
            (index, form)
            for index, form in enumerate(self.forms)
            if (form.instance.pk is not None or form.has_changed())
            and not form.cleaned_data.get("DELETE")
        ]

        def order(item: tuple[int, forms.ModelForm]) -> tuple[int, float, int]:
            index, form = item
            position = form.cleaned_data.get("position", form.instance.position) or 0
            return (position, form.instance.pk or math.inf, index)

        for number, (_, form) in enumerate(sorted(rules, key=order), 1):
            if "expression" in form.errors:
                form.errors["expression"] = form.error_class(
                    [
                        f"Expression of rule {number}: {message}"
                        for message in form.errors["expression"]
                    ]
                )


class GrantRuleInline(admin.TabularInline):
    model = GrantRule
    formset = GrantRuleFormSet
    extra = 1
    fields = ["position", "effect", "expression", "description"]


@admin.register(ToolGrant)
class ToolGrantAdmin(admin.ModelAdmin):
    """A grant and its rules over the tool's arguments (CEL, checked when saved)."""

    list_display = ["task", "tool"]
    list_filter = ["task"]
    inlines = [GrantRuleInline]
    autocomplete_fields = ["task", "tool"]

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        version = task_version_current(task=form.instance.task, user=request.user)
        self.message_user(request, f"{form.instance.task.name} is now at version {version.number}.")


class TaskForm(forms.ModelForm):
    """Refuses, with the reason under the field, a definition that could only fail when
    a run starts: an invalid input schema, an example input a run would refuse, a model
    that cannot run, an objective template with a stray brace or a placeholder the input
    cannot have; and a new task above Supervised, which takes a second person."""

    class Meta:
        model = Task
        fields = "__all__"  # noqa: DJ007 (the admin chooses the fields it shows)

    def clean(self) -> dict:
        cleaned = super().clean()
        schema = cleaned.get("input_schema")
        checks = {
            "input_schema": lambda: validation.input_schema_errors(schema),
            "objective_template": lambda: validation.objective_template_errors(
                cleaned["objective_template"], schema
            ),
            "model": lambda: validation.model_errors(cleaned["model"]),
            # Only on the add form: once a task exists the field is read-only here.
            "autonomy_level": lambda: validation.new_task_autonomy_errors(
                cleaned["autonomy_level"]
            ),
        }
        for field, check in checks.items():
            if field in self.fields and field in cleaned:
                for message in check():
                    self.add_error(field, message)
        # The example is checked against the schema and template only when those stand.
        if "example_input" in cleaned and not any(
            self.has_error(field) for field in ("input_schema", "objective_template")
        ):
            for message in validation.example_input_errors(
                cleaned["example_input"],
                input_schema=schema,
                template=cleaned.get("objective_template") or "",
            ):
                self.add_error("example_input", message)
        return cleaned


# The admin's JSON boxes read strict JSON, as every other input does (agentops.strict_json).
STRICT_JSON = {models.JSONField: {"form_class": StrictJSONFormField}}


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    form = TaskForm
    formfield_overrides = STRICT_JSON
    list_display = ["name", "slug", "autonomy_level", "model", "max_steps", "updated_at"]
    list_filter = ["autonomy_level"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [ToolGrantInline]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        (
            "What the agent does",
            {
                "fields": [
                    "objective_template",
                    "instructions",
                    "input_schema",
                    "example_input",
                    "model",
                ]
            },
        ),
        ("Autonomy", {"fields": ["autonomy_level", "self_check", "confidence_threshold"]}),
        (
            "Approvals",
            {
                "fields": [
                    "approver_group",
                    "four_eyes",
                    "approval_timeout_minutes",
                    "on_approval_expiry",
                    "escalation_group",
                    "step_down_rejections",
                ]
            },
        ),
        (
            "Budgets",
            {"fields": ["max_steps", "max_tokens", "max_seconds", "max_spend", "on_budget_breach"]},
        ),
        (
            "Loops and retries",
            {"fields": ["loop_repeat_limit", "stall_limit", "on_loop", "model_max_attempts"]},
        ),
    ]

    def get_readonly_fields(self, request, obj=None):
        # Once a task exists, its dial turns on the task page, where raising it takes a
        # second person and every turn is recorded in the task's trail.
        return ["autonomy_level"] if obj is not None else []

    def save_related(self, request, form, formsets, change):
        # Grants are saved with the inlines, so the version is taken after them.
        super().save_related(request, form, formsets, change)
        version = task_version_current(task=form.instance, user=request.user)
        self.message_user(request, f"{form.instance.name} is now at version {version.number}.")


class ToolForm(forms.ModelForm):
    class Meta:
        model = Tool
        fields = "__all__"  # noqa: DJ007 (the admin chooses the fields it shows)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is None:
            # A new tool is irreversible until the operator says otherwise.
            self.fields["side_effect"].initial = "irreversible"

    def clean(self) -> dict:
        cleaned = super().clean()
        kind = cleaned.get("kind")
        # A Python tool's schema comes from its code, and is read-only here.
        if "input_schema" in self.fields and "input_schema" in cleaned:
            schema = cleaned["input_schema"]
            for message in [
                *schema_errors(schema, name="The input schema"),
                *reserved_schema_errors(schema),
            ]:
                self.add_error("input_schema", message)
        if kind and kind != Tool.Kind.PYTHON:
            try:
                errors = executor_for_kind(kind).config_errors(cleaned.get("config") or {})
            except LookupError as error:
                errors = [str(error)]
            for message in errors:
                self.add_error("config", message)
            if kind == Tool.Kind.SQL and not errors:
                self.sql_clean(cleaned)
        elif kind == Tool.Kind.PYTHON and (
            self.instance.pk is None or self.instance.kind != Tool.Kind.PYTHON
        ):
            self.add_error("kind", "Python tools are declared in code with @tool, not here.")
        if kind == Tool.Kind.EMAIL and cleaned.get("side_effect") == "read":
            self.add_error("side_effect", "Sending email is never read-only.")
        return cleaned

    def sql_clean(self, cleaned: dict) -> None:
        from agentops.runtime.tools.sql import query_schema_errors

        config = cleaned.get("config") or {}
        if not self.has_error("input_schema"):
            for message in query_schema_errors(config, cleaned.get("input_schema") or {}):
                self.add_error("input_schema", message)
        if config.get("mode") == "write":
            if cleaned.get("side_effect") == "read":
                self.add_error("side_effect", "A write tool cannot be read-only.")
            if cleaned.get("idempotency") == "key":
                self.add_error(
                    "idempotency",
                    "A SQL write never sees the idempotency key, so a repeat repeats it: "
                    "choose none.",
                )


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    form = ToolForm
    formfield_overrides = STRICT_JSON
    list_display = ["name", "kind", "side_effect", "idempotency", "always_approve", "available"]
    list_filter = ["kind", "side_effect", "always_approve", "available"]
    search_fields = ["name", "description"]

    def get_readonly_fields(self, request, obj=None):
        # A code tool's contract is declared in code; the operator adds hard gates.
        if obj is not None and obj.kind == Tool.Kind.PYTHON:
            return [
                "name",
                "kind",
                "description",
                "input_schema",
                "side_effect",
                "idempotency",
                "available",
                "config",
                "timeout_seconds",
            ]
        return []


@admin.register(TaskVersion)
class TaskVersionAdmin(admin.ModelAdmin):
    list_display = ["task", "number", "created_at", "created_by"]
    readonly_fields = ["task", "number", "definition", "digest", "created_at", "created_by"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class StepInline(admin.TabularInline):
    model = Step
    fields = ["number", "kind", "status", "tool_name", "idempotency_key", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Runs change only through the runtime and the pages; the admin shows them."""

    list_display = ["id", "task", "status", "created_at", "steps_used"]
    list_filter = ["status", "task"]
    inlines = [StepInline]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Run._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ["model", "input_per_million", "output_per_million", "updated_at"]
    search_fields = ["model"]
