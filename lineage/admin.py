from __future__ import annotations

from django.contrib import admin

from agentops.admin import ReadOnlyAdmin
from lineage.models import LineageEvent
from lineage.views import json_shown


@admin.register(LineageEvent)
class LineageEventAdmin(ReadOnlyAdmin):
    """Read-only: the trail is written by the runtime and never edited. The payload shown
    is the one hashed (read from the canonical text), not the jsonb copy."""

    list_display = ["run_uuid", "seq", "at", "kind", "actor"]
    list_filter = ["kind"]
    search_fields = ["run_uuid", "kind", "actor"]
    fields = [
        "run_uuid",
        "seq",
        "at",
        "kind",
        "actor",
        "exact_payload",
        "prev_hash",
        "hash",
        "hash_version",
        "canonical",
    ]
    readonly_fields = fields

    @admin.display(description="payload")
    def exact_payload(self, obj: LineageEvent) -> str:
        return json_shown(obj.body)
