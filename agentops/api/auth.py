"""Who calls the API, what their token allows, and how often they may call.

The API takes personal tokens only (``Authorization: Bearer <token>``), never the
session cookie: a browser's cookie would need CSRF protection on every write, and a
token names what it may do (its scope) where a session may do all its user may.

Every operation checks both: the token's scope (``TokenScope``, nested as
agentops.models says) and the user's own Django permissions, the same ones the pages
check. A token never widens what its user may do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import F
from django.http import HttpRequest
from django.utils import timezone
from ninja.security import HttpBearer

from agentops.api.errors import Problem, field_error, invalid
from agentops.api.tokens import token_for_secret, token_use_record
from agentops.models import ApiRateWindow, ApiToken


@dataclass(frozen=True)
class Caller:
    user: AbstractBaseUser
    token: ApiToken


class TokenAuth(HttpBearer):
    """A token from the header, counted against its rate; None is a 401 (ninja's
    AuthenticationError, answered as a problem by agentops.api.errors)."""

    def authenticate(self, request: HttpRequest, token: str) -> Caller | None:
        found = token_for_secret(token.strip())
        if found is None:
            return None
        rate_check(found)
        token_use_record(found)
        return Caller(user=found.user, token=found)


def caller(request: HttpRequest) -> Caller:
    return request.auth  # type: ignore[attr-defined]


def require(
    request: HttpRequest,
    *,
    scope: str,
    perms: tuple[str, ...] = (),
    query: tuple[str, ...] = (),
    lists: tuple[str, ...] = (),
    staff: bool = False,
) -> Caller:
    """The caller, if the token's scope and the user's permissions allow the operation;
    else a 403 that says which is missing. A query parameter the operation does not take
    (``query`` lists those it does) is a 422 naming it: a misspelt filter ignored would
    answer another question than the one asked. So is one given twice that is not a
    list (``lists``): ninja would take the last, a proxy or a log reader the first."""
    who = caller(request)
    if not who.token.allows(scope):
        raise Problem(
            403,
            "scope",
            f"This token's scope is {who.token.scope}; the operation needs a token with "
            f"the scope {scope}.",
        )
    missing = [perm for perm in perms if not who.user.has_perm(perm)]
    if missing:
        raise Problem(
            403,
            "permission",
            f"{who.user.get_username()} does not hold the permission "
            f"{', '.join(missing)}, which the operation needs.",
        )
    # Tasks are authored in the admin, which only active staff may enter: the API
    # authors them as the admin would let the same person, no more.
    if staff and not (who.user.is_active and who.user.is_staff):
        raise Problem(
            403,
            "permission",
            f"{who.user.get_username()} is not staff: tasks are authored by staff, as in "
            "the admin.",
        )
    unknown = sorted(name for name in request.GET if name not in query)
    if unknown:
        takes = f"it takes {', '.join(query)}" if query else "it takes none"
        raise invalid(
            [
                field_error("query", name[:100], f"not a parameter of this operation ({takes})")
                for name in unknown
            ]
        )
    repeated = sorted(
        name for name in request.GET if name not in lists and len(request.GET.getlist(name)) > 1
    )
    if repeated:
        raise invalid(
            [field_error("query", name, "given more than once; give it once") for name in repeated]
        )
    return who


def rate_check(token: ApiToken) -> None:
    """Count this request against its user's minute, all their tokens together; past
    the limit, a 429 with Retry-After (the seconds left in the minute). The count is a
    row per (user, minute) in the database, so every web process counts into the same
    one; the rows of minutes gone are deleted when a minute starts, so the table holds
    at most a row per person who called this minute or the last."""
    limit = settings.AGENTOPS_API_RATE_PER_MINUTE
    now = timezone.now()
    minute = now.replace(second=0, microsecond=0)
    window = ApiRateWindow.objects.filter(user_id=token.user_id, minute=minute)
    if not window.update(count=F("count") + 1):
        try:
            with transaction.atomic():
                ApiRateWindow.objects.create(user_id=token.user_id, minute=minute, count=1)
        except IntegrityError:  # another process made the row first: count into it
            window.update(count=F("count") + 1)
        else:
            # A new minute: every older row counts for nothing any more, anyone's.
            ApiRateWindow.objects.filter(minute__lt=minute).delete()
    count = window.values_list("count", flat=True).first() or 0
    if count > limit:
        left = (minute + timedelta(minutes=1) - now).total_seconds()
        raise Problem(
            429,
            "rate-limit",
            f"You made more than {limit} requests this minute, counting all your tokens: "
            "wait and retry.",
            headers={"Retry-After": str(max(1, math.ceil(left)))},
        )
