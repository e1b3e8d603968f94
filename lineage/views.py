from __future__ import annotations

import json
import re
import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from lineage.anchoring import ledger_load
from lineage.models import LineageEvent
from lineage.verification import run_verify

# What each finding means, in the words of the page's list.
FINDING_TITLES = {
    "changed": "Changed",
    "removed": "Removed",
    "reordered": "Reordered",
    "moved": "Moved from another trail",
    "truncated": "Cut short",
    "rewritten": "Rewritten with new hashes",
    "appended": "Added after the end",
    "unanchored": "Missing from the checkpoints",
    "broken": "Seen broken by a checkpoint",
}
SURROGATE = re.compile("[\ud800-\udfff]")


def json_shown(value: Any) -> str:
    """A payload as indented JSON for the page: the exact value, with an unpaired
    surrogate (which no page can carry) written as its escape."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


@require_GET
@login_required
def run_lineage(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    ledger = ledger_load()
    report = run_verify(run_uuid=run_id, ledger=ledger)
    events = list(LineageEvent.objects.filter(run_uuid=run_id).order_by("seq"))
    if not events and report.anchor is None:
        raise Http404("no lineage for this run")
    flagged = {finding.seq for finding in report.findings}
    rows = []
    for event in events:
        body = event.body
        rows.append(
            {
                "event": event,
                "fields": len(body) if isinstance(body, (dict, list)) else 1,
                "payload": json_shown(body),
                "flagged": event.seq in flagged,
            }
        )
    findings = [
        {"title": FINDING_TITLES.get(finding.what, finding.what), "finding": finding}
        for finding in report.findings
    ]
    anchor = report.anchor
    return render(
        request,
        "lineage/run.html",
        {
            "run_id": run_id,
            "rows": rows,
            "first_kind": events[0].kind if events else "",
            "report": report,
            "findings": findings,
            "anchor": anchor,
            "unsealed": report.events - anchor.size if anchor and report.intact else 0,
            "log_problems": ledger.problems,
        },
    )
