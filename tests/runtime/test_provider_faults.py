"""Provider limits against their faults: a model's usage that is no count, a note on the
run that cannot be written, a wake-up spent on a waiter gone, two reservations of the same
size, and runs that would wait on capacity for ever.

The model calls go over real HTTP to an OpenAI-compatible server on loopback; the runs
are worked by a real ``Runner``; a note refused is refused by the database itself."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from datetime import datetime

import pytest
from django.db import DatabaseError, connection
from django.urls import reverse

from agentops.runtime.engine import waits
from agentops.runtime.engine.runner import Runner
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from agentops.runtime.providers import Limits, Provider, provider_for
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus
from tasks.services import run_start
from tests.peers.openai_server import OpenAICompatibleServer, completion
from tests.peers.paced_model import PacedModel
from tests.peers.workers import wait_for
from tests.runtime.test_runner import served_runs

MALFORMED = [None, -5, 3.0, math.nan, math.inf, "12", 10**40, True, [1]]


@pytest.mark.parametrize("used", MALFORMED, ids=repr)
def test_a_usage_that_is_no_count_counts_what_the_call_reserved(used):
    provider = Provider("m", Limits(tpm=1000))
    admitted = provider.admission(400, now=100.0)
    provider.done(reserved=admitted.reservation, used=used)
    assert provider.active == 0
    delay, why = provider.admission(700, now=101.0)  # 400 + 700 is over 1000
    assert why == "1000 tokens a minute" and delay == pytest.approx(59.0)
    assert provider.admission(600, now=101.0) == (0.0, "")


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": None, "completion_tokens": 7},
        {"prompt_tokens": "12", "completion_tokens": "7"},
        {"prompt_tokens": math.nan, "completion_tokens": 1},
        {"prompt_tokens": math.inf, "completion_tokens": 1},
        {"prompt_tokens": -500, "completion_tokens": 7},
        {"prompt_tokens": 10**40, "completion_tokens": 7},
    ],
    ids=["none", "strings", "nan", "inf", "negative", "huge"],
)
def test_a_model_answer_with_malformed_usage_is_answered_and_counts_what_it_reserved(
    settings, usage
):
    """The server's usage goes to the provider's window as the call ends: whatever it
    says, the call returns its answer, gives its slot back, and the window counts the
    answer's cap it reserved."""
    model = f"usage-{uuid.uuid4().hex[:8]}"
    settings.AGENTOPS_PROVIDER_LIMITS = {model: Limits(concurrency=1, tpm=1000)}
    body = completion("the answer")
    body["usage"] = usage
    with OpenAICompatibleServer() as server:
        # The body as JSON with NaN and Infinity, as Python's json writes and reads it.
        server.reply(json.loads(json.dumps(body)))
        client = OpenAICompatibleClient(
            model=model, api_key="test", base_url=server.base_url, timeout=5
        )
        turn = waits.model_complete(
            client, messages=[{"role": "user", "content": "hi"}], tools=[], max_tokens=400
        )
    assert turn.content == "the answer"
    provider = provider_for(model, server.base_url)
    assert provider.active == 0
    assert provider.admission(700)[1] == "1000 tokens a minute"
    assert provider.admission(600) == (0.0, "")


def test_two_calls_that_reserved_the_same_tokens_each_settle_their_own():
    """The first call's answer used 100 tokens, the second's 300: each reservation holds
    its own, so when the first leaves the window, the second's 300 are what is left."""
    provider = Provider("m", Limits(tpm=1000))
    first = provider.admission(300, now=100.0).reservation
    second = provider.admission(300, now=130.0).reservation
    provider.done(reserved=first, used=100)
    provider.done(reserved=second, used=300)
    # At 165 the first call is out of the window: 300 + 750 is over 1000.
    delay, why = provider.admission(750, now=165.0)
    assert why == "1000 tokens a minute" and delay == pytest.approx(25.0)
    assert provider.admission(700, now=165.0) == (0.0, "")


