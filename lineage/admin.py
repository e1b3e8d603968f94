from __future__ import annotations

from django.contrib import admin

from lineage.models import LineageEvent


@admin.register(LineageEvent)
class LineageEventAdmin(admin.ModelAdmin):
    """Read-only: the trail is written by the runtime and never edited."""

    list_display = ["run_uuid", "seq", "at", "kind", "actor"]
    list_filter = ["kind"]
    search_fields = ["run_uuid", "kind", "actor"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
