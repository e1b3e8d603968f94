from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader


@pytest.mark.django_db
def test_every_model_change_has_its_migration():
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def migrate_to(*targets: tuple[str, str]) -> Any:
    """Migrate the test database to ``targets``; returns the project's state then."""
    executor = MigrationExecutor(connection)
    executor.migrate(list(targets))
    executor.loader.build_graph()
    return executor.loader.project_state(list(targets)).apps


@pytest.mark.django_db(transaction=True)
def test_upgrading_keeps_operators_running_and_closes_stale_dial_requests():
    """On a database made before them: 0011 gives the new permissions to start and cancel
    runs to whoever operated agentops already, and 0013 closes the dial requests that
    the new rule would have closed."""
    old = migrate_to(("tasks", "0010_step_run_index_covered"))
    User, Permission = old.get_model("auth", "User"), old.get_model("auth", "Permission")
    decide = Permission.objects.get(codename="decide_approval")
    operator = User.objects.create(username="olivia")
    operator.user_permissions.add(decide)
    User.objects.create(username="victor")
    Task, Change = old.get_model("tasks", "Task"), old.get_model("tasks", "AutonomyChange")
    task = Task.objects.create(slug="t", name="T", objective_template="x", autonomy_level=1)
    stale = Change.objects.create(task=task, from_level=0, to_level=3, requested_by=operator)
    older = Change.objects.create(task=task, from_level=1, to_level=2, requested_by=operator)
    newest = Change.objects.create(task=task, from_level=1, to_level=3, requested_by=operator)

    new = migrate_to(*MigrationLoader(connection).graph.leaf_nodes())
    User = new.get_model("auth", "User")
    granted = set(
        User.objects.get(username="olivia").user_permissions.values_list("codename", flat=True)
    )
    assert {"start_run", "cancel_run"} <= granted
    assert not User.objects.get(username="victor").user_permissions.exists()
    Change = new.get_model("tasks", "AutonomyChange")
    statuses = dict(Change.objects.values_list("pk", "status"))
    assert statuses == {stale.pk: "withdrawn", older.pk: "withdrawn", newest.pk: "pending"}
    assert Change.objects.filter(status="withdrawn", decided_at__isnull=True).count() == 0
