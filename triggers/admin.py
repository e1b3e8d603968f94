"""Triggers in the admin: what starts a task's runs without a person.

A trigger widens what runs unattended, so its form is hostile input like any other:
the config and the mapping pass ``triggers.config.config_errors`` (each fault under its
field, nothing saved until there are none), and only staff holding the trigger
permissions (``tasks.add_trigger``, ``change_trigger``, ``delete_trigger``) reach it;
adding or changing one also takes ``tasks.start_run``, since it starts runs.
Every add, change, rotation and deletion is written in the task's trail.

A webhook's signing secret is made when the trigger is, and shown once, in the message
after the save (and again once after each rotation); every page after shows only its
fingerprint. A trigger with firings is never deleted (they are the record of what
started which run): the admin says to disable it instead.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import ProtectedError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from agentops.admin import ReadOnlyAdmin
from agentops.bad_input import BadInput, id_parse
from agentops.runtime.tools.base import arguments_errors
from agentops.strict_json import StrictJSONFormField, json_loads_strict
from tasks.governance import config_record
from tasks.models import Trigger
from tasks.services import actor_for
from triggers.config import config_errors, config_of, mapping_errors
from triggers.cron import cron_next, slot_payload
from triggers.models import Firing
from triggers.selectors import secret_fingerprint, url_redacted, webhook_path
from triggers.services import (
    ROTATION_OVERLAP,
    MappingRefused,
    input_mapped,
    secret_new,
    trigger_secret_rotate,
)

Kind = Trigger.Kind

# An example config for each kind, shown under the config box (the guide says more).
CONFIG_EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    Kind.CRON: (
        "A cron expression of five fields and a time zone; what to do with a slot whose "
        "last run is still live (skip or start) and with slots missed while nothing ran "
        "(skip, or once); the run's input.",
        {
            "expression": "0 2 * * *",
            "timezone": "UTC",
            "overlap": "skip",
            "missed": "skip",
            "input": {"batch": "2026-11"},
        },
    ),
    Kind.WEBHOOK: (
        "Optional: how old a delivery's timestamp may be, and the largest body. The URL "
        "and the signing secret are made when the trigger is saved.",
        {"tolerance_seconds": 300, "max_body_bytes": 262144},
    ),
    Kind.QUEUE: (
        "A Redis stream (read by a consumer group) or an AMQP queue; a message that "
        "cannot become a run goes to the dead-letter place. A password in the URL is "
        "named as {secret:TRIGGER_SECRET_…}, a variable of the listeners' environment.",
        {
            "transport": "redis",
            "url": "redis://127.0.0.1:6379/0",
            "stream": "invoices",
            "group": "agentops",
            "dead_letter": "invoices.dead",
        },
    ),
    Kind.EMAIL: (
        "The address mail arrives at, the senders allowed (an address, or @domain for "
        "all of one), and whether a DKIM signature is required.",
        {"address": "invoices@agentops.example", "senders": ["@example.com"], "dkim": True},
    ),
}


def config_help(kind: str | None) -> str:
    """The config box's help: the one kind's example once the kind is fixed, each
    kind's on the add form."""
    kinds = [kind] if kind in CONFIG_EXAMPLES else list(CONFIG_EXAMPLES)
    return format_html(
        "{}<dl>{}</dl>",
        "A JSON object: what this kind of trigger needs.",
        format_html_join(
            "",
            "<dt>{}</dt><dd>{} <code>{}</code></dd>",
            (
                (Kind(name).label, said, json.dumps(example))
                for name in kinds
                for said, example in [CONFIG_EXAMPLES[name]]
            ),
        ),
    )


def error_field(message: str) -> str:
    """The form field a config_errors sentence is about."""
    for name in ("input_mapping", "kind"):
        if message.startswith(f"{name}:"):
            return name
    return "config"


