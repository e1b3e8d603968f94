"""The OpenAPI document tells the truth: schemathesis sends every operation generated
requests, valid and invalid, through the Django WSGI app, and checks that no answer
is a server error and every answer (status, content type, body, headers) is one the
document declares."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_wsgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentops.api.tokens import token_create

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = 6


@pytest.fixture
def wsgi_in_test_transaction(db):
    """The WSGI app on the test's connection: Django closes the connection when a
    request ends, which would end the test's transaction; its test client stops that
    the same way."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def schema(wsgi_in_test_transaction, settings, make_task, held):
    settings.AGENTOPS_API_RATE_PER_MINUTE = 100_000
    make_task([{"answer": "done"}])
    held(User.objects.create_user("starter"))  # an approval waits, for the linked calls
    return from_wsgi("/api/openapi.json", wsgi_in_test_transaction)


@pytest.fixture
def superuser(db) -> User:
    return User.objects.create_superuser("root", "root@example.com", "pw-root-12345")


@pytest.fixture
def token(superuser) -> str:
    return token_create(user=superuser, name="schemathesis", scope="operate").secret


@pytest.mark.parametrize("scope", ["operate", "approve"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_schema(superuser, schema, mode, scope):
    token = token_create(user=superuser, name="schemathesis", scope=scope).secret
    headers = {"Authorization": f"Bearer {token}"}
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: dict[str, set[int]] = {}
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_truthfully(case):
            response = case.call_and_validate(headers=headers, checks=checks)
            seen.setdefault(case.operation.label, set()).add(response.status_code)

        answers_truthfully()

    # Every operation was called; the valid requests reached past the refusals.
    assert len(seen) == len(operations)
    if mode is GenerationMode.POSITIVE:
        assert {200, 201} & seen["POST /api/tasks"] | seen["GET /api/runs"] | seen["GET /api/tasks"]


def test_linked_operations_answer_within_their_schemas(token, schema):
    """Stateful: schemathesis follows the document's links (a task listed or made ->
    read, change, start a run -> read, cancel, its trail; an approval listed -> read,
    approve, reject), so what one call makes or finds is what the next one works on."""
    headers = {"Authorization": f"Bearer {token}"}
    statuses: dict[str, set[int]] = {}
    # Valid requests only, the same ones each time: the chains must get somewhere (the
    # stateless test above sends the invalid ones).
    schema.config.generation.update(modes=[GenerationMode.POSITIVE], deterministic=True)

    class Machine(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": headers}

        def validate_response(self, response, case, additional_checks=(), **kwargs):
            case.validate_response(response, checks=CHECKS, headers=headers)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

    Machine.run(
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )

    # The links were followed: a task, approval or run named in one answer was found by
    # the next call (a generated slug, id or UUID names none of them).
    found_by_link = [
        label
        for label, seen in statuses.items()
        if "{" in label and label.startswith("GET") and 200 in seen
    ]
    assert found_by_link, statuses