def test_a_freed_slot_wakes_a_waiter_at_once_after_its_earlier_waits_timed_out():
    """A waiter looks again by itself every ``RELEASE_WAIT_SECONDS``; a call that ends
    later wakes it where it waits now, not where it waited before."""
    provider = Provider("m", Limits(concurrency=1))
    held = provider.admission(0).reservation
    admitted_at: list[float] = []

    def waiter() -> None:
        reservation = waits.provider_admit(provider, 0)
        admitted_at.append(time.monotonic())
        provider.done(reserved=reservation)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(waits.RELEASE_WAIT_SECONDS * 1.2)  # its first wait timed out
    freed_at = time.monotonic()
    provider.done(reserved=held)
    thread.join(5)
    assert admitted_at, "the waiter was never let through"
    assert admitted_at[0] - freed_at < 0.3, "the waiter slept on while the slot was free"


def test_a_waiter_that_leaves_without_the_slot_it_was_woken_for_wakes_the_next():
    provider = Provider("m", Limits(concurrency=1))
    held = provider.admission(0).reservation
    woken: list[str] = []
    provider.on_release(lambda: woken.append("first"))
    provider.on_release(lambda: woken.append("second"))
    provider.done(reserved=held)
    assert woken == ["first"]
    provider.waiter_left()  # the first went back to the queue instead
    assert woken == ["first", "second"]


NOTE_REFUSED = {
    "sqlite": [
        """CREATE TRIGGER note_clear_refused BEFORE UPDATE OF waiting_on ON tasks_run
        WHEN NEW.waiting_on = '' AND OLD.waiting_on != ''
        BEGIN SELECT RAISE(ABORT, 'the note cannot be taken back'); END""",
    ],
    "postgresql": [
        """CREATE FUNCTION note_clear_refused() RETURNS trigger AS $$ BEGIN
        IF NEW.waiting_on = '' AND OLD.waiting_on <> '' THEN
        RAISE EXCEPTION 'the note cannot be taken back'; END IF; RETURN NEW; END
        $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER note_clear_refused BEFORE UPDATE ON tasks_run FOR EACH ROW
        EXECUTE FUNCTION note_clear_refused()""",
    ],
}
NOTE_ALLOWED = {
    "sqlite": ["DROP TRIGGER note_clear_refused"],
    "postgresql": [
        "DROP TRIGGER note_clear_refused ON tasks_run",
        "DROP FUNCTION note_clear_refused()",
    ],
}


@pytest.mark.django_db(transaction=True)
def test_a_note_that_cannot_be_taken_back_leaves_no_slot_taken(make_task, operator, settings):
    """The run waits, noted on its page; a slot frees, the call is let through, and the
    database refuses to take the note back. The error goes on, and the slot is free."""
    model = f"noted-{uuid.uuid4().hex[:8]}"
    settings.AGENTOPS_PROVIDER_LIMITS = {model: Limits(concurrency=1)}
    run = run_start(task=make_task([]), run_input={}, user=operator)
    Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING, lease_owner="w")
    failures: list[BaseException] = []
    with OpenAICompatibleServer() as server:
        client = OpenAICompatibleClient(
            model=model, api_key="test", base_url=server.base_url, timeout=5
        )
        provider = provider_for(model, server.base_url)
        held = provider.admission(0).reservation

        def call() -> None:
            waits.slice_run.set((run.pk, "w"))
            try:
                waits.model_complete(client, messages=[], tools=[], max_tokens=10)
            except BaseException as error:
                failures.append(error)
            finally:
                connection.close()

        with connection.cursor() as cursor:
            for statement in NOTE_REFUSED[connection.vendor]:
                cursor.execute(statement)
        try:
            thread = threading.Thread(target=call)
            thread.start()
            wait_for(
                lambda: Run.objects.get(pk=run.pk).waiting_on != "",
                timeout=5,
                what="the waiting note",
            )
            provider.done(reserved=held)
            thread.join(10)
        finally:
            with connection.cursor() as cursor:
                for statement in NOTE_ALLOWED[connection.vendor]:
                    cursor.execute(statement)
        assert server.requests == [], "the call went out"
    assert len(failures) == 1 and isinstance(failures[0], DatabaseError), failures
    assert provider.active == 0, "the slot the call took was not given back"


