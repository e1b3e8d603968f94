from __future__ import annotations

from collections.abc import Callable

import pytest

from tasks.models import Task, Trigger
from tests.conftest import PLANNED


@pytest.fixture
def make_trigger(make_task) -> Callable[..., Trigger]:
    """A trigger on a fresh scripted task: ``make_trigger(kind, config={...}, **fields)``;
    ``task=`` reuses a task, ``input_schema=`` gives the new task one."""

    def make(kind: str = Trigger.Kind.WEBHOOK, *, task: Task | None = None, **fields) -> Trigger:
        if task is None:
            schema = fields.pop("input_schema", {"type": "object"})
            task = make_task([PLANNED, {"content": "done"}], input_schema=schema)
        return Trigger.objects.create(
            task=task, kind=kind, name=fields.pop("name", f"{kind} trigger"), **fields
        )

    return make
