"""The person's own API tokens (agentops.api): made with a name and a scope, shown
once, revoked. One URL: the page (GET), and its two forms (POST, ``action``)."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from agentops.api.tokens import NAME_MAX, TokenError, token_create, token_revoke, tokens_for_user
from agentops.bad_input import BadInput, id_parse
from agentops.http import see_other
from agentops.models import TokenScope


class TokenForm(forms.Form):
    name = forms.CharField(
        max_length=NAME_MAX,
        error_messages={
            "required": "Give the token a name, saying what it is for.",
            "max_length": f"The name is longer than {NAME_MAX} characters.",
            "null_characters_not_allowed": "The name holds a NUL character: remove it.",
        },
    )
    scope = forms.ChoiceField(
        choices=TokenScope.choices,
        initial=TokenScope.READ,
        error_messages={"invalid_choice": "Choose one of the scopes listed."},
    )


def _page(request: HttpRequest, form: TokenForm, *, made=None, status: int = 200) -> HttpResponse:
    context = {
        "form": form,
        "tokens": tokens_for_user(request.user),
        "made": made,
        "scopes": TokenScope.choices,
    }
    return render(request, "accounts/tokens.html", context, status=status)


@never_cache  # the page that shows a new token once must not be kept by any cache
@require_http_methods(["GET", "POST"])
@login_required
def api_tokens(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return _page(request, TokenForm())
    if request.POST.get("action") == "revoke":
        try:
            token_id = id_parse(request.POST.get("token", ""), field="token", what="a token id")
            token = token_revoke(user=request.user, token_id=token_id)
        except (BadInput, TokenError) as error:
            messages.error(request, f"Nothing was revoked: {error}.")
            return _page(request, TokenForm(), status=400)
        messages.success(request, f"Revoked {token.name} ({token.prefix}…).")
        return see_other("api_tokens")
    form = TokenForm(request.POST)
    if not form.is_valid():
        return _page(request, form, status=400)
    try:
        made = token_create(
            user=request.user, name=form.cleaned_data["name"], scope=form.cleaned_data["scope"]
        )
    except TokenError as error:
        form.add_error("name", str(error))
        return _page(request, form, status=400)
    # Shown in this answer only: it is not stored, so it cannot be shown again.
    return _page(request, TokenForm(), made=made, status=201)