class TriggerForm(forms.ModelForm):
    example_payload = forms.CharField(
        required=False,
        strip=True,
        label="Example of what arrives",
        help_text="Optional, not kept: a webhook's body, a message or an email's fields as "
        "they would arrive, in JSON. When given, the mapping must turn it into an input "
        "the task's schema accepts.",
        widget=forms.Textarea(attrs={"rows": 4, "class": "vLargeTextField"}),
    )

    class Meta:
        model = Trigger
        fields = [
            "task",
            "name",
            "kind",
            "enabled",
            "config",
            "input_mapping",
            "max_per_minute",
            "max_per_hour",
        ]
        field_classes = {"config": StrictJSONFormField}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "config" in self.fields:
            self.fields["config"].help_text = config_help(
                self.instance.kind if self.instance.pk else None
            )
        if "kind" in self.fields:
            # A person's Run button needs no trigger: the admin makes the other kinds.
            self.fields["kind"].choices = [("", "---------")] + [
                (value, label) for value, label in Kind.choices if value != Kind.MANUAL
            ]
            self.fields["kind"].initial = ""

    def clean_example_payload(self) -> Any:
        """The example as JSON, or None when there is none."""
        text = self.cleaned_data["example_payload"]
        if not text:
            return None
        try:
            return json_loads_strict(text)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(
                f"This is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
            ) from None

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        # On the change form the kind is read-only: the saved one stands.
        kind = cleaned.get("kind") if "kind" in self.fields else self.instance.kind
        mapping = cleaned.get("input_mapping", "")
        if kind and "config" in cleaned:
            errors = config_errors(kind=kind, config=cleaned["config"], input_mapping=mapping)
        elif "input_mapping" in cleaned:
            errors = mapping_errors(mapping)  # the config's own fault is already shown
        else:
            errors = []
        for message in errors:
            self.add_error(error_field(message), message)
        if errors or self.has_error("input_mapping"):
            return cleaned
        if kind == Kind.CRON and cleaned.get("enabled") and not self.has_error("config"):
            # What a slot brings is known: the next one must make an input the task takes.
            # (Not while disabled: a trigger that starts nothing can always be saved so.)
            config = config_of(Trigger(kind=kind, config=cleaned["config"]))
            try:
                slots = cron_next(Trigger(kind=kind, config=config), count=1)
            except ValueError:
                slots = []
            if not slots:  # an expression that matches no date: February 31st, say
                self.add_error(
                    "config",
                    f"config/expression: {config['expression']!r} never comes: it matches no date",
                )
                return cleaned
            self.mapping_check(slot_payload(config, slots[0]), mapping, field="input_mapping")
        example = cleaned.get("example_payload")
        if example is not None:
            self.mapping_check(example, mapping, field="example_payload")
        return cleaned

    def mapping_check(self, payload: Any, mapping: str, *, field: str) -> None:
        """The mapping applied to ``payload`` must give an input the task's schema
        accepts; each fault goes under ``field``."""
        task = self.cleaned_data.get("task") if "task" in self.fields else self.instance.task
        if task is None:
            return
        arrived = json.dumps(payload, sort_keys=True)[:300]
        try:
            run_input = input_mapped(mapping, payload)
        except MappingRefused as error:
            self.add_error(field, f"from {arrived}: {error}")
            return
        for message in arguments_errors(
            task.input_schema or {"type": "object"}, run_input, whole="the input"
        ):
            self.add_error(
                field,
                f"from {arrived} the mapping gives {json.dumps(run_input)[:300]}, which "
                f"the task's input schema refuses: {message}",
            )


def trigger_recorded(*, trigger: Trigger, user: Any, what: str) -> None:
    """Write in the task's trail what a person did to one of its triggers (inside the
    transaction that did it). Never a secret: a rotation names fingerprints."""
    config_record(
        target=trigger.task,
        kind="config.changed",
        actor=actor_for(user),
        note=f"trigger {trigger.name!r} ({trigger.kind}, #{trigger.pk}) {what}",
    )


def value_said(value: Any) -> str:
    """A value as the trail says it. A config's URL is said with any password written in
    it replaced by dots (the trail cannot be edited afterwards)."""
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        value = {**value, "url": url_redacted(value["url"])}
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return repr(value)


