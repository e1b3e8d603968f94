"""django-q2's admin pages, made read-only.

django-q2 registers admin pages that add and edit schedules and resubmit failed tasks. A
schedule names any importable function (``os.system`` included) with its arguments, and
the cluster's scheduler runs it: whoever may add a schedule may run code on every worker,
past AGENTOPS_MCP_COMMANDS and past the second person that widening takes. Operators
still see the schedules, the queue and the failures; the schedules agentops needs are made
by its migrations.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest


class ReadOnlyAdmin(admin.ModelAdmin):
    """An admin page to look at: no add, change, delete or action. For what only the
    runtime and the services write (runs, approvals, versions, the trail, pending
    changes) and for django-q2's pages."""

    actions = None

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def read_only(model_admin: type[admin.ModelAdmin]) -> type[admin.ModelAdmin]:
    """``model_admin`` (django-q2's own) made read-only."""
    return type(f"ReadOnly{model_admin.__name__}", (ReadOnlyAdmin, model_admin), {})


def django_q_read_only() -> None:
    from django_q.models import Failure, OrmQ, Schedule, Success

    for model in (Schedule, Success, Failure, OrmQ):
        if admin.site.is_registered(model):
            model_admin = type(admin.site.get_model_admin(model))
            admin.site.unregister(model)
            admin.site.register(model, read_only(model_admin))


django_q_read_only()