def queued_since(run: Run) -> list[str]:
    """The since-when of each time the run went back to the queue from a wait on
    capacity, in order."""
    payloads = LineageEvent.objects.filter(run_uuid=run.pk, kind="run.queued").order_by("seq")
    return [
        payload[waits.CAPACITY_SINCE]
        for payload in payloads.values_list("payload", flat=True)
        if waits.CAPACITY_SINCE in payload
    ]


@pytest.mark.django_db(transaction=True)
def test_a_run_that_waits_on_capacity_for_a_slice_goes_back_to_the_queue_since_when_kept(
    make_task, operator, settings, runner, client
):
    """One slot, held by the first run's long call: the second run waits a slice and goes
    back to the queue, lease given up. Worked again, it waits again, and its page says
    since when it has waited: since its first wait, not since it came back."""
    settings.AGENTOPS_SLICE_SECONDS = 1.0
    settings.AGENTOPS_PROVIDER_LIMITS = {"test-model": Limits(concurrency=1)}
    client.force_login(operator)
    with PacedModel(6.0) as model:
        holder, waiter = served_runs(make_task, operator, settings, model, 2)
        assert runner.submit(holder.pk)
        while model.in_flight < 1:
            time.sleep(0.02)
        assert runner.submit(waiter.pk)
        wait_for(lambda: len(queued_since(waiter)) == 1, timeout=5, what="the first yield")
        (first,) = queued_since(waiter)
        waiter.refresh_from_db()
        assert (waiter.status, waiter.lease_owner, waiter.waiting_on) == (RunStatus.QUEUED, "", "")

        assert runner.submit(waiter.pk)
        page = ""
        deadline = time.monotonic() + 5
        while not page and time.monotonic() < deadline:
            if Run.objects.filter(pk=waiter.pk, waiting_on__contains="since").exists():
                page = client.get(reverse("runs:detail", args=[waiter.pk])).content.decode()
            time.sleep(0.02)
        wait_for(lambda: len(queued_since(waiter)) == 2, timeout=5, what="the second yield")
        assert model.served == 0, "the first run's call ended meanwhile"
    assert queued_since(waiter) == [first, first]
    said = f"{datetime.fromisoformat(first):%Y-%m-%d %H:%M:%S} UTC"
    assert f"Waiting for its provider's capacity: test-model: 1 calls at once, since {said}." in (
        page
    )


@pytest.mark.django_db(transaction=True)
def test_a_stopping_worker_gives_back_a_run_that_waits_on_capacity_at_once(
    make_task, operator, settings
):
    """Draining, the worker hands the run that waits for a slot back to the queue, not
    once the slot frees and its own call is done."""
    settings.AGENTOPS_PROVIDER_LIMITS = {"test-model": Limits(concurrency=1)}
    settings.AGENTOPS_WORKER_CONCURRENCY = 5
    worker = Runner(5).start()
    drained: list[bool] = []
    with PacedModel(4.0) as model:
        holder, waiter = served_runs(make_task, operator, settings, model, 2)
        assert worker.submit(holder.pk)
        while model.in_flight < 1:
            time.sleep(0.02)
        assert worker.submit(waiter.pk)
        wait_for(
            lambda: Run.objects.filter(pk=waiter.pk).exclude(waiting_on="").exists(),
            timeout=5,
            what="the waiting note",
        )
        draining = threading.Thread(target=lambda: drained.append(worker.drain(15)))
        draining.start()
        wait_for(
            lambda: Run.objects.filter(pk=waiter.pk, status=RunStatus.QUEUED).exists(),
            timeout=2.5,
            what="the waiting run back in the queue",
        )
        assert model.served == 0, "the run waited for the slot to free"
        draining.join(15)
    assert drained == [True]
    assert len(queued_since(waiter)) == 1
    assert model.served == 1, "the waiting run called the model"
