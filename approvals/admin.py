from __future__ import annotations

from django.contrib import admin

from agentops.admin import ReadOnlyAdmin
from approvals.models import Approval


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    """Decisions are taken in the inbox, where they are checked and recorded."""

    list_display = ["id", "kind", "tool_name", "status", "created_at", "decided_by"]
    list_filter = ["kind", "status"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Approval._meta.fields]
