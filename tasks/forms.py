from __future__ import annotations

import json

from django import forms

from agentops.strict_json import json_loads_strict


class RunStartForm(forms.Form):
    input = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "class": "mono"}),
        required=False,
        help_text="The run's input, a JSON object matching the task's input schema.",
        error_messages={
            "null_characters_not_allowed": "The input holds a NUL character, which cannot "
            "be stored: remove it."
        },
    )

    def clean_input(self) -> dict:
        raw = self.cleaned_data["input"].strip() or "{}"
        try:
            value = json_loads_strict(raw)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(
                f"This is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
            ) from None
        if not isinstance(value, dict):
            raise forms.ValidationError(
                'The input must be a JSON object, like {"batch": "2026-11"}.'
            )
        return value
