"""The demo's scripted agent says what happened, in Shadow mode and on an empty batch."""

from __future__ import annotations

import pytest

from agentops.runtime.engine import Outcome
from tasks.models import AutonomyLevel, RunStatus
from tasks.services import run_start
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def test_in_shadow_mode_the_demo_says_its_email_was_simulated_not_sent(demo_task, operator):
    demo_task.autonomy_level = AutonomyLevel.SHADOW
    demo_task.save()
    run = run_start(task=demo_task, run_input={"batch": "2026-11"}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert "The email to finance was simulated (Shadow mode), not sent." in run.outcome
    assert "Finance has the list by email" not in run.outcome
    check = run.steps.get(kind="check")
    assert "simulated (Shadow mode), not sent" in check.result["evidence"]


def test_on_a_batch_with_no_invoices_the_demo_asks_no_one_to_follow_up(demo_task, operator):
    run = run_start(task=demo_task, run_input={"batch": "2026-12"}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    email = run.steps.get(tool_name="email_send")
    assert "The ledger has no invoices for this batch." in email.arguments["body"]
    assert "follow up with the customers" not in email.arguments["body"]
