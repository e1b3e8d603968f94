from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection

import tests.agent_tools
from agentops.runtime.engine import Outcome, advance
from agentops.runtime.models.base import ModelTurn
from agentops.runtime.models.scripted import SCRIPTS, Script, scripted_turn, turns_script
from lineage.triggers import triggers_install, triggers_remove
from tasks.models import Run, Task, Tool, ToolGrant
from tasks.services import tools_sync

IN_CI = os.environ.get("CI", "").lower() == "true"

# A first turn that drafts the plan, as the engine requires of every run's first turn
# (a plain answer to it is refused): scripts whose work is a single answer start here.
PLANNED = {"calls": [("plan_update", {"steps": [{"title": "do the test thing"}]})]}


def planning(play: Script) -> Script:
    """The script ``play``, after a first turn that drafts the plan (``PLANNED``)."""

    def first_planned(messages: list[dict]) -> ModelTurn:
        if not any(message["role"] == "assistant" for message in messages):
            return scripted_turn(PLANNED, 0)
        return play(messages)

    return first_planned


def require(available: bool, reason: str) -> None:
    """Skip a test whose peer is missing here; in CI, fail it instead."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason)


def run_coroutine(coroutine):
    """Await ``coroutine`` on a new event loop in a thread of its own, as the async
    worker's I/O thread does, and return its result. ``asyncio.run`` in the test's
    thread would fail once Playwright's sync API (the browser tests, session-scoped)
    has left an event loop running there."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = asyncio.run(coroutine)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, name="test-event-loop")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.fixture(autouse=True)
def lineage_append_only(request):
    """The append-only triggers are in force in every database test.

    A transactional test's database is emptied by a flush afterwards (DELETE on SQLite,
    TRUNCATE on PostgreSQL), which the triggers rightly refuse: they are lifted for the
    flush and put back at the start of the next test."""
    marker = request.node.get_closest_marker("django_db")
    names = request.fixturenames
    transactional = any(n in names for n in ("transactional_db", "live_server")) or bool(
        marker and marker.kwargs.get("transaction")
    )
    if not (marker or transactional or "db" in names):
        yield
        return
    request.getfixturevalue("transactional_db" if transactional else "db")
    triggers_install(connection)
    yield
    if transactional:
        triggers_remove(connection)


# A fixed key for the trail's checkpoints (base64 of 32 bytes): tests only.
LINEAGE_TEST_KEY = "dGVzdC1vbmx5LWxpbmVhZ2Utc2lnbmluZy1rZXktMzI="


@pytest.fixture(autouse=True)
def lineage_checkpoints(monkeypatch, tmp_path):
    """Each test's checkpoints in a file of its own, signed with the tests' key: a run
    that ends writes one (lineage.anchoring), and no test may read another's. Set on
    the settings themselves, not through pytest-django's ``settings`` (an override
    would hide SETTINGS_MODULE, which spawned workers need)."""
    from django.conf import settings

    path = tmp_path / "lineage_checkpoints.jsonl"
    monkeypatch.setattr(settings, "AGENTOPS_LINEAGE_CHECKPOINT_FILE", path)
    monkeypatch.setattr(settings, "AGENTOPS_LINEAGE_SIGNING_KEY", LINEAGE_TEST_KEY)
    monkeypatch.setattr(settings, "AGENTOPS_LINEAGE_SINK", "lineage.anchoring.FileSink")
    return path


@pytest.fixture
def operator(db) -> User:
    """A person who may start and cancel runs and decide approvals."""
    user = User.objects.create_user("olivia", "olivia@example.com", "pw-olivia-123")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["decide_approval", "start_run", "cancel_run"])
    )
    return User.objects.get(pk=user.pk)


@pytest.fixture
def outsider(db) -> User:
    """A logged-in person without the permission to decide."""
    return User.objects.create_user("oscar", "oscar@example.com", "pw-oscar-123")


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def demo_task(db) -> Task:
    call_command("load_demo", stdout=StringIO())
    return Task.objects.get(slug="reconcile-invoices")


@pytest.fixture
def make_task(db) -> Callable[..., Task]:
    """A task on a scripted model: ``make_task(turns, tools=[...], autonomy_level=1)``."""
    tools_sync()

    def make(turns: list[dict], *, tools: list[str] = (), **fields) -> Task:
        name = f"test-{uuid.uuid4().hex[:8]}"
        SCRIPTS[name] = turns_script(turns)
        task = Task.objects.create(
            slug=name,
            name=f"Test task {name}",
            objective_template=fields.pop("objective_template", "Do the test thing."),
            model=f"scripted:{name}",
            **fields,
        )
        for tool_name in tools:
            ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=tool_name))
        return task

    return make


def run_until_rest(run: Run, *, limit: int = 50) -> Outcome:
    """Advance the run as a worker would until it waits for a person or ends."""
    for _ in range(limit):
        outcome = advance(run.pk)
        if outcome is not Outcome.YIELDED:
            run.refresh_from_db()
            return outcome
    raise AssertionError(f"run {run.pk} did not come to rest in {limit} slices")


@pytest.fixture(autouse=True)
def effects_reset():
    tests.agent_tools.EFFECTS.clear()
    yield


def chromium_path() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


@pytest.fixture
def busy_timeout() -> Iterator[None]:
    """A SQLite write that meets another's lock fails after 50 ms, not 20 s."""
    settings_dict = connection.settings_dict
    options = settings_dict["OPTIONS"]
    settings_dict["OPTIONS"] = {**options, "timeout": 0.05}  # a copy: it is shared
    connection.close()
    yield
    settings_dict["OPTIONS"] = options
    connection.close()
