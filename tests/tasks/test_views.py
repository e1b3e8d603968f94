"""Task and run pages through real HTTP."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tasks.models import Run, RunStatus
from tests.conftest import run_until_rest

pytestmark = pytest.mark.django_db


def test_the_demo_task_page_offers_a_run_with_its_example_input(demo_task, operator_client):
    page = operator_client.get(reverse("tasks:detail", args=[demo_task.slug])).content.decode()
    assert "Reconcile invoices" in page
    assert "&quot;batch&quot;: &quot;2026-11&quot;" in page
    assert "email_send" in page and "Irreversible" in page


def test_starting_a_run_pins_the_task_version(demo_task, operator_client):
    response = operator_client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'}
    )
    run = Run.objects.get()
    assert response.status_code == 303
    assert run.status == RunStatus.QUEUED and run.started_by.username == "olivia"
    assert run.task_version.number == 1
    assert run.objective.startswith("Reconcile the invoices of batch 2026-11")
    demo_task.max_steps = 12
    demo_task.save()
    operator_client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-10"}'}
    )
    newer = Run.objects.exclude(pk=run.pk).get()
    assert newer.task_version.number == 2 and newer.task_version.definition["max_steps"] == 12
    run.refresh_from_db()
    assert run.task_version.number == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "This is not valid JSON"),
        ("[1, 2]", "The input must be a JSON object"),
        (
            '{"batch": "November"}',
            "does not match the task&#x27;s schema: batch: &#x27;November&#x27; does not match",
        ),
        ("{}", "the input: &#x27;batch&#x27; is a required property"),
        ('{"batch": NaN}', "NaN is not a JSON number"),
        ('{"batch": "2026-11", "n": -Infinity}', "-Infinity is not a JSON number"),
        ('{"batch": "2026-11", "n": 1e999}', "1e999 is too large for a JSON number"),
        ('{"batch": "2026-11", "batch": "2026-12"}', "the key &quot;batch&quot; appears twice"),
    ],
)
def test_bad_input_is_refused_with_the_reason_and_starts_nothing(
    demo_task, operator_client, raw, message
):
    response = operator_client.post(reverse("tasks:run", args=[demo_task.slug]), {"input": raw})
    assert response.status_code == 400
    page = response.content.decode()
    assert message in page, page
    assert raw.replace('"', "&quot;") in page  # what the person typed is kept
    assert Run.objects.count() == 0


def test_a_task_whose_model_is_not_configured_says_so(make_task, operator_client, settings):
    settings.AGENTOPS_MODEL = ""
    task = make_task([])
    task.model = ""
    task.save()
    response = operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    assert response.status_code == 400
    assert "No model is configured: set AGENTOPS_MODEL" in response.content.decode()
    assert Run.objects.count() == 0


def test_an_unknown_task_is_404(operator_client):
    assert operator_client.get(reverse("tasks:detail", args=["nope"])).status_code == 404
    assert (
        operator_client.post(reverse("tasks:run", args=["nope"]), {"input": "{}"}).status_code
        == 404
    )


def test_run_page_shows_the_timeline_and_labels_a_scripted_model(demo_task, operator_client):
    operator_client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'}
    )
    run = Run.objects.get()
    run_until_rest(run)
    page = operator_client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "Scripted model." in page and "scripted:invoice-reconcile" in page
    assert 'id="step-6"' in page and "email_send" in page
    assert "Waiting for a person" in page
    assert "sse-connect" in page  # a live run follows (tests/tasks/test_live.py)


def test_the_runs_list_is_a_fixed_number_of_queries(
    make_task, operator_client, django_assert_max_num_queries
):
    task = make_task([{"content": "ok"}])
    for _ in range(6):
        operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    # session, user, nav count (+ permissions), the runs, their count, the tasks
    with django_assert_max_num_queries(8):
        response = operator_client.get(reverse("runs:list"))
    assert response.content.decode().count("<tr>") == 7


def test_cancel_a_run_from_its_page(make_task, operator_client):
    task = make_task([{"content": "ok"}])
    operator_client.post(reverse("tasks:run", args=[task.slug]), {"input": "{}"})
    run = Run.objects.get()
    response = operator_client.post(
        reverse("runs:cancel", args=[run.pk]), {"why": "wrong batch"}, follow=True
    )
    assert "Run cancelled." in response.content.decode()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert run.reason == "cancelled by olivia: wrong batch"
    assert "cancelled by olivia: wrong batch" in response.content.decode()
    response = operator_client.post(reverse("runs:cancel", args=[run.pk]), follow=True)
    assert "already ended (cancelled)" in response.content.decode()


def test_a_person_without_the_permissions_may_watch_but_not_start_or_cancel_a_run(
    demo_task, operator, client, outsider
):
    client.force_login(outsider)
    page = client.get(reverse("tasks:detail", args=[demo_task.slug])).content.decode()
    assert "Can start runs" in page and 'action="/tasks/' not in page.split('id="start"')[1][:400]
    response = client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'}
    )
    assert response.status_code == 403
    assert not Run.objects.exists()

    client.force_login(operator)
    client.post(reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'})
    run = Run.objects.get()
    client.force_login(outsider)
    page = client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert "Cancel run" not in page
    assert client.post(reverse("runs:cancel", args=[run.pk])).status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_the_lineage_page_shows_the_chain_verified(demo_task, operator_client):
    operator_client.post(
        reverse("tasks:run", args=[demo_task.slug]), {"input": '{"batch": "2026-11"}'}
    )
    run = Run.objects.get()
    run_until_rest(run)
    page = operator_client.get(reverse("runs:lineage:run", args=[run.pk])).content.decode()
    assert "Verified." in page and "run.queued" in page and "approval.requested" in page


def test_an_unknown_status_filter_says_so_and_shows_every_run(operator_client):
    page = operator_client.get(reverse("runs:list"), {"status": "bogus"}).content.decode()
    assert "No run status is called &#x27;bogus&#x27;" in page
    assert "all runs are shown" in page
