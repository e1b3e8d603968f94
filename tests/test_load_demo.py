"""``manage.py load_demo``: the demo's task is created once, then left to its operator."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from tasks.autonomy import autonomy_request
from tasks.models import Task

pytestmark = pytest.mark.django_db


def test_loading_the_demo_again_leaves_the_operators_task_and_dial_as_they_are():
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    task.max_steps = 25
    task.instructions = "Ours now."
    task.save()
    autonomy_request(
        task=task, to_level=0, user=User.objects.get(username="demo"), reason="watch first"
    )

    output = StringIO()
    call_command("load_demo", stdout=output)
    task.refresh_from_db()
    assert (task.max_steps, task.instructions, task.autonomy_level) == (25, "Ours now.", 0)
    assert "an existing task is left as it is" in output.getvalue()
    assert task.grants.count() == 3
