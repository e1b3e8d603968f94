"""The demo task end to end through django-q2's ORM broker and a real worker process."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from approvals.models import Approval
from approvals.services import approval_decide
from lineage.services import chain_verify
from tasks.models import Run, RunStatus, Task
from tasks.services import run_start
from tests.peers.workers import q2_cluster, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def status_of(run: Run) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=run.pk)


@pytest.mark.parametrize("concurrency", ["0", "100"], ids=["inline", "async"])
def test_a_q2_worker_runs_the_demo_to_its_approval_and_on_to_the_end(
    tmp_path, operator, concurrency
):
    call_command("load_demo", stdout=StringIO())
    task = Task.objects.get(slug="reconcile-invoices")
    log = tmp_path / "qcluster.log"
    with q2_cluster(log, AGENTOPS_WORKER_CONCURRENCY=concurrency) as worker:
        run = run_start(task=task, run_input={"batch": "2026-11"}, user=operator)
        wait_for(lambda: status_of(run) == RunStatus.WAITING, what="the run to wait for approval")
        approval = Approval.objects.get(run=run)
        assert approval.tool_name == "email_send"

        approval_decide(approval=approval, user=operator, approve=True)
        wait_for(lambda: status_of(run) not in ("queued", "running"), what="the run to finish")
        assert worker.poll() is None, (tmp_path / "qcluster.log").read_text()

    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.steps.count() == 12
    assert chain_verify(run.pk).intact
    # Which engine worked it: the async worker, or the queue's worker process itself.
    assert ("async worker started" in log.read_text()) == (concurrency != "0")
