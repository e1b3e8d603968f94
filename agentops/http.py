from __future__ import annotations

from typing import Any

from django.http import HttpResponseRedirect
from django.shortcuts import resolve_url


def see_other(to: str, *args: Any, **kwargs: Any) -> HttpResponseRedirect:
    """Redirect after a POST with 303, so the browser follows with a GET."""
    response = HttpResponseRedirect(resolve_url(to, *args, **kwargs))
    response.status_code = 303
    return response
