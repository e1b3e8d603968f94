"""The locked-down deployment on PostgreSQL: the app's role may only INSERT (every column
but id) and SELECT on the trail, so it cannot lift the triggers that the owner could."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from lineage.checks import lineage_role_check
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append
from lineage.verification import conninfo_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

ATTACKS = {
    "UPDATE": "UPDATE lineage_lineageevent SET actor = 'mallory'",
    "DELETE": "DELETE FROM lineage_lineageevent",
    "TRUNCATE": "TRUNCATE lineage_lineageevent",
    "DISABLE TRIGGER": "ALTER TABLE lineage_lineageevent DISABLE TRIGGER ALL",
    "DROP TRIGGER": "DROP TRIGGER lineage_event_no_change ON lineage_lineageevent",
    "ALTER FUNCTION": "CREATE OR REPLACE FUNCTION lineage_event_refuse_change() RETURNS trigger"
    " AS $$ BEGIN RETURN OLD; END; $$ LANGUAGE plpgsql",
}


@pytest.fixture
def roles():
    """A throwaway LOGIN role for the app and an owner role, removed afterwards."""
    if connection.vendor != "postgresql":
        pytest.skip("roles and grants are PostgreSQL's")
    app, owner = f"agentops_app_{os.getpid()}", f"agentops_owner_{os.getpid()}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user")
        (admin,) = cursor.fetchone()
        cursor.execute(f"CREATE ROLE {app} LOGIN")
    try:
        yield app, owner
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE lineage_lineageevent OWNER TO {admin}")
            cursor.execute(f"ALTER FUNCTION lineage_event_refuse_change() OWNER TO {admin}")
            for role in (app, owner):
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
                if cursor.fetchone():
                    cursor.execute(f"DROP OWNED BY {role}")
                    cursor.execute(f"DROP ROLE {role}")


def app_connection(app: str) -> psycopg.Connection:
    return psycopg.connect(
        **{**conninfo_for(connection), "user": app, "password": ""}, autocommit=True
    )


@contextlib.contextmanager
def django_connected_as(role: str) -> Iterator[None]:
    """Django's own connection logged in as ``role`` until the block ends."""
    settings_dict = connection.settings_dict
    user = settings_dict["USER"]
    connection.close()
    settings_dict["USER"] = role
    try:
        yield
    finally:
        connection.close()
        settings_dict["USER"] = user


def test_the_app_role_cannot_change_the_trail_or_lift_its_triggers(roles):
    app, owner = roles
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="run.queued", actor="olivia", payload={})
    out = StringIO()
    call_command("lineage_lock_down", app_role=app, owner_role=owner, stdout=out)
    assert (
        f"now belongs to {owner} (made, NOLOGIN); {app} may only INSERT and SELECT"
        in out.getvalue()
    )
    assert "run `manage.py migrate` as" in out.getvalue()

    with app_connection(app) as db:
        for statement in ATTACKS.values():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute(statement)
        assert db.execute("SELECT count(*) FROM lineage_lineageevent").fetchone() == (1,)

    # The app, logged in as its role, still appends through the real write path.
    with django_connected_as(app):
        with transaction.atomic():
            event_append(run_uuid=run_uuid, kind="run.running", actor="engine", payload={"n": 1})
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            assert cursor.fetchone() == (app,)
        assert lineage_role_check(databases=["default"]) == []
    assert LineageEvent.objects.filter(run_uuid=run_uuid).count() == 2
    assert chain_verify(run_uuid).intact


def test_the_app_role_may_not_choose_the_id_of_a_row_it_inserts(roles):
    # An id above the sequence, inserted now, would make a later append fail on the
    # primary key: the app's INSERT covers every column but id.
    app, owner = roles
    call_command("lineage_lock_down", app_role=app, owner_role=owner, stdout=StringIO())
    text = "x"
    row = (uuid.uuid4(), 1, "0" * 64, hashlib.sha256(("0" * 64 + text).encode()).hexdigest(), text)
    columns = "run_uuid, seq, at, kind, actor, payload, prev_hash, hash, canonical, hash_version"
    values = "%s, %s, now(), 'run.queued', 'm', '{}', %s, %s, %s, 1"
    with app_connection(app) as db:
        (next_id,) = db.execute(
            "SELECT coalesce(max(id), 0) + 1 FROM lineage_lineageevent"
        ).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute(
                f"INSERT INTO lineage_lineageevent (id, {columns}) VALUES (%s, {values})",
                [next_id + 1, *row],
            )
        # Without id, the sequence gives it: the app's own write path.
        db.execute(f"INSERT INTO lineage_lineageevent ({columns}) VALUES ({values})", row)
    with transaction.atomic():
        event_append(run_uuid=uuid.uuid4(), kind="run.queued", actor="olivia", payload={})


def test_the_check_warns_when_the_app_role_owns_the_table_or_is_a_superuser(roles):
    app, _ = roles
    warnings = {warning.id for warning in lineage_role_check(databases=["default"])}
    assert "lineage.W002" in warnings  # the suite connects as a superuser
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE lineage_lineageevent OWNER TO {app}")
    with django_connected_as(app):
        (warning,) = lineage_role_check(databases=["default"])
    assert warning.id == "lineage.W001" and f"as {app}, which owns the lineage table" in warning.msg
    assert f"lineage_lock_down --app-role {app}" in warning.hint


def test_the_check_warns_when_the_app_role_owns_the_tables_schema(roles):
    app, owner = roles
    call_command("lineage_lock_down", app_role=app, owner_role=owner, stdout=StringIO())
    with connection.cursor() as cursor:
        cursor.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'")
        (schema_owner,) = cursor.fetchone()
        cursor.execute(f"ALTER SCHEMA public OWNER TO {app}")
    try:
        with django_connected_as(app):
            (warning,) = lineage_role_check(databases=["default"])
    finally:
        with connection.cursor() as cursor:
            # Before the fixture's DROP OWNED BY, which would drop the schema.
            cursor.execute(f"ALTER SCHEMA public OWNER TO {schema_owner}")
    assert warning.id == "lineage.W001"
    assert f"as {app}, which owns the schema public the lineage table is in" in warning.msg


def test_the_lock_down_refuses_what_it_cannot_make_safe(roles):
    app, owner = roles
    for options, message in (
        ({"app_role": "nobody_at_all_here", "owner_role": owner}, "there is no such role"),
        ({"app_role": "x; DROP TABLE y", "owner_role": owner}, "is not a PostgreSQL role name"),
        ({"app_role": app, "owner_role": app}, "must be two roles"),
        ({"app_role": connection.settings_dict["USER"], "owner_role": owner}, "is a superuser"),
    ):
        with pytest.raises(CommandError, match=message):
            call_command("lineage_lock_down", **options)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relowner::regrole::text FROM pg_class WHERE relname = 'lineage_lineageevent'"
        )
        assert cursor.fetchone() == (connection.settings_dict["USER"],)
