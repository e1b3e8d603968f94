from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib.auth.models import Permission, User

from agentops.api.tokens import token_create

# The approvals tests' run that waits on a send, routed to the group finance.
from tests.approvals.conftest import finance, held  # noqa: F401


@pytest.fixture
def make_token(db) -> Callable[..., str]:
    """``make_token(user, scope)``: a new token's secret, as its owner would copy it."""

    def make(user: User, scope: str = "read", name: str = "test") -> str:
        return token_create(user=user, name=name, scope=scope).secret

    return make


@pytest.fixture
def api_client(client):
    """The test client, speaking JSON with a token: ``api_client(token).get(path)``."""

    class Bound:
        def __init__(self, token: str | None) -> None:
            self.headers = {"Authorization": f"Bearer {token}"} if token else {}

        def get(self, path: str, **kwargs):
            return client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

        def send(self, method: str, path: str, body=None, **kwargs):
            import json

            data = (
                body
                if isinstance(body, (str, bytes))
                else json.dumps(body if body is not None else {})
            )
            return getattr(client, method)(
                path,
                data=data,
                content_type="application/json",
                headers={**self.headers, **kwargs.pop("headers", {})},
                **kwargs,
            )

        def post(self, path: str, body=None, **kwargs):
            return self.send("post", path, body, **kwargs)

        def patch(self, path: str, body=None, **kwargs):
            return self.send("patch", path, body, **kwargs)

    return Bound


@pytest.fixture
def author(db) -> User:
    """A person who may create and change tasks and grant tools, and start runs."""
    user = User.objects.create_user("ada", "ada@example.com", "pw-ada-12345", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=[
                "add_task",
                "change_task",
                "add_toolgrant",
                "delete_toolgrant",
                "start_run",
            ]
        )
    )
    return User.objects.get(pk=user.pk)