@admin.register(Trigger)
class TriggerAdmin(admin.ModelAdmin):
    form = TriggerForm
    change_form_template = "tasks/trigger_change_form.html"
    list_display = [
        "name",
        "task",
        "kind",
        "enabled",
        "secret_shown",
        "max_per_minute",
        "max_per_hour",
        "updated_at",
    ]
    list_filter = ["task", "kind", "enabled"]
    list_select_related = ["task"]
    search_fields = ["name", "task__name", "task__slug"]
    actions = ["rotate_selected", "disable_selected", "enable_selected"]

    def get_readonly_fields(self, request, obj=None):
        # A trigger's task and kind are fixed once made: moving it would carry its
        # firings to another task, and a kind's config means nothing to another kind.
        if obj is None:
            return ["live_cap"]
        return ["task", "kind", "live_cap", "webhook_url", "secret_shown", "next_slots"]

    def get_fieldsets(self, request, obj=None):
        what = ["config", "input_mapping", "example_payload"]
        listens = ["task", "name", "kind", "enabled"]
        if obj is not None and obj.kind == Kind.WEBHOOK:
            what = ["webhook_url", "secret_shown", *what]
        if obj is not None and obj.kind == Kind.CRON:
            what = [*what, "next_slots"]
        return [
            (None, {"fields": listens}),
            ("What it listens to", {"fields": what}),
            (
                "Rails on intake",
                {
                    "fields": ["max_per_minute", "max_per_hour", "live_cap"],
                    "description": "A firing over a limit is refused and recorded: it "
                    "starts nothing.",
                },
            ),
        ]

    def get_actions(self, request):
        actions = super().get_actions(request)
        # Deleting goes one trigger at a time, where one with firings is refused
        # with the reason (delete_view).
        actions.pop("delete_selected", None)
        return actions

    # Read-only fields ---------------------------------------------------------------

    @admin.display(description="Live runs at once (the task's)")
    def live_cap(self, obj: Trigger | None) -> str:
        if obj is None or obj.task_id is None:
            return "Set on the task (Max live runs): a firing past it is refused."
        cap = obj.task.max_live_runs
        return f"at most {cap}" if cap else "no cap (set on the task)"

    @admin.display(description="POST deliveries to")
    def webhook_url(self, obj: Trigger) -> str:
        return format_html("<code>{}</code>", webhook_path(obj))

    @admin.display(description="signing secret")
    def secret_shown(self, obj: Trigger) -> str:
        if obj.kind != Kind.WEBHOOK:
            return "—"
        if not obj.secret:
            return "none: rotate to make one"
        shown = f"fingerprint {secret_fingerprint(obj.secret)}"
        if (
            obj.previous_secret
            and obj.previous_secret_until
            and obj.previous_secret_until > (timezone.now())
        ):
            until = timezone.localtime(obj.previous_secret_until)
            shown += (
                f"; the previous one ({secret_fingerprint(obj.previous_secret)}) is "
                f"accepted until {until:%Y-%m-%d %H:%M %Z}"
            )
        return shown

    @admin.display(description="Next five slots")
    def next_slots(self, obj: Trigger) -> str:
        try:
            slots = cron_next(obj, count=5)
        except (ValueError, KeyError, TypeError):
            return "—"
        return format_html_join(", ", "{}", ((f"{slot:%a %Y-%m-%d %H:%M %Z}",) for slot in slots))

    # Who may --------------------------------------------------------------------------

    # A trigger starts runs of its task with nobody pressing Run: a person who may not
    # start runs (tasks.start_run) may neither add one nor change one (which can enable
    # it, point it at another task, raise its limits or choose its input).

    def has_add_permission(self, request: HttpRequest) -> bool:
        return super().has_add_permission(request) and request.user.has_perm("tasks.start_run")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and request.user.has_perm(
            "tasks.start_run"
        )

    # Saving -------------------------------------------------------------------------

    def save_model(self, request, obj, form, change):
        secret = ""
        if not change and obj.kind == Kind.WEBHOOK:
            obj.secret = secret = secret_new()
        super().save_model(request, obj, form, change)
        if change:
            changed = [name for name in form.changed_data if name != "example_payload"]
            if changed:
                said = ", ".join(f"{name} {value_said(getattr(obj, name))}" for name in changed)
                trigger_recorded(trigger=obj, user=request.user, what=f"changed: {said}")
        else:
            trigger_recorded(
                trigger=obj,
                user=request.user,
                what=f"added: config {value_said(obj.config)}, mapping {obj.input_mapping!r}, "
                f"enabled {obj.enabled}, limits {obj.max_per_minute}/min {obj.max_per_hour}/h",
            )
        if secret:
            self.secret_tell(request, obj, secret, made="made")

    def secret_tell(
        self, request: HttpRequest, trigger: Trigger, secret: str, *, made: str
    ) -> None:
        """The one time a person sees the whole secret: in the message after the save."""
        messages.warning(
            request,
            format_html(
                "The signing secret of {} was {}: <code>{}</code> Copy it to the sender "
                "now: it is not shown again (pages show its fingerprint, {}).",
                trigger.name,
                made,
                secret,
                secret_fingerprint(secret),
            ),
        )

    # Rotating the secret ------------------------------------------------------------

    def get_urls(self):
        rotate = path(
            "<path:object_id>/rotate-secret/",
            self.admin_site.admin_view(self.rotate_view),
            name="tasks_trigger_rotate",
        )
        return [rotate, *super().get_urls()]

    def rotate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse("Rotate a secret with a POST.", status=405)
        trigger = self.trigger_or_none(request, object_id)
        if trigger is None:
            return HttpResponse("No such trigger.", status=404)
        if not self.has_change_permission(request, trigger):
            raise PermissionDenied
        self.rotate(request, trigger)
        return HttpResponseRedirect(reverse("admin:tasks_trigger_change", args=[trigger.pk]))

    def trigger_or_none(self, request: HttpRequest, object_id: str) -> Trigger | None:
        try:
            pk = id_parse(unquote(object_id), field="id", what="a trigger's id")
        except BadInput:
            return None
        return self.get_object(request, str(pk))

    def rotate(self, request: HttpRequest, trigger: Trigger) -> None:
        if trigger.kind != Kind.WEBHOOK:
            messages.error(
                request,
                f"{trigger.name} is a {trigger.get_kind_display().lower()} trigger: only a "
                "webhook has a signing secret.",
            )
            return
        before = trigger.secret
        with transaction.atomic():
            secret = trigger_secret_rotate(trigger=trigger, overlap=ROTATION_OVERLAP)
            trigger.refresh_from_db()
            held = (
                f"; the previous one ({secret_fingerprint(before)}) holds until "
                f"{trigger.previous_secret_until:%Y-%m-%d %H:%M %Z}"
                if before
                else ""
            )
            trigger_recorded(
                trigger=trigger,
                user=request.user,
                what=f"secret rotated: now {secret_fingerprint(secret)}{held}",
            )
        hours = int(ROTATION_OVERLAP.total_seconds() // 3600)
        self.secret_tell(
            request,
            trigger,
            secret,
            made=f"rotated (senders signing with the previous one are accepted for {hours} h)"
            if before
            else "made",
        )

    @admin.action(
        description="Rotate the signing secret of the selected webhooks (the old one holds 24 h)",
        permissions=["change"],
    )
    def rotate_selected(self, request, queryset):
        for trigger in queryset.select_related("task"):
            self.rotate(request, trigger)

    @admin.action(description="Disable the selected triggers", permissions=["change"])
    def disable_selected(self, request, queryset):
        self.enabled_set(request, queryset, enabled=False)

    @admin.action(description="Enable the selected triggers", permissions=["change"])
    def enable_selected(self, request, queryset):
        self.enabled_set(request, queryset, enabled=True)

    def enabled_set(self, request, queryset, *, enabled: bool) -> None:
        moved = 0
        with transaction.atomic():
            for trigger in queryset.select_related("task").select_for_update(of=("self",)):
                if trigger.enabled == enabled:
                    continue
                trigger.enabled = enabled
                trigger.save(update_fields=["enabled", "updated_at"])
                trigger_recorded(
                    trigger=trigger,
                    user=request.user,
                    what="enabled" if enabled else "disabled",
                )
                moved += 1
        said = "enabled" if enabled else "disabled"
        self.message_user(request, f"{moved} trigger{'s' if moved != 1 else ''} {said}.")

    # Deleting -----------------------------------------------------------------------

    def delete_view(self, request, object_id, extra_context=None):
        trigger = self.trigger_or_none(request, object_id)
        if trigger is not None and trigger.firings.exists():
            return self.delete_refused(request, trigger)
        try:
            return super().delete_view(request, object_id, extra_context)
        except ProtectedError:  # a firing arrived between the check and the delete
            return self.delete_refused(request, trigger)

    def delete_refused(self, request: HttpRequest, trigger: Trigger) -> HttpResponse:
        count = trigger.firings.count()
        messages.error(
            request,
            f"{trigger.name} has {count} firing{'s' if count != 1 else ''}, the record of "
            "what it started and refused: it cannot be deleted. Disable it instead "
            "(untick Enabled and save): it then starts nothing.",
        )
        return HttpResponseRedirect(reverse("admin:tasks_trigger_change", args=[trigger.pk]))

    def delete_model(self, request, obj):
        trigger_recorded(trigger=obj, user=request.user, what="deleted")
        super().delete_model(request, obj)


@admin.register(Firing)
class FiringAdmin(ReadOnlyAdmin):
    """What arrived for each trigger, accepted or refused and why: written by
    trigger_fire only, never edited."""

    list_display = ["received_at", "trigger", "key", "accepted", "refusal", "run"]
    list_filter = ["accepted", "refusal", "trigger__kind", "trigger"]
    list_select_related = ["trigger__task"]
    search_fields = ["key"]
    readonly_fields = [
        "trigger",
        "key",
        "accepted",
        "refusal",
        "reason",
        "run",
        "payload",
        "received_at",
    ]
