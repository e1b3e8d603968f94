"""An attacker's review of the JSON API: an insider with an account and a token of some
scope, a stolen or revoked token, other people's ids, hostile bodies, headers and query
strings, and concurrency. Each test is an attack and what must hold against it."""

from __future__ import annotations

import json
import re
import threading

import pytest
from django.db import connection
from django.test import Client

from agentops.api.tokens import token_revoke
from agentops.models import ApiRateWindow, ApiToken
from approvals.models import Approval, ApprovalStatus
from tasks.models import Run, Task
from tests.approvals.conftest import person

pytestmark = pytest.mark.django_db


# Rate limit ------------------------------------------------------------------------


def test_many_tokens_of_one_person_share_one_rate(api_client, make_token, operator, settings):
    """A token costs nothing to make: a limit per token would be no limit at all."""
    settings.AGENTOPS_API_RATE_PER_MINUTE = 3
    answers = [
        api_client(make_token(operator, "read", name=f"bot {n}")).get("/api/tasks").status_code
        for n in range(5)
    ]
    assert answers == [200, 200, 200, 429, 429]
    assert ApiRateWindow.objects.count() == 1


def test_the_rate_table_keeps_only_the_current_minute(
    api_client, make_token, operator, outsider, settings
):
    """Rows of minutes gone are deleted, whoever they belong to: the table does not grow
    with every person who ever called."""
    api_client(make_token(outsider)).get("/api/tasks")
    ApiRateWindow.objects.update(minute=ApiRateWindow.objects.get().minute.replace(year=2020))
    api_client(make_token(operator)).get("/api/tasks")
    assert list(ApiRateWindow.objects.values_list("user__username", flat=True)) == ["olivia"]


# Scope and permission ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "method", "path", "body"),
    [
        ("read", "post", "/api/runs", {"task": "{slug}"}),
        ("approve", "post", "/api/runs", {"task": "{slug}"}),
        ("read", "post", "/api/tasks", {"slug": "new", "name": "n", "objective_template": "o"}),
        ("approve", "patch", "/api/tasks/{slug}", {"max_steps": 1000}),
        ("read", "post", "/api/tasks-as-code/apply", {"yaml": "version: 1"}),
        ("approve", "post", "/api/tasks-as-code/plan", {"yaml": "version: 1"}),
        ("read", "post", "/api/runs/{run}/cancel", {}),
        ("read", "post", "/api/approvals/{approval}/approve", {}),
        ("operate", "post", "/api/approvals/{approval}/approve", {}),
        ("operate", "post", "/api/approvals/{approval}/reject", {"reason": "no"}),
    ],
)
def test_a_scope_does_not_reach_past_itself(
    scope, method, path, body, api_client, make_token, held, finance
):
    """A superuser's token: only the scope can refuse, so each refusal is the scope's."""
    boss = person("boss", groups=[finance])
    boss.is_superuser = boss.is_staff = True
    boss.save()
    run, approval = held(person("starter"))
    ids = {"slug": run.task.slug, "run": run.pk, "approval": approval.pk}
    where = path.format(**ids)
    body = {
        name: value.format(**ids) if isinstance(value, str) else value
        for name, value in body.items()
    }
    response = api_client(make_token(boss, scope)).send(method, where, body)
    assert response.status_code == 403, response.content
    assert response.json()["type"] == "urn:agentops:problem:scope"
    approval.refresh_from_db()
    run.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
    assert Run.objects.count() == 1 and run.status == "waiting"
    assert Task.objects.get(pk=run.task_id).max_steps != 1000


def test_a_revoked_token_or_an_inactive_users_is_refused(api_client, make_token, operator):
    secret = make_token(operator)
    token_revoke(user=operator, token_id=ApiToken.objects.get(user=operator).pk)
    assert api_client(secret).get("/api/tasks").status_code == 401
    other = make_token(operator, name="second")
    operator.is_active = False
    operator.save(update_fields=["is_active"])
    assert api_client(other).get("/api/tasks").status_code == 401


def test_a_token_in_the_query_string_or_a_session_cookie_is_not_accepted(
    client, make_token, operator
):
    client.force_login(operator)
    assert client.get("/api/tasks").status_code == 401
    secret = make_token(operator)
    client.logout()
    response = client.get("/api/tasks", {"token": secret, "access_token": secret})
    assert response.status_code == 401


# Approvals --------------------------------------------------------------------------


