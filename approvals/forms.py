from __future__ import annotations

import json

from django import forms
from django.contrib.auth.models import Group

from agentops.bad_input import BadInput, id_parse, shown
from agentops.strict_json import json_loads_strict
from approvals.models import Approval, ApprovalKind, Resolution

DECISIONS = {
    ApprovalKind.ACTION: {"approve", "reject"},
    ApprovalKind.UNKNOWN_OUTCOME: {Resolution.HAPPENED, Resolution.REFIRE, Resolution.STOP},
    ApprovalKind.OUTCOME_REVIEW: {"approve", "reject"},
    ApprovalKind.BUDGET_EXTENSION: {"approve", "reject"},
    ApprovalKind.LOOP_REVIEW: {"approve", "reject"},
    ApprovalKind.QUESTION: {"answer", "reject"},
}


def said(name: str, limit: int) -> dict[str, str]:
    """Error messages that name the field, for a refusal shown away from its box."""
    return {
        "required": f"Give the {name}.",
        "max_length": f"The {name} is longer than {limit:,} characters.",
        "null_characters_not_allowed": f"The {name} holds a NUL character, which cannot be stored.",
    }


def json_said(subject: str, error: json.JSONDecodeError) -> str:
    """A JSON box's refusal (``subject``: "The result is"): what is wrong and where, as
    the box may hold many lines."""
    return (
        f"{subject} not valid JSON: {error.msg}. "
        f"It is at line {error.lineno}, column {error.colno}."
    )


