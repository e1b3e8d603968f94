"""System checks: the app's database role must not be able to lift the trail's
triggers (tagged ``database``, so it runs with ``migrate`` and ``manage.py check
--database default``: a check that queries runs only when asked), and a deployment
must have a key to sign the trail's checkpoints (``manage.py check --deploy``)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
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
                    " pg_has_role(current_user, c.relowner, 'MEMBER'), r.rolsuper,"
                    " n.nspname, pg_has_role(current_user, n.nspowner, 'MEMBER')"
                    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,"
                    " pg_roles r WHERE c.oid = to_regclass(%s) AND r.rolname = current_user",
                    [LineageEvent._meta.db_table],
                )
                row = cursor.fetchone()
        except DatabaseError:
            continue  # no database yet: nothing to say about its roles
        if row is None:
            continue  # not migrated yet
        role, owner, member, superuser, schema, schema_member = row
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
        elif schema_member:
            # The schema's owner may drop any table in it, and make a new one of the
            # same name without the triggers: the checkpoints catch it, nothing stops it.
            problems.append(
                Warning(
                    f"The app connects to database {alias!r} as {role}, which owns the"
                    f" schema {schema} the lineage table is in: it can drop the table and"
                    " make a new one without its triggers.",
                    hint=f"Give the schema to another role (ALTER SCHEMA {schema} OWNER TO"
                    " ...), as a superuser.",
                    id="lineage.W001",
                )
            )
    return problems


@register(Tags.security, deploy=True)
def lineage_key_check(app_configs: Any = None, **kwargs: Any) -> list:
    """Without a signing key nothing anchors the trail: ``check --deploy`` says so, not
    only the log of each run's end."""
    from lineage.anchoring import public_key

    try:
        public_key()
    except ImproperlyConfigured as error:
        return [
            Warning(
                f"The trail's checkpoints cannot be signed or checked: {error}",
                hint="Set AGENTOPS_LINEAGE_SIGNING_KEY (`manage.py lineage_checkpoint"
                " --new-key` prints one), or AGENTOPS_LINEAGE_PUBLIC_KEY on a machine that"
                " only verifies.",
                id="lineage.W003",
            )
        ]
    return []
