"""The overview at ``/``: the operator's first look at what runs, what it costs, who is
waited on, what fails and whether anything works the queue. The figures are read in
``agentops.overview``; this view only picks the page or, for its own refresh, the panels."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from agentops.overview import overview_figures


@require_GET
@login_required
def overview(request: HttpRequest) -> HttpResponse:
    """The page takes no input: a query string is ignored. It refreshes its panels
    itself (htmx, every 30 s); going back to it restores the whole page."""
    partial = request.htmx and not request.htmx.history_restore_request
    template = "overview.html#overview-panels" if partial else "overview.html"
    return render(request, template, overview_figures())
