"""Any JSON value goes into the trail and comes back exactly, and its event verifies:
random payloads through the real write paths (``event_append``, and the engine's
commits, one statement on PostgreSQL), on whichever database the suite runs."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentops.runtime.engine import context_load, lease_claim, step_entry, steps_commit
from lineage.models import LineageEvent
from lineage.services import chain_verify, event_append, json_canonical
from tasks.models import StepKind, StepStatus
from tasks.services import run_start

pytestmark = pytest.mark.django_db

# Text of any code point, unpaired surrogates and NUL included, which neither database's
# JSON holds and PostgreSQL's text refuses (NUL): the canonical text escapes them.
text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["\x00", "\ud800", "a\udfffb", "\u2028", "é", "\U0001f600"]
)
numbers = (
    st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e20, -0.0, 0.0, 1e-320, 5e-324, 1.7976931348623157e308, 2**63, -(2**64)])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=25,
)


def nested(depth: int) -> dict:
    value: object = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return {"deep": value}


payloads = st.dictionaries(text, json_values, max_size=6) | st.integers(0, 150).map(nested)
examples = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,  # no .hypothesis directory left in the checkout
)


def assert_exact(event: LineageEvent, payload: dict) -> None:
    # Compared as canonical text: -0.0 and 0.0 are equal as numbers, not as records.
    assert json_canonical(event.body) == json_canonical(payload)


@examples
@given(payload=payloads)
def test_any_json_payload_is_kept_exactly_and_verifies(payload):
    run_uuid = uuid.uuid4()
    with transaction.atomic():
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload=payload)
        event_append(run_uuid=run_uuid, kind="tool.succeeded", actor="engine", payload=payload)
    report = chain_verify(run_uuid)
    assert report.intact, report.findings
    for event in LineageEvent.objects.filter(run_uuid=run_uuid):
        assert_exact(event, payload)


@pytest.fixture
def worker_context(make_task, operator):
    task = make_task([{"content": "done"}])
    run = run_start(task=task, run_input={}, user=operator)
    assert lease_claim(run.pk, "worker-a")
    return context_load(run.pk, "worker-a")


@examples
@given(payload=payloads)
def test_any_json_payload_committed_by_the_engine_is_kept_exactly(worker_context, payload):
    ctx = worker_context
    payload.pop("step", None)
    before = timezone.now() - timedelta(seconds=1)
    entry = step_entry(
        event="model.responded",
        payload=payload,
        kind=StepKind.MODEL,
        status=StepStatus.SUCCEEDED,
        content="random payload",
    )
    with CaptureQueriesContext(connection) as queries:
        steps_commit(ctx, {"steps_used": 1}, [entry])
    if connection.vendor == "postgresql":  # the one-statement commit, not the fallback
        assert len(queries) == 1
    event = LineageEvent.objects.filter(run_uuid=ctx.run.pk, at__gte=before).latest("seq")
    assert event.kind == "model.responded"
    assert_exact(event, {**payload, "step": event.body["step"]})  # the engine numbers it
    report = chain_verify(ctx.run.pk)
    assert report.intact, report.findings