def test_an_approval_of_a_group_i_am_not_in_is_not_there_for_me(api_client, make_token, held):
    _run, approval = held(person("starter"))
    outsider = api_client(make_token(person("nora"), "approve"))
    for response in (
        outsider.get(f"/api/approvals/{approval.pk}"),
        outsider.post(f"/api/approvals/{approval.pk}/approve", {}),
        outsider.post(f"/api/approvals/{approval.pk}/reject", {"reason": "no"}),
    ):
        assert response.status_code == 404
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_edited_arguments_outside_the_tools_schema_are_refused(
    api_client, make_token, held, finance
):
    _run, approval = held(person("starter"))
    deciding = api_client(make_token(person("dora", groups=[finance]), "approve"))
    for arguments in ({"text": 5}, {"text": "pay", "tool": "test_delete"}, {}):
        response = deciding.post(f"/api/approvals/{approval.pk}/approve", {"arguments": arguments})
        assert response.status_code in (409, 422), response.content
        assert "schema" in response.json()["detail"]
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING and approval.edited_arguments is None


@pytest.mark.django_db(transaction=True)
def test_two_deciders_at_once_decide_an_approval_once(make_token, held, finance):
    _run, approval = held(person("starter"))
    secrets = [make_token(person(name, groups=[finance]), "approve") for name in ("dora", "dan")]
    answers: list[int] = []
    barrier = threading.Barrier(2)

    def decide(secret: str, verb: str) -> None:
        barrier.wait()
        response = Client().post(
            f"/api/approvals/{approval.pk}/{verb}",
            data={"reason": "mine"},
            content_type="application/json",
            headers={"Authorization": f"Bearer {secret}"},
        )
        answers.append(response.status_code)
        connection.close()

    threads = [
        threading.Thread(target=decide, args=(secret, verb))
        for secret, verb in zip(secrets, ("approve", "reject"), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [200, 409]
    approval = Approval.objects.get(pk=approval.pk)
    assert approval.status in (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)


# Runs -------------------------------------------------------------------------------


def test_a_hostile_run_input_is_refused_and_starts_nothing(
    api_client, make_token, make_task, operator
):
    task = make_task(
        [{"content": "done"}],
        input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
    )
    operate = api_client(make_token(operator, "operate"))
    nested = "[" * 5000 + "1" + "]" * 5000
    deep = f'{{"task": "{task.slug}", "input": {{"n": {nested}}}}}'
    huge = {"task": task.slug, "input": {"s": "x" * 3_000_000}}
    for body in ({"task": task.slug, "input": {"n": "one"}}, deep, huge):
        response = operate.post("/api/runs", body)
        assert response.status_code in (400, 422), response.content[:300]
        assert response["Content-Type"] == "application/problem+json"
    assert not Run.objects.exists()


def test_an_idempotency_key_is_per_person_and_per_request(
    api_client, make_token, make_task, operator, author
):
    first, second = make_task([{"content": "done"}]), make_task([{"content": "done"}])
    olivia = api_client(make_token(operator, "operate"))
    ada = api_client(make_token(author, "operate"))
    key = {"Idempotency-Key": "nightly"}
    mine = olivia.post("/api/runs", {"task": first.slug}, headers=key)
    theirs = ada.post("/api/runs", {"task": first.slug}, headers=key)
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]  # nobody reads another's run by key
    reused = olivia.post("/api/runs", {"task": second.slug}, headers=key)
    assert reused.status_code == 409
    for bad in ("k" * 201, "tab\there", "é", "nul\x00key", ""):
        response = olivia.post("/api/runs", {"task": first.slug}, headers={"Idempotency-Key": bad})
        assert response.status_code == 422
    assert Run.objects.count() == 2


# Query strings, paths, methods --------------------------------------------------------


def test_a_parameter_given_twice_is_refused_not_half_read(api_client, make_token, operator):
    reading = api_client(make_token(operator))
    response = reading.get("/api/runs?page=1&page=2")
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "page"
    assert reading.get("/api/approvals?page=1&page=1").status_code == 422


def test_every_answer_under_the_api_is_a_problem_not_html(api_client, make_token, operator):
    reading = api_client(make_token(operator))
    for response, status in (
        (reading.get("/api/no-such-thing"), 404),
        (reading.get("/api/"), 404),
        (reading.get("/api/runs/x/y/z"), 404),
        (reading.send("delete", "/api/runs"), 405),
        (reading.send("put", "/api/tasks"), 405),
    ):
        assert response.status_code == status
        assert response["Content-Type"] == "application/problem+json"
        assert "<" not in response.content.decode()
    assert reading.send("delete", "/api/runs")["Allow"]


def test_the_docs_page_loads_nothing_remote(client):
    page = client.get("/api/docs").content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


# The tokens page ----------------------------------------------------------------------


def test_the_tokens_page_revokes_only_my_own_and_needs_csrf(client, operator, outsider, make_token):
    make_token(outsider, name="theirs")
    theirs = ApiToken.objects.get(user=outsider)
    client.force_login(operator)
    response = client.post("/accounts/tokens/", {"action": "revoke", "token": theirs.pk})
    assert response.status_code == 400
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    response = strict.post("/accounts/tokens/", {"action": "create", "name": "x", "scope": "read"})
    assert response.status_code == 403
    assert not ApiToken.objects.filter(user=operator).exists()


def test_the_docs_page_asks_no_remote_validator(client):
    """Swagger UI asks validator.swagger.io for a badge (sending it the schema's URL)
    unless told not to, from any host but localhost."""
    page = client.get("/api/docs").content.decode()
    found = re.search(
        r'<script type="application/json" id="swagger-settings">(.*?)</script>', page, re.S
    )
    assert found
    assert json.loads(found.group(1))["validatorUrl"] is None


# Tasks ------------------------------------------------------------------------------


def test_the_dial_is_not_raised_through_the_api(api_client, make_token, make_task, author):
    authoring = api_client(make_token(author, "operate"))
    made = authoring.post(
        "/api/tasks",
        {"slug": "bold", "name": "Bold", "objective_template": "go", "autonomy_level": 3},
    )
    assert made.status_code == 422
    assert made.json()["errors"][0]["pointer"] == "/autonomy_level"
    assert not Task.objects.filter(slug="bold").exists()
    task = make_task([{"content": "done"}])
    for smuggled in (
        {"autonomy_level": 3},
        {"approver_group": None},
        {"max_live_runs": 0},
        {"id": 999},
        {"created_at": "2020-01-01T00:00:00Z"},
    ):
        response = authoring.patch(f"/api/tasks/{task.slug}", smuggled)
        assert response.status_code == 422, (smuggled, response.content)
    task.refresh_from_db()
    assert task.autonomy_level == 1 and task.approver_group_id is None


def test_a_widening_change_waits_for_a_second_person(api_client, make_token, make_task, author):
    task = make_task([{"content": "done"}], four_eyes=True)
    authoring = api_client(make_token(author, "operate"))
    response = authoring.patch(
        f"/api/tasks/{task.slug}", {"four_eyes": False, "confidence_threshold": 0.1}
    )
    assert response.status_code == 202, response.content
    assert response.json()["pending_change"]["status"] == "pending"
    task.refresh_from_db()
    assert task.four_eyes is True and task.confidence_threshold == 0.7


def test_tasks_as_code_refuses_a_user_who_is_not_staff(api_client, make_token, demo_task, author):
    from django.contrib.auth.models import Permission

    author.is_staff = False
    author.save(update_fields=["is_staff"])
    author.user_permissions.add(
        Permission.objects.get(codename="view_task", content_type__app_label="tasks")
    )
    authoring = api_client(make_token(author, "operate"))
    exported = authoring.get("/api/tasks-as-code", data={"slug": demo_task.slug}).json()["yaml"]
    changed = exported.replace("stall_limit: 8", "stall_limit: 5")
    for path in ("/api/tasks-as-code/plan", "/api/tasks-as-code/apply"):
        response = authoring.post(path, {"yaml": changed})
        assert response.status_code == 403
        assert "staff" in response.json()["detail"]
    demo_task.refresh_from_db()
    assert demo_task.stall_limit == 8


def test_a_result_on_an_action_is_refused_not_ignored(api_client, make_token, held, finance):
    """A client that sends ``result`` where it meant ``arguments`` must not approve the
    call as proposed."""
    _run, approval = held(person("starter"))
    deciding = api_client(make_token(person("dora", groups=[finance]), "approve"))
    response = deciding.post(f"/api/approvals/{approval.pk}/approve", {"result": {"text": "x"}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/result"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING


def test_a_person_who_is_not_staff_authors_no_task(demo_task, author, make_token, api_client):
    """The admin, where tasks are authored, admits only active staff: the API authors
    them for the same people, permissions or not (an attacker's review)."""
    from tasks.models import Task

    author.is_staff = False
    author.save(update_fields=["is_staff"])
    api = api_client(make_token(author, "operate"))
    made = api.post("/api/tasks", {"slug": "x1", "name": "X", "objective_template": "Do."})
    changed = api.patch(f"/api/tasks/{demo_task.slug}", {"instructions": "Ignore the rails."})
    for answer in (made, changed):
        assert answer.status_code == 403, answer.content
        assert "is not staff" in answer.json()["detail"]
    assert not Task.objects.filter(slug="x1").exists()
    demo_task.refresh_from_db()
    assert demo_task.instructions != "Ignore the rails."
