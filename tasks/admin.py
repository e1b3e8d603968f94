from __future__ import annotations

import math

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from agentops.admin import ReadOnlyAdmin
from agentops.bad_input import BadInput, id_parse
from agentops.runtime.tools import executor_for_kind
from agentops.runtime.tools.base import reserved_schema_errors, schema_errors
from agentops.strict_json import StrictJSONFormField
from tasks import governance, validation
from tasks.models import (
    ConfigChange,
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

# Governed configuration (tasks.governance): the task, tool and grant pages below write
# nothing themselves. save_model and save_formset gather what the form asks for (the
# formsets with commit=False, which lists new, changed and deleted rows and writes
# nothing); save_related hands it all to one governance service, which applies what
# narrows and holds what widens for a second person, and the page says which.


def governed_request(form: forms.Form) -> dict:
    """What the admin's save asks of the governance service, gathered on the main form
    (the one object every save hook is handed)."""
    if not hasattr(form, "governed"):
        form.governed = {}
    return form.governed


def governed_submit(request, submit, **arguments) -> governance.Submission:
    """Hand the save to the governance service and tell the person what waits. A refusal
    the form could not foresee (another save won a race) is shown, and nothing of this
    save is applied."""
    try:
        with transaction.atomic():
            submission = submit(user=request.user, **arguments)
    except governance.GovernanceError as error:
        messages.error(request, f"Nothing of this save was applied: {error}.")
        return governance.Submission()
    governed_report(request, submission)
    return submission


def governed_report(request, submission: governance.Submission) -> None:
    """Tell the person what waits: saved, except the part that widens."""
    if submission.held is None:
        return
    url = reverse("tasks:config_change", args=[submission.held.pk])
    messages.warning(
        request,
        format_html(
            "Saved, except what lets more run without a person: it waits for a second "
            'person to confirm it (<a href="{}">change #{}</a>): {}',
            url,
            submission.held.pk,
            format_html_join("; ", "{}", ((line,) for line in submission.held_lines)),
        ),
    )


def governed_waiting_notice(request, **target) -> None:
    """On the change page: what of this object waits for a second person, linked, so
    nobody edits it unaware (a save touching the same field supersedes it)."""
    if request.method != "GET":
        return
    try:  # the admin answers an id that is not one itself
        target = {key: id_parse(value, field="id", what="an id") for key, value in target.items()}
    except BadInput:
        return
    waiting = ConfigChange.objects.filter(status=ConfigChange.Status.PENDING, **target)
    for change in waiting.order_by("created_at", "pk"):
        messages.info(
            request,
            format_html(
                '<a href="{}">Change #{}</a> waits for a second person: {}',
                reverse("tasks:config_change", args=[change.pk]),
                change.pk,
                "; ".join(change.summary.splitlines()),
            ),
        )


class ToolGrantInlineFormSet(BaseInlineFormSet):
    """A grant's tool is fixed once granted: changing it would carry the grant's rules to
    another tool, and grant that tool past the governance of a new grant."""

    def clean(self) -> None:
        super().clean()
        for form in self.forms:
            if form.instance.pk is not None and "tool" in form.changed_data:
                form.add_error(
                    "tool",
                    "A grant's tool cannot be changed: remove this grant and grant the "
                    "other tool in a new row.",
                )


class ToolGrantInline(admin.TabularInline):
    model = ToolGrant
    formset = ToolGrantInlineFormSet
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

    def get_readonly_fields(self, request, obj=None):
        # A grant's task and tool are fixed: moving it would carry its rules elsewhere.
        return ["task", "tool"] if obj is not None else []

    def save_model(self, request, obj, form, change):
        governed_request(form)  # nothing written here: see save_related

    def save_formset(self, request, form, formset, change):
        formset.save(commit=False)  # lists the rows; writes nothing
        drafts = [rule_draft(rule) for rule in formset.new_objects]
        governed = governed_request(form)
        if not change:
            governed["new_rules"] = drafts
            return
        governed["rules_added"] = [(form.instance.pk, draft) for draft in drafts]
        governed["rules_changed"] = [rule_draft(rule) for rule, _ in formset.changed_objects]
        governed["rules_removed"] = [rule.pk for rule in formset.deleted_objects]

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        governed = governed_request(form)
        grant = form.instance
        if change:
            governed_submit(
                request,
                governance.task_change_submit,
                task=grant.task,
                rules_added=governed.get("rules_added", ()),
                rules_changed=governed.get("rules_changed", ()),
                rules_removed=governed.get("rules_removed", ()),
            )
        else:
            submission = governed_submit(
                request,
                governance.task_change_submit,
                task=grant.task,
                grants_added=[(grant.tool, governed.get("new_rules", []))],
            )
            if submission.new_grants:
                grant.pk = submission.new_grants[0].pk
        version = task_version_current(task=grant.task, user=request.user)
        self.message_user(request, f"{grant.task.name} is now at version {version.number}.")

    def log_addition(self, request, obj, message):
        if obj.pk is not None:  # a grant held for a second person is not made yet
            return super().log_addition(request, obj, message)
        return None

    def response_add(self, request, obj, post_url_continue=None):
        if obj.pk is None:
            return HttpResponseRedirect(reverse("tasks:detail", args=[obj.task.slug]))
        return super().response_add(request, obj, post_url_continue)

    def delete_model(self, request, obj):
        governance.grant_delete(grant=obj, user=request.user)

    def delete_queryset(self, request, queryset):
        for grant in queryset.select_related("task"):
            governance.grant_delete(grant=grant, user=request.user)


def rule_draft(rule: GrantRule) -> governance.RuleDraft:
    return governance.RuleDraft(
        position=rule.position,
        effect=rule.effect,
        expression=rule.expression,
        description=rule.description,
        rule_id=rule.pk,
    )


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
        (
            "Triggers",
            {
                "fields": ["max_live_runs", "triggers_listed"],
                "description": "What starts this task's runs without a person: each "
                "trigger has its own page (Triggers in the admin).",
            },
        ),
    ]

    def get_readonly_fields(self, request, obj=None):
        # Once a task exists, its dial turns on the task page, where raising it takes a
        # second person and every turn is recorded in the task's trail. The live-run cap
        # is shown, not edited, here: governance does not govern it yet, and a change
        # page that saves only governed fields would drop it silently.
        listed = ["triggers_listed", "max_live_runs"]
        return ["autonomy_level", *listed] if obj is not None else listed

    @admin.display(description="triggers")
    def triggers_listed(self, obj: Task | None) -> str:
        if obj is None or obj.pk is None:
            return "Add triggers once the task is saved."
        rows = format_html_join(
            "",
            '<li><a href="{}">{}</a> ({}{})</li>',
            (
                (
                    reverse("admin:tasks_trigger_change", args=[trigger.pk]),
                    trigger.name,
                    trigger.get_kind_display(),
                    "" if trigger.enabled else ", disabled",
                )
                for trigger in obj.triggers.order_by("name", "pk")
            ),
        )
        add = reverse("admin:tasks_trigger_add") + f"?task={obj.pk}"
        return format_html(
            '<ul>{}</ul><a class="addlink" href="{}">Add a trigger</a>',
            rows or format_html("<li>{}</li>", "none: only a person starts its runs"),
            add,
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        governed_waiting_notice(request, task_id=object_id)
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if not change:
            # A new task is at most Supervised (TaskForm) and grants nothing yet: made at
            # once and recorded; its grants go through governance with the inlines.
            super().save_model(request, obj, form, change)
            governance.object_created(target=obj, user=request.user)
            return
        governed_request(form)["values"] = {
            name: form.cleaned_data[name]
            for name in form.fields
            if name in governance.TASK_FIELDS and name in form.cleaned_data
        }

    def save_formset(self, request, form, formset, change):
        formset.save(commit=False)  # lists the rows; writes nothing
        if formset.model is ToolGrant:
            governed = governed_request(form)
            governed["grants_added"] = [(grant.tool, ()) for grant in formset.new_objects]
            governed["grants_removed"] = [grant.pk for grant in formset.deleted_objects]

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        governed_submit(
            request, governance.task_change_submit, task=form.instance, **governed_request(form)
        )
        # Taken after the grants, which are saved with the inlines.
        version = task_version_current(task=form.instance, user=request.user)
        self.message_user(request, f"{form.instance.name} is now at version {version.number}.")

    def delete_model(self, request, obj):
        governance.object_deleted(target=obj, user=request.user)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for task in queryset:
            self.delete_model(request, task)


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
        name = cleaned.get("name")
        if name and name != self.instance.name:
            pinned = governance.tool_name_pinned_by(name)
            if pinned:
                self.add_error("name", pinned)
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
        for message in validation.tool_side_effect_errors(
            kind=kind, config=cleaned.get("config") or {}, side_effect=cleaned.get("side_effect")
        ):
            self.add_error("side_effect", message)
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

    def change_view(self, request, object_id, form_url="", extra_context=None):
        governed_waiting_notice(request, tool_id=object_id)
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if not change:
            # A new tool is granted to no task: nothing runs with it until it is.
            super().save_model(request, obj, form, change)
            governance.object_created(target=obj, user=request.user)
            return
        governed_submit(
            request,
            governance.tool_change_submit,
            tool=obj,
            values={
                name: form.cleaned_data[name]
                for name in form.fields
                if name in governance.TOOL_FIELDS and name in form.cleaned_data
            },
        )

    def delete_model(self, request, obj):
        governance.object_deleted(target=obj, user=request.user)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for tool in queryset:
            self.delete_model(request, tool)


@admin.register(ConfigChange)
class ConfigChangeAdmin(ReadOnlyAdmin):
    """Changes that wait for a second person. Read here, decided on their own page (or by
    the actions below), never edited: what was asked is what gets confirmed."""

    list_display = ["pk", "target_label", "status", "requested_by", "decided_by", "created_at"]
    list_filter = ["status"]
    readonly_fields = [
        "task",
        "tool",
        "summary",
        "operations",
        "status",
        "reason",
        "requested_by",
        "decided_by",
        "created_at",
        "decided_at",
    ]
    actions = ["confirm_selected", "reject_selected"]

    @admin.display(description="target")
    def target_label(self, obj: ConfigChange) -> str:
        return f"task {obj.task.slug}" if obj.task_id else f"tool {obj.tool.name}"

    def decide(self, request, queryset, *, confirm: bool) -> None:
        # Offered to whoever may view the list: the service checks, change by change,
        # who may decide it.
        for change in queryset:
            try:
                governance.config_change_decide(change=change, user=request.user, confirm=confirm)
            except (governance.GovernanceError, PermissionDenied) as error:
                self.message_user(request, f"Change #{change.pk}: {error}.", messages.ERROR)
            else:
                verb = "confirmed and applied" if confirm else "rejected"
                self.message_user(request, f"Change #{change.pk} {verb}.", messages.SUCCESS)

    @admin.action(description="Confirm the selected changes (as the second person)")
    def confirm_selected(self, request, queryset):
        self.decide(request, queryset, confirm=True)

    @admin.action(description="Reject the selected changes")
    def reject_selected(self, request, queryset):
        self.decide(request, queryset, confirm=False)


@admin.register(TaskVersion)
class TaskVersionAdmin(ReadOnlyAdmin):
    list_display = ["task", "number", "created_at", "created_by"]
    readonly_fields = ["task", "number", "definition", "digest", "created_at", "created_by"]


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
class RunAdmin(ReadOnlyAdmin):
    """Runs change only through the runtime and the pages; the admin shows them."""

    list_display = ["id", "task", "status", "created_at", "steps_used"]
    list_filter = ["status", "task"]
    inlines = [StepInline]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Run._meta.fields]


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ["model", "input_per_million", "output_per_million", "updated_at"]
    search_fields = ["model"]
