"""Personal API tokens: made and revoked by their owner (the tokens page), found from
the ``Authorization`` header (agentops.api.auth).

A token reads ``aop_<8 hex>_<43 characters>``: its first 12 characters are the public
``prefix`` the pages show, the rest 32 random bytes. Only the SHA-256 of the whole token
is stored, so a copy of the database gives no usable token; the token itself is shown
once, when it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from agentops.models import ApiToken, TokenScope

TOKEN_START = "aop_"
PREFIX_LENGTH = len(TOKEN_START) + 8
# The longest a token's name may be, as the model holds it.
NAME_MAX = 100
# last_used_at is written at most this often per token: a busy token costs no write
# per request for it.
LAST_USE_EVERY = timedelta(minutes=1)


class TokenError(Exception):
    """The token cannot be made or revoked so; the message says why. Nothing was written."""


@dataclass(frozen=True)
class TokenMade:
    token: ApiToken
    secret: str  # the whole token: shown once, never stored


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_create(*, user: AbstractBaseUser, name: str, scope: str) -> TokenMade:
    """Make a token for ``user`` with ``scope``; the returned secret is the only copy."""
    name = name.strip()
    if not name:
        raise TokenError("give the token a name, saying what it is for")
    if len(name) > NAME_MAX:
        raise TokenError(f"the name is longer than {NAME_MAX} characters")
    if "\x00" in name:
        raise TokenError("the name holds a NUL character, which cannot be stored")
    if scope not in TokenScope.values:
        raise TokenError(f"choose a scope: {', '.join(TokenScope.values)}")
    for _ in range(5):  # a prefix taken already (1 in 4 billion): draw another
        prefix = TOKEN_START + secrets.token_hex(4)
        secret = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                token = ApiToken.objects.create(
                    user=user, name=name, scope=scope, prefix=prefix, secret_hash=token_hash(secret)
                )
        except IntegrityError:
            continue
        return TokenMade(token=token, secret=secret)
    raise TokenError("no free token prefix was found: try again")


def token_revoke(*, user: AbstractBaseUser, token_id: int) -> ApiToken:
    """Revoke one of ``user``'s own tokens; it is refused from the next request on."""
    updated = ApiToken.objects.filter(pk=token_id, user=user, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    token = ApiToken.objects.filter(pk=token_id, user=user).first()
    if token is None:
        raise TokenError("no such token of yours")
    if not updated and token.revoked_at is None:  # pragma: no cover (a race we lost)
        raise TokenError("the token changed meanwhile: try again")
    return token


def tokens_for_user(user: AbstractBaseUser) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("revoked_at", "-created_at", "-pk")


def token_for_secret(secret: str) -> ApiToken | None:
    """The active token ``secret`` is, with its user, or None (unknown, revoked, a
    malformed header). The stored hash is compared in constant time."""
    if len(secret) > 200 or not secret.startswith(TOKEN_START):
        return None
    prefix = secret[:PREFIX_LENGTH]
    if secret[PREFIX_LENGTH : PREFIX_LENGTH + 1] != "_" or "\x00" in prefix:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(prefix=prefix, revoked_at__isnull=True)
        .first()
    )
    if token is None or not hmac.compare_digest(token.secret_hash, token_hash(secret)):
        return None
    if not token.user.is_active:
        return None
    return token


def token_use_record(token: ApiToken) -> None:
    """Record that the token was used now, at most once per ``LAST_USE_EVERY``: a
    conditional UPDATE, so several processes write it once between them."""
    now = timezone.now()
    if token.last_used_at is not None and now - token.last_used_at < LAST_USE_EVERY:
        return
    ApiToken.objects.filter(pk=token.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USE_EVERY)
    ).update(last_used_at=now)
    token.last_used_at = now
