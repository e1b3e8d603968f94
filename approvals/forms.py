from __future__ import annotations

import json

from django import forms
from django.contrib.auth.models import Group

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
