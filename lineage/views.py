from __future__ import annotations

import uuid

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from lineage.models import LineageEvent
from lineage.services import chain_verify


@require_GET
@login_required
def run_lineage(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    events = list(LineageEvent.objects.filter(run_uuid=run_id).order_by("seq"))
    if not events:
        raise Http404("no lineage for this run")
    report = chain_verify(run_id)
    return render(
        request, "lineage/run.html", {"run_id": run_id, "events": events, "report": report}
    )
