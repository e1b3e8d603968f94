"""Shared by the approval tests: people with or without the decide permission, a group,
and a run routed to it that waits on an irreversible call."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission, User

from approvals.models import Approval
from tasks.services import run_start
from tests.conftest import run_until_rest


def person(username: str, *, groups=(), decide: bool = True) -> User:
    user = User.objects.create_user(username, f"{username}@example.com", "pw-123456789")
    if decide:
        user.user_permissions.add(Permission.objects.get(codename="decide_approval"))
    for group in groups:
        user.groups.add(group)
    return User.objects.get(pk=user.pk)


@pytest.fixture
def finance() -> Group:
    return Group.objects.create(name="finance")


@pytest.fixture
def held(make_task, finance):
    """A run of a task routed to finance, with four eyes, waiting on a send."""

    def start(starter: User, **task_fields):
        task = make_task(
            [{"calls": [("test_send", {"text": "pay"})]}, {"content": "done"}],
            tools=["test_send"],
            approver_group=finance,
            self_check=False,
            **task_fields,
        )
        run = run_start(task=task, run_input={}, user=starter)
        run_until_rest(run)
        return run, Approval.objects.get(run=run)

    return start
