from __future__ import annotations

from django.http import HttpRequest

from approvals.selectors import inbox_count_for


def inbox_count(request: HttpRequest) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"inbox_count": inbox_count_for(user)}
