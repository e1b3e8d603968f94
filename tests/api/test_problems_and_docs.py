"""Every refusal is a problem document (RFC 9457) naming what was wrong; the OpenAPI
document and its interactive docs are served, the docs from local static files only."""

from __future__ import annotations

import re

import pytest

from tasks.models import Run

pytestmark = pytest.mark.django_db


@pytest.fixture
def operate(api_client, make_token, operator):
    return api_client(make_token(operator, "operate"))


def test_a_validation_problem_names_each_field(operate):
    response = operate.post("/api/runs", {"task": 5, "input": [], "extra": 1})
    assert response.status_code == 422
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:agentops:problem:validation"
    assert problem["title"] == "Invalid input" and problem["status"] == 422
    assert {(e["location"], e["pointer"]) for e in problem["errors"]} == {
        ("body", "/task"),
        ("body", "/input"),
        ("body", "/extra"),
    }
    assert "/task" in problem["detail"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("{", "not valid JSON"),
        ('{"task": NaN}', "NaN is not a JSON number"),
        ('{"task": "a", "task": "b"}', "appears twice"),
        ('{"task": "\\u0000"}', "NUL"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_body_that_is_not_json_we_take_is_a_400_saying_why(operate, body, said):
    response = operate.post("/api/runs", body)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert said in response.json()["detail"]


def test_a_nul_in_a_query_or_path_is_refused_not_a_500(operate):
    assert operate.get("/api/runs?q=a%00b").status_code == 422
    assert operate.get("/api/tasks/a%00b").status_code == 404
    assert operate.get("/api/runs?page=99999999999999999999").status_code == 422


def test_an_unknown_query_parameter_is_named(operate):
    response = operate.get("/api/runs?stauts=failed")
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "stauts"


def test_the_openapi_document_is_3_1_and_declares_problems(client):
    document = client.get("/api/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    start = document["paths"]["/api/runs"]["post"]
    assert set(start["responses"]) >= {"200", "201", "401", "403", "409", "422", "429"}
    assert "application/problem+json" in start["responses"]["422"]["content"]
    assert document["components"]["securitySchemes"]["TokenAuth"]["scheme"] == "bearer"
    tags = {
        tag for path in document["paths"].values() for op in path.values() for tag in op["tags"]
    }
    assert tags == {"tasks", "tasks as code", "runs", "approvals", "lineage"}


def test_the_docs_page_uses_only_local_static_files(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    page = response.content.decode()
    urls = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(url.endswith("swagger-ui-bundle.js") for url in urls)
    for url in urls:
        assert url.startswith("/static/"), url
    assert "cdn" not in page.lower() and "http://" not in page and "https://" not in page
    for url in urls:
        assert client.get(url).status_code == 200, url  # served, nothing fetched elsewhere
