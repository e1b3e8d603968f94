"""Personal API tokens: made on the person's own page and shown once, stored as a hash,
revoked there, refused once revoked; their last use recorded, cheaply."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from agentops.models import ApiToken

pytestmark = pytest.mark.django_db


def make_on_page(client, name="ci", scope="read") -> str:
    response = client.post("/accounts/tokens/", {"action": "create", "name": name, "scope": scope})
    assert response.status_code == 201
    found = re.search(
        r'<code id="token-secret" class="mono">([^<]+)</code>', response.content.decode()
    )
    assert found, "the new token is shown"
    return found.group(1)


def test_a_token_is_shown_once_and_only_its_hash_is_stored(client, operator):
    client.force_login(operator)
    secret = make_on_page(client, name="nightly job", scope="operate")

    token = ApiToken.objects.get(user=operator)
    assert (token.name, token.scope) == ("nightly job", "operate")
    assert token.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(token.prefix + "_") and len(secret) > 40
    for row in ApiToken.objects.values():
        assert secret not in str(row)
    # The page lists it by its prefix, never the secret again.
    page = client.get("/accounts/tokens/").content.decode()
    assert token.prefix in page and secret not in page
    assert 'href="/accounts/tokens/"' in page  # linked from the nav


def test_the_page_refuses_a_token_without_a_name_or_scope_and_makes_nothing(client, operator):
    client.force_login(operator)
    response = client.post("/accounts/tokens/", {"action": "create", "name": "", "scope": "root"})
    assert response.status_code == 400
    assert "Give the token a name" in response.content.decode()
    assert "Choose one of the scopes listed" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_the_tokens_page_needs_a_login(client):
    response = client.get("/accounts/tokens/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_revoked_token_is_refused_and_an_unknown_one_too(client, api_client, operator):
    client.force_login(operator)
    secret = make_on_page(client)
    assert api_client(secret).get("/api/tasks").status_code == 200

    token = ApiToken.objects.get(user=operator)
    response = client.post("/accounts/tokens/", {"action": "revoke", "token": str(token.pk)})
    assert response.status_code == 303
    token.refresh_from_db()
    assert token.revoked_at is not None

    refused = api_client(secret).get("/api/tasks")
    assert refused.status_code == 401
    assert refused["Content-Type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:agentops:problem:unauthenticated"
    assert refused["WWW-Authenticate"].startswith("Bearer")
    # A token one character off, a made-up one, none at all.
    assert (
        api_client(secret[:-1] + ("A" if secret[-1] != "A" else "B")).get("/api/tasks").status_code
        == 401
    )
    assert api_client("aop_00000000_" + "x" * 43).get("/api/tasks").status_code == 401
    assert api_client(None).get("/api/tasks").status_code == 401


def test_nobody_revokes_another_persons_token(client, make_token, operator, outsider):
    make_token(operator)
    token = ApiToken.objects.get(user=operator)
    client.force_login(outsider)
    response = client.post("/accounts/tokens/", {"action": "revoke", "token": str(token.pk)})
    assert response.status_code == 400
    token.refresh_from_db()
    assert token.revoked_at is None


def test_a_session_cookie_is_not_a_token(client, operator):
    client.force_login(operator)
    response = client.get("/api/tasks")
    assert response.status_code == 401


def test_the_last_use_is_recorded_at_most_once_a_minute(api_client, make_token, operator):
    secret = make_token(operator)
    token = ApiToken.objects.get(user=operator)
    assert token.last_used_at is None

    api_client(secret).get("/api/tasks")
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None and timezone.now() - first < timedelta(seconds=5)

    api_client(secret).get("/api/tasks")
    token.refresh_from_db()
    assert token.last_used_at == first  # not written again within the minute

    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    api_client(secret).get("/api/tasks")
    token.refresh_from_db()
    assert token.last_used_at > first


def test_an_inactive_users_token_is_refused(api_client, make_token, operator):
    secret = make_token(operator)
    User.objects.filter(pk=operator.pk).update(is_active=False)
    assert api_client(secret).get("/api/tasks").status_code == 401
