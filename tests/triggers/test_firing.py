"""trigger_fire: every kind's one path from "something arrived" to a run. A key starts
at most one run; the intake rails refuse and record; what cannot become the task's
input is refused naming the field, and starts nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Trigger
from triggers.config import config_errors
from triggers.models import Firing
from triggers.services import (
    PAYLOAD_CHARS,
    MappingRefused,
    input_mapped,
    trigger_fire,
    trigger_secret_rotate,
    trigger_secrets,
)

pytestmark = pytest.mark.django_db

SCHEMA = {
    "type": "object",
    "required": ["invoice"],
    "properties": {"invoice": {"type": "string"}, "amount": {"type": "number"}},
}


def test_a_firing_starts_a_run_that_names_its_trigger_key_and_payload(make_trigger):
    trigger = make_trigger(input_mapping="data", input_schema=SCHEMA)
    payload = {"type": "invoice.created", "data": {"invoice": "INV-1", "amount": 12.5}}

    fired = trigger_fire(trigger_id=trigger.pk, key="msg_1", payload=payload)

    assert fired.accepted and not fired.duplicate
    run = fired.run
    assert run.input == {"invoice": "INV-1", "amount": 12.5}
    assert (run.trigger, run.trigger_kind, run.status) == (trigger, "webhook", RunStatus.QUEUED)
    queued = LineageEvent.objects.get(run_uuid=run.pk, kind="run.queued")
    assert queued.actor == f"trigger:{trigger.pk}"
    assert queued.payload["trigger_id"] == trigger.pk
    assert queued.payload["firing_key"] == f"{trigger.pk}:msg_1"
    assert queued.payload["firing"] == payload
    assert Firing.objects.get().payload == payload


def test_the_same_key_twice_starts_one_run_and_answers_with_the_first(make_trigger):
    trigger = make_trigger()
    first = trigger_fire(trigger_id=trigger.pk, key="k", payload={})
    again = trigger_fire(trigger_id=trigger.pk, key="k", payload={"other": 1})
    assert again.duplicate and again.firing.pk == first.firing.pk and again.run == first.run
    assert Run.objects.count() == 1 and Firing.objects.count() == 1


def test_one_key_on_two_triggers_is_two_firings(make_trigger):
    one = make_trigger()
    two = make_trigger(task=one.task, name="another")
    trigger_fire(trigger_id=one.pk, key="same", payload={})
    assert trigger_fire(trigger_id=two.pk, key="same", payload={}).accepted
    assert Run.objects.count() == 2


def test_input_the_schema_refuses_is_refused_naming_the_field_and_starts_nothing(make_trigger):
    trigger = make_trigger(input_schema=SCHEMA)
    fired = trigger_fire(trigger_id=trigger.pk, key="bad", payload={"invoice": 7})
    assert not fired.accepted and fired.firing.refusal == Firing.Refusal.INPUT
    assert "invoice: 7 is not of type 'string'" in fired.firing.reason
    assert Run.objects.count() == 0 and LineageEvent.objects.count() == 0
    # A refusal does not hold the key: the sender's corrected delivery is accepted.
    assert trigger_fire(trigger_id=trigger.pk, key="bad", payload={"invoice": "7"}).accepted


def test_a_mapping_that_gives_no_object_is_refused_saying_what_it_gave():
    assert input_mapped("", {"a": 1}) == {"a": 1}
    for expression, payload, said in (
        ("items", {"items": [1]}, "a JSON array"),
        ("missing", {}, "nothing"),
        ("", "text", "a JSON string"),
    ):
        with pytest.raises(MappingRefused, match=said):
            input_mapped(expression, payload)


def test_the_rate_limit_refuses_and_records_each_firing_over_it(make_trigger):
    trigger = make_trigger(max_per_minute=2, max_per_hour=3)
    now = timezone.now()
    outcomes = [
        trigger_fire(trigger_id=trigger.pk, key=f"k{n}", payload={}, now=now).accepted
        for n in range(4)
    ]
    assert outcomes == [True, True, False, False]
    refused = Firing.objects.filter(accepted=False)
    assert {f.refusal for f in refused} == {Firing.Refusal.RATE}
    assert "2 runs in the last minute (at most 2 per minute)" in refused.first().reason
    # A minute on, the hour's limit still holds after one more.
    later = now + timedelta(seconds=61)
    assert trigger_fire(trigger_id=trigger.pk, key="k4", payload={}, now=later).accepted
    last = trigger_fire(trigger_id=trigger.pk, key="k5", payload={}, now=later)
    assert "3 runs in the last hour (at most 3 per hour)" in last.firing.reason
    assert Run.objects.count() == 3


def test_the_tasks_live_runs_cap_refuses_a_firing(make_trigger):
    trigger = make_trigger()
    trigger.task.max_live_runs = 1
    trigger.task.save()
    assert trigger_fire(trigger_id=trigger.pk, key="a", payload={}).accepted
    refused = trigger_fire(trigger_id=trigger.pk, key="b", payload={})
    assert refused.firing.refusal == Firing.Refusal.LIVE
    assert refused.firing.reason == "the task has 1 live runs (at most 1 at once)"


def test_overlap_skip_refuses_while_the_triggers_last_run_is_live(make_trigger):
    trigger = make_trigger(Trigger.Kind.CRON, config={"expression": "* * * * *"})
    first = trigger_fire(trigger_id=trigger.pk, key="slot1", payload={}, overlap="skip")
    second = trigger_fire(trigger_id=trigger.pk, key="slot2", payload={}, overlap="skip")
    assert first.accepted and second.firing.refusal == Firing.Refusal.OVERLAP
    Run.objects.filter(pk=first.run.pk).update(status=RunStatus.SUCCEEDED)
    assert trigger_fire(trigger_id=trigger.pk, key="slot3", payload={}, overlap="skip").accepted


def test_a_disabled_trigger_refuses(make_trigger):
    trigger = make_trigger(enabled=False)
    fired = trigger_fire(trigger_id=trigger.pk, key="k", payload={})
    assert fired.firing.refusal == Firing.Refusal.DISABLED and Run.objects.count() == 0


def test_a_large_payload_is_kept_as_a_stand_in_and_a_long_key_as_its_digest(make_trigger):
    trigger = make_trigger()
    payload = {"blob": "x" * (PAYLOAD_CHARS + 10)}
    fired = trigger_fire(trigger_id=trigger.pk, key="k" * 500, payload=payload)
    assert fired.accepted and fired.run.input == payload
    assert fired.firing.payload["not_kept"]["limit"] == PAYLOAD_CHARS
    assert fired.firing.key.startswith("sha256:")
    assert trigger_fire(trigger_id=trigger.pk, key="k" * 500, payload={}).duplicate


def test_a_rotated_secret_holds_with_the_previous_one_until_the_overlap_ends(make_trigger):
    trigger = make_trigger()
    first = trigger_secret_rotate(trigger=trigger)
    now = timezone.now()
    second = trigger_secret_rotate(trigger=trigger, overlap=timedelta(minutes=5), now=now)
    trigger.refresh_from_db()
    assert first.startswith("whsec_") and second != first
    assert trigger_secrets(trigger, now=now) == [second, first]
    assert trigger_secrets(trigger, now=now + timedelta(minutes=6)) == [second]


@pytest.mark.parametrize(
    ("kind", "config", "mapping", "said"),
    [
        ("cron", {"expression": "every day"}, "", "config/expression: 'every day' is not a cron"),
        ("cron", {"expression": "0 2 * * *", "timezone": "Mars/Base"}, "", "config/timezone"),
        ("cron", {"expression": "0 2 * * *", "when": 1}, "", "Additional properties"),
        ("webhook", {}, "data.[", "input_mapping: not a JMESPath expression"),
        ("queue", {"transport": "redis", "url": "amqp://x"}, "", "config/url: a redis"),
        ("queue", {"transport": "redis", "url": "redis://x"}, "", "config/stream: a redis"),
        ("queue", {"transport": "amqp", "url": "amqp://h", "queue": "q", "dead_letter": "q"}, "",
         "config/dead_letter: must not be the queue itself"),
        ("queue", {"transport": "redis", "url": "redis://:{secret:DJANGO_SECRET_KEY}@h",
                   "stream": "s"}, "", "one of agentops' own settings"),
        ("email", {"address": "in@example.com", "senders": ["not an address"]}, "", "senders/0"),
        ("sms", {}, "", "kind: 'sms' is not a kind of trigger"),
    ],
)  # fmt: skip
def test_a_bad_config_is_refused_naming_the_field(kind, config, mapping, said):
    errors = config_errors(kind=kind, config=config, input_mapping=mapping)
    assert any(said in error for error in errors), errors


def test_good_configs_pass():
    for kind, config in (
        ("cron", {"expression": "0 2 * * *", "timezone": "Europe/Paris", "missed": "once"}),
        ("webhook", {"tolerance_seconds": 60}),
        ("queue", {"transport": "redis", "url": "redis://127.0.0.1:6379/0", "stream": "leads"}),
        ("queue", {"transport": "amqp", "url": "amqp://guest:guest@127.0.0.1//", "queue": "q"}),
        ("email", {"address": "in@example.com", "senders": ["a@example.com", "@example.org"]}),
    ):
        assert config_errors(kind=kind, config=config, input_mapping="data") == [], kind


@pytest.mark.parametrize(
    "key", ["k" * 199, "k" * 200, "a\x00b", "line\nbreak", "lone \ud800 surrogate", "x" * 5000]
)
def test_a_key_the_columns_cannot_hold_is_stored_as_its_digest_and_still_dedupes(make_trigger, key):
    # 199 and 200 characters fit the firing's column but not the run's "<id>:<key>";
    # NUL and lone surrogates fit no PostgreSQL text column.
    trigger = make_trigger()
    fired = trigger_fire(trigger_id=trigger.pk, key=key, payload={})
    assert fired.accepted and fired.firing.key.startswith("sha256:")
    assert len(fired.run.firing_key) <= 200
    assert trigger_fire(trigger_id=trigger.pk, key=key, payload={}).duplicate


def test_what_no_database_stores_in_a_payload_is_stored_normalised(make_trigger):
    trigger = make_trigger()
    payload = {"subject": "nul \x00 and \ud800", "n": float("nan")}
    fired = trigger_fire(trigger_id=trigger.pk, key="odd", payload=payload)
    assert fired.accepted
    assert fired.run.input["subject"] == "nul \ufffd and \ufffd"
    assert fired.firing.payload["subject"] == "nul \ufffd and \ufffd"