class DecisionForm(forms.Form):
    """One decision on one approval; which decisions exist depends on its kind."""

    decision = forms.CharField(max_length=20, error_messages=said("decision", 20))
    reason = forms.CharField(required=False, max_length=2000, error_messages=said("reason", 2000))
    result = forms.CharField(
        required=False, max_length=100_000, error_messages=said("result", 100_000)
    )
    arguments = forms.CharField(
        required=False, max_length=100_000, error_messages=said("edited arguments", 100_000)
    )

    def __init__(self, *args, approval: Approval, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.approval = approval

    def clean_decision(self) -> str:
        decision = self.cleaned_data["decision"]
        allowed = DECISIONS[ApprovalKind(self.approval.kind)]
        if decision not in allowed:
            raise forms.ValidationError(
                f"{decision!r} is not a decision for this approval: use one of "
                f"{', '.join(sorted(allowed))}."
            )
        return decision

    def clean_result(self) -> object:
        raw = self.cleaned_data["result"].strip()
        if not raw:
            return None
        try:
            return json_loads_strict(raw)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(json_said("The result is", error)) from None

    def clean_arguments(self) -> dict | None:
        raw = self.cleaned_data["arguments"].strip()
        if not raw:
            return None
        try:
            value = json_loads_strict(raw)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(json_said("The edited arguments are", error)) from None
        if value == self.approval.arguments:
            return None  # unchanged: a plain approval
        return value

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("decision") == "answer" and not cleaned.get("reason", "").strip():
            self.add_error("reason", "Write your answer: the agent reads it.")
        if cleaned.get("decision") in ("reject", "stop") and not cleaned.get("reason", "").strip():
            goes_on = self.approval.kind in (
                ApprovalKind.ACTION,
                ApprovalKind.OUTCOME_REVIEW,
                ApprovalKind.QUESTION,
            )
            self.add_error(
                "reason",
                "Say why you reject it: the agent reads the reason to re-plan."
                if goes_on
                else "Say why you stop the run: the reason is kept in its trail.",
            )
        return cleaned

    def decision_arguments(self) -> dict:
        """The form's decision as the arguments of ``approval_decide``."""
        decision = self.cleaned_data["decision"]
        arguments = {
            "approve": decision not in ("reject", "stop"),
            "reason": self.cleaned_data["reason"],
        }
        if decision == "approve" and self.cleaned_data.get("arguments") is not None:
            arguments["arguments"] = self.cleaned_data["arguments"]
        if self.approval.kind == ApprovalKind.UNKNOWN_OUTCOME and decision != "stop":
            arguments["resolution"] = decision
            if decision == Resolution.HAPPENED:
                arguments["result"] = self.cleaned_data["result"]
        return arguments


class GroupChoiceField(forms.ModelChoiceField):
    """A group by id: a value that cannot be one is not a group listed, whatever it is
    (Django would say "Null characters are not allowed." of a NUL, naming no field)."""

    def to_python(self, value: object) -> object:
        if isinstance(value, str) and "\x00" in value:
            raise forms.ValidationError(
                self.error_messages["invalid_choice"], code="invalid_choice"
            )
        return super().to_python(value)


class ReassignForm(forms.Form):
    """Hand one pending approval to another group, saying why."""

    group = GroupChoiceField(
        queryset=Group.objects.none(),
        error_messages={"invalid_choice": "choose one of the groups listed"},
    )
    reason = forms.CharField(max_length=2000, strip=True)

    def __init__(self, *args, **kwargs) -> None:
        from approvals.services import groups_deciding

        super().__init__(*args, **kwargs)
        self.fields["group"].queryset = groups_deciding()
        self.fields["group"].error_messages["required"] = "choose the group to hand it to"
        self.fields["reason"].error_messages.update(
            required="say why you reassign it: the other group reads the reason",
            max_length="the reason is longer than 2,000 characters",
            null_characters_not_allowed="the reason holds a NUL character, which cannot be stored",
        )


RISKS = ("read", "reversible", "irreversible")
SEARCH_MAX = 200
GROUP_NONE = "none"  # the group filter's value for approvals routed to no group


class InboxFilterForm(forms.Form):
    """The inbox's filters, search, page and selected item, as the URL carries them.

    Every value comes from a URL anyone can type, so each refusal names the parameter
    and says what it takes; none reaches the database unchecked (a NUL or an id past
    bigint would be a 500 there)."""

    kind = forms.CharField(required=False)
    task = forms.CharField(required=False)
    group = forms.CharField(required=False)
    risk = forms.CharField(required=False)
    q = forms.CharField(required=False)
    page = forms.CharField(required=False)
    item = forms.CharField(required=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Django's own NUL refusal names no field; ours, in clean(), does.
        for field in self.fields.values():
            field.validators = []

    def clean(self) -> dict:
        cleaned = super().clean()
        for name in self.fields:
            if name not in self.errors and "\x00" in str(self.data.get(name, "")):
                self.add_error(
                    name, f"{name}: a NUL character cannot be stored or searched for; remove it."
                )
        return cleaned

    def clean_q(self) -> str:
        # A phrase, not a document: each word of it is matched against every waiting
        # item's text, as the runs list's search is bounded (tasks.run_list.TEXT_MAX).
        q = self.cleaned_data["q"]
        if len(q) > SEARCH_MAX:
            raise forms.ValidationError(
                f"q: the search is longer than {SEARCH_MAX} characters ({len(q):,}); "
                "search for a phrase."
            )
        return q

    def clean_kind(self) -> str:
        kind = self.cleaned_data["kind"]
        if kind and kind not in ApprovalKind.values:
            raise forms.ValidationError(
                f"kind: {shown(kind)} is not a kind of approval; use one of "
                f"{', '.join(ApprovalKind.values)}."
            )
        return kind

    def clean_risk(self) -> str:
        risk = self.cleaned_data["risk"]
        if risk and risk not in RISKS:
            raise forms.ValidationError(
                f"risk: {shown(risk)} is not a side-effect class; use one of {', '.join(RISKS)}."
            )
        return risk

    def clean_task(self) -> str:
        """A task's slug; it must name a task, or the empty list would look like news."""
        from tasks.models import Task

        slug = self.cleaned_data["task"]
        if not slug or "\x00" in slug:
            return slug
        if len(slug) > 80 or not Task.objects.filter(slug=slug).exists():
            raise forms.ValidationError(f"task: there is no task {shown(slug)}.")
        return slug

    def clean_group(self) -> str:
        """A group's id, or ``none`` for approvals anyone who decides may take."""
        group = self.cleaned_data["group"]
        if not group or group == GROUP_NONE or "\x00" in group:
            return group
        try:
            group_id = id_parse(group, field="group", what="a group id")
        except BadInput as error:
            raise forms.ValidationError(f"{error}, or {GROUP_NONE!r}.") from None
        if not Group.objects.filter(pk=group_id).exists():
            raise forms.ValidationError(f"group: there is no group with the id {group_id}.")
        return str(group_id)

    def clean_page(self) -> int:
        page = self.cleaned_data["page"]
        if not page:
            return 1
        try:
            return id_parse(page, field="page", what="a page number")
        except BadInput as error:
            raise forms.ValidationError(f"{error}.") from None

    def clean_item(self) -> int | None:
        item = self.cleaned_data["item"]
        if not item or "\x00" in item:
            return None
        try:
            return id_parse(item, field="item", what="an approval id")
        except BadInput as error:
            raise forms.ValidationError(f"{error}.") from None

    def refusal(self) -> str:
        """Every refusal, one sentence each."""
        return " ".join(message for errors in self.errors.values() for message in errors)
