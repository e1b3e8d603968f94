"""What a token may do: its scope, always inside its user's own permissions and the
per-object rules the pages apply; how often: the rate limit."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User

from agentops.models import ApiRateWindow
from approvals.models import ApprovalStatus
from tasks.models import Run
from tests.approvals.conftest import person

pytestmark = pytest.mark.django_db


def test_a_read_token_cannot_start_a_run(api_client, make_token, make_task, operator):
    task = make_task([{"content": "done"}])
    response = api_client(make_token(operator, "read")).post(
        "/api/runs", {"task": task.slug, "input": {}}
    )
    assert response.status_code == 403
    assert response.json()["type"] == "urn:agentops:problem:scope"
    assert "operate" in response.json()["detail"]
    assert not Run.objects.exists()


def test_an_operate_token_starts_a_run_but_cannot_decide_an_approval(
    api_client, make_token, held, finance
):
    olivia = person("olivia2", groups=[finance])
    olivia.user_permissions.add(*Permission.objects.filter(codename="start_run"))
    _run, approval = held(person("starter"))
    response = api_client(make_token(olivia, "operate")).post(
        f"/api/approvals/{approval.pk}/approve", {}
    )
    assert response.status_code == 403
    assert response.json()["type"] == "urn:agentops:problem:scope"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_an_approve_token_cannot_start_a_run(api_client, make_token, make_task, operator):
    task = make_task([{"content": "done"}])
    response = api_client(make_token(operator, "approve")).post(
        "/api/runs", {"task": task.slug, "input": {}}
    )
    assert response.status_code == 403
    assert not Run.objects.exists()


def test_the_scope_does_not_give_what_the_user_lacks(api_client, make_token, make_task, outsider):
    task = make_task([{"content": "done"}])
    response = api_client(make_token(outsider, "operate")).post(
        "/api/runs", {"task": task.slug, "input": {}}
    )
    assert response.status_code == 403
    assert response.json()["type"] == "urn:agentops:problem:permission"
    assert "tasks.start_run" in response.json()["detail"]
    assert not Run.objects.exists()


def test_an_approval_the_user_may_not_see_is_a_404_even_with_the_scope(
    api_client, make_token, held
):
    _run, approval = held(person("starter"))
    outside_the_group = person("mallory")  # holds the decide permission, not in finance
    client = api_client(make_token(outside_the_group, "approve"))
    for response in (
        client.get(f"/api/approvals/{approval.pk}"),
        client.post(f"/api/approvals/{approval.pk}/approve", {}),
        client.post(f"/api/approvals/{approval.pk}/reject", {"reason": "no"}),
        client.get("/api/approvals/999999"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == "No approval here, or not one you may see."
    assert client.get("/api/approvals").json()["count"] == 0
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_without_the_decide_permission_an_approve_token_is_refused(
    api_client, make_token, held, finance
):
    _run, approval = held(person("starter"))
    no_decide = person("norbert", groups=[finance], decide=False)
    response = api_client(make_token(no_decide, "approve")).post(
        f"/api/approvals/{approval.pk}/approve", {}
    )
    assert response.status_code == 403
    assert "approvals.decide_approval" in response.json()["detail"]


def test_four_eyes_holds_through_the_api(api_client, make_token, held, finance):
    """The person who started the run may not decide it (decider_refusal), token or not."""
    starter = person("sam", groups=[finance])
    _run, approval = held(starter, four_eyes=True)
    response = api_client(make_token(starter, "approve")).post(
        f"/api/approvals/{approval.pk}/approve", {}
    )
    assert response.status_code == 403
    assert response.json()["type"] == "urn:agentops:problem:decider"
    assert "four eyes" in response.json()["detail"]
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_past_the_rate_a_token_gets_429_with_retry_after(
    api_client, make_token, operator, settings
):
    settings.AGENTOPS_API_RATE_PER_MINUTE = 3
    client = api_client(make_token(operator))
    assert [client.get("/api/tasks").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/api/tasks")
    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:agentops:problem:rate-limit"
    assert 1 <= int(refused["Retry-After"]) <= 60
    # Counted in the database (shared by every web process), per token.
    assert ApiRateWindow.objects.get().count == 4
    other = User.objects.create_user("other", "o@example.com", "pw-other-12345")
    assert api_client(make_token(other)).get("/api/tasks").status_code == 200


def test_the_count_starts_again_each_minute(api_client, make_token, operator, settings):
    settings.AGENTOPS_API_RATE_PER_MINUTE = 1
    client = api_client(make_token(operator))
    assert client.get("/api/tasks").status_code == 200
    assert client.get("/api/tasks").status_code == 429
    window = ApiRateWindow.objects.get()
    window.minute = window.minute.replace(year=2020)  # as if it were a minute long gone
    window.save(update_fields=["minute"])
    assert client.get("/api/tasks").status_code == 200
    assert ApiRateWindow.objects.count() == 1  # the old minute's row went
