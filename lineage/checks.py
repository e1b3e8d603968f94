"""System checks: the app's database role must not be able to lift the trail's
triggers. Tagged ``database``, so they run with ``migrate`` and
``manage.py check --database default`` (a check that queries runs only when asked)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Tags, Warning, register
from django.db import DatabaseError, connections

from lineage.models import LineageEvent

HINT = (
    "As a superuser, run `manage.py lineage_lock_down --app-role {role}`, and keep the app"
    " connecting as {role} (see the operator's guide: the locked-down trail)."
)


@register(Tags.database)
def lineage_role_check(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list:
    problems: list[Warning] = []
    for alias in databases or []:
        connection = connections[alias]
        if connection.vendor != "postgresql":
            continue
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT current_user, c.relowner::regrole::text,"
                    " pg_has_role(current_user, c.relowner, 'MEMBER'), r.rolsuper"
                    " FROM pg_class c, pg_roles r"
                    " WHERE c.oid = to_regclass(%s) AND r.rolname = current_user",
                    [LineageEvent._meta.db_table],
                )
                row = cursor.fetchone()
        except DatabaseError:
            continue  # no database yet: nothing to say about its roles
        if row is None:
            continue  # not migrated yet
        role, owner, member, superuser = row
        if superuser:
            problems.append(
                Warning(
                    f"The app connects to database {alias!r} as {role}, a superuser: it can"
                    " disable the lineage table's triggers and rewrite the trail.",
                    hint=HINT.format(role="<an ordinary role>"),
                    id="lineage.W002",
                )
            )
        elif member:
            problems.append(
                Warning(
                    f"The app connects to database {alias!r} as {role}, which owns the"
                    f" lineage table (its owner is {owner}): it can disable the table's"
                    " triggers and rewrite the trail.",
                    hint=HINT.format(role=role),
                    id="lineage.W001",
                )
            )
    return problems
