"""Prometheus /metrics: being built (issue 15)."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse


def metrics_view(request: HttpRequest) -> HttpResponse:
    raise Http404
