"""``manage.py lineage_lock_down --app-role NAME``: on PostgreSQL, make the trail's table
belong to a role of its own, and leave the app's role only SELECT on it and INSERT on
its columns other than ``id`` (which the sequence alone gives).

The triggers refuse UPDATE, DELETE and TRUNCATE, but the table's owner may disable or
drop them: so the role the app connects as must not own the table. Run this once, as a
superuser (or as the table's owner, being a member of the owner role), after
``migrate``; from then on run ``migrate`` as the owner role or a superuser, since
changing the table takes its owner.
"""

from __future__ import annotations

import re

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection, transaction

from lineage.models import LineageEvent

ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
FUNCTION = "lineage_event_refuse_change()"


class Command(BaseCommand):
    help = (
        "Give the lineage table to an owner role of its own and leave the app's role only"
        " INSERT and SELECT on it (PostgreSQL; run as a superuser)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--app-role", required=True, help="the role the app connects as (DATABASE_URL's)"
        )
        parser.add_argument(
            "--owner-role",
            default="agentops_lineage_owner",
            help="the role to own the table, made (NOLOGIN) if missing"
            " (default agentops_lineage_owner)",
        )

    def handle(self, *args, **options):
        if connection.vendor != "postgresql":
            raise CommandError(
                "lineage_lock_down is for PostgreSQL: on SQLite, whoever can write the file"
                " can change the table, and only the signed checkpoints catch it"
            )
        app, owner = options["app_role"], options["owner_role"]
        for flag, name in (("--app-role", app), ("--owner-role", owner)):
            if not ROLE_NAME.match(name):
                raise CommandError(f"{flag} {name!r} is not a PostgreSQL role name")
        if app == owner:
            raise CommandError("--app-role and --owner-role must be two roles")
        quote = connection.ops.quote_name
        table = quote(LineageEvent._meta.db_table)
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [app])
                row = cursor.fetchone()
                if row is None:
                    raise CommandError(f"--app-role {app}: there is no such role")
                if row[0]:
                    raise CommandError(
                        f"--app-role {app} is a superuser, which no privilege binds: the app"
                        " must connect as an ordinary role"
                    )
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [owner])
                made = cursor.fetchone() is None
                if made:
                    cursor.execute(f"CREATE ROLE {quote(owner)} NOLOGIN")
                cursor.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", [app, owner])
                if cursor.fetchone()[0]:
                    raise CommandError(
                        f"--app-role {app} is a member of {owner}, so it would own the table"
                        f" still: REVOKE {owner} FROM {app} first"
                    )
                cursor.execute(f"ALTER TABLE {table} OWNER TO {quote(owner)}")
                cursor.execute(f"ALTER FUNCTION {FUNCTION} OWNER TO {quote(owner)}")
                cursor.execute(f"REVOKE ALL ON {table} FROM PUBLIC, {quote(app)}")
                # INSERT on the columns only, never on id: an id given above the
                # sequence would make later appends fail on the primary key.
                columns = ", ".join(
                    quote(column.column)
                    for column in LineageEvent._meta.concrete_fields
                    if not column.primary_key
                )
                cursor.execute(f"GRANT SELECT ON {table} TO {quote(app)}")
                cursor.execute(f"GRANT INSERT ({columns}) ON {table} TO {quote(app)}")
                cursor.execute(
                    "SELECT pg_get_serial_sequence(%s, 'id')", [LineageEvent._meta.db_table]
                )
                (sequence,) = cursor.fetchone()
                if sequence:
                    cursor.execute(f"REVOKE ALL ON SEQUENCE {sequence} FROM PUBLIC, {quote(app)}")
                    cursor.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO {quote(app)}")
                cursor.execute(
                    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.oid = to_regclass(%s) AND pg_has_role(%s, n.nspowner, 'USAGE')",
                    [LineageEvent._meta.db_table, app],
                )
                schema = cursor.fetchone()
        except DatabaseError as error:
            raise CommandError(
                f"the lock-down was not made (nothing changed): {error}".strip()
                + " (run it as a superuser, after migrate)"
            ) from None
        self.stdout.write(
            self.style.SUCCESS(
                f"{LineageEvent._meta.db_table} now belongs to {owner}"
                f"{' (made, NOLOGIN)' if made else ''}; {app} may only INSERT and SELECT on"
                " it, and cannot disable or drop its triggers."
            )
        )
        if schema:
            self.stdout.write(
                self.style.WARNING(
                    f"{app} owns the schema {schema[0]}, so it can still DROP the whole table"
                    " (never change it in place): the signed checkpoints catch that; to"
                    f" prevent it, give the schema to another role (ALTER SCHEMA {schema[0]}"
                    " OWNER TO ...)."
                )
            )
        self.stdout.write(
            f"From now on run `manage.py migrate` as {owner} (SET ROLE) or a superuser: a"
            " migration that changes the table needs its owner."
        )
