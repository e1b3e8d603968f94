"""Schedules, with the clock in the test's hands (time-machine): a due slot fires once
however often and from however many schedulers it is ticked, in its time zone; the
overlap and missed policies decide the rest; a bad stored config stops only its own
schedule."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection, connections
from django_q.models import Schedule

from agentops.celery import app, cron_tick_task
from tasks.models import Run, RunStatus, Trigger
from triggers import cron
from triggers.cron import (
    CRON_TICK_SCHEDULE_NAME,
    cron_next,
    cron_tick,
    cron_tick_job,
    cron_trigger_tick,
    slot_fire,
    tick_grace,
)
from triggers.models import Firing

Refusal = Firing.Refusal
START = datetime(2026, 1, 15, 9, 58, tzinfo=UTC)


def at(text: str) -> datetime:
    """A UTC time from ``2026-01-15 10:00:20``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def clock():
    """The clock, stopped at START; ``clock.move_to(...)`` moves it."""
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


@pytest.fixture
def schedule(make_trigger, clock):
    """A cron trigger created now (the clock's time): ``schedule("*/5 * * * *", ...)``."""

    def make(expression: str, **options) -> Trigger:
        fields = {
            name: options.pop(name)
            for name in ("input_mapping", "input_schema", "enabled", "task")
            if name in options
        }
        return make_trigger(
            Trigger.Kind.CRON, config={"expression": expression, **options}, **fields
        )

    return make


def tick(clock, when: datetime) -> list:
    clock.move_to(when)
    return cron_tick()


def accepted_keys(trigger: Trigger) -> list[str]:
    return list(
        trigger.firings.filter(accepted=True)
        .order_by("received_at", "pk")
        .values_list("key", flat=True)
    )


def runs_end(trigger: Trigger) -> None:
    Run.objects.filter(trigger=trigger).update(status=RunStatus.SUCCEEDED)


# Due slots ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_new_schedule_fires_nothing_for_the_past_and_starts_counting_now(schedule, clock):
    clock.move_to(at("2026-01-15 10:07:30"))
    trigger = schedule("*/5 * * * *")

    assert tick(clock, at("2026-01-15 10:07:40")) == []

    trigger.refresh_from_db()
    assert trigger.cursor == at("2026-01-15 10:07:40")
    assert Firing.objects.count() == 0 and Run.objects.count() == 0


@pytest.mark.django_db
def test_a_due_slot_fires_once_however_often_it_is_ticked(schedule, clock):
    trigger = schedule("*/5 * * * *", input={"batch": "nightly"})
    assert tick(clock, at("2026-01-15 09:59:55")) == []

    fired = tick(clock, at("2026-01-15 10:00:20"))
    again = tick(clock, at("2026-01-15 10:00:20"))
    later = tick(clock, at("2026-01-15 10:01:00"))

    assert [f.firing.key for f in fired] == ["slot:2026-01-15T10:00:00Z"]
    assert fired[0].accepted and again == [] and later == []
    run = Run.objects.get()
    assert run.trigger == trigger and run.firing_key == f"{trigger.pk}:slot:2026-01-15T10:00:00Z"
    assert run.input == {
        "batch": "nightly",
        "slot": "2026-01-15T10:00:00Z",
        "scheduled_for": "2026-01-15T10:00:00+00:00",
    }
    trigger.refresh_from_db()
    assert trigger.cursor == at("2026-01-15 10:00:00")  # the last slot considered


@pytest.mark.django_db
def test_a_slot_seen_late_but_within_the_grace_still_fires(schedule, clock):
    trigger = schedule("0 10 * * *")
    tick(clock, at("2026-01-15 09:59:00"))
    late = at("2026-01-15 10:00:00") + tick_grace()

    fired = tick(clock, late)

    assert [f.accepted for f in fired] == [True]
    assert accepted_keys(trigger) == ["slot:2026-01-15T10:00:00Z"]


@pytest.mark.django_db
def test_a_new_schedule_fires_a_slot_that_came_after_it_was_made_before_the_first_tick(
    schedule, clock
):
    """Made at 09:59:30, first ticked at 10:01:20 (the minutely backstop alone): the
    10:00 slot came after it was made and is within the grace, so it fires."""
    clock.move_to(at("2026-01-15 09:59:30"))
    trigger = schedule("0 10 * * *")

    tick(clock, at("2026-01-15 10:01:20"))

    assert accepted_keys(trigger) == ["slot:2026-01-15T10:00:00Z"]


@pytest.mark.django_db
def test_a_slot_fires_at_its_time_in_the_schedules_zone(schedule, clock):
    trigger = schedule("0 2 * * *", timezone="Europe/Paris")

    assert tick(clock, at("2026-01-16 00:59:50")) == []  # 01:59:50 in Paris
    fired = tick(clock, at("2026-01-16 01:00:10"))  # 02:00:10 in Paris (UTC+1)

    assert [f.firing.key for f in fired] == ["slot:2026-01-16T01:00:00Z"]
    assert fired[0].run.input == {
        "slot": "2026-01-16T01:00:00Z",
        "scheduled_for": "2026-01-16T02:00:00+01:00",
    }
    runs_end(trigger)
    summer = tick(clock, at("2026-07-01 00:00:10"))  # 02:00:10 in Paris (UTC+2)
    assert [f.firing.key for f in summer if f.accepted] == ["slot:2026-07-01T00:00:00Z"]


def ticks_through(clock, start: datetime, end: datetime, *, every: timedelta) -> None:
    when = start
    while when <= end:
        tick(clock, when)
        when += every


@pytest.mark.django_db
def test_a_fixed_time_in_the_hour_spring_skips_fires_when_the_clock_jumps(schedule, clock):
    """Paris, 29 March 2026: 02:00 becomes 03:00. A 02:30 schedule fires at 03:00."""
    clock.move_to(at("2026-03-28 23:00:00"))
    trigger = schedule("30 2 * * *", timezone="Europe/Paris", overlap="start")

    ticks_through(
        clock, at("2026-03-28 23:00:05"), at("2026-03-29 03:00:05"), every=timedelta(minutes=5)
    )

    assert accepted_keys(trigger) == ["slot:2026-03-29T01:00:00Z"]
    assert Run.objects.get().input["scheduled_for"] == "2026-03-29T03:00:00+02:00"


@pytest.mark.django_db
def test_a_fixed_time_in_the_hour_autumn_repeats_fires_once(schedule, clock):
    """Paris, 25 October 2026: 03:00 becomes 02:00 again. A 02:00 schedule fires on the
    first pass only (as cron does); a half-hourly one fires on both, being elapsed time."""
    clock.move_to(at("2026-10-24 22:00:00"))
    nightly = schedule("0 2 * * *", timezone="Europe/Paris", overlap="start")
    half_hourly = schedule("*/30 * * * *", timezone="Europe/Paris", overlap="start")

    ticks_through(
        clock, at("2026-10-24 22:00:05"), at("2026-10-25 02:40:05"), every=timedelta(minutes=5)
    )

    assert accepted_keys(nightly) == ["slot:2026-10-25T00:00:00Z"]  # 02:00 CEST
    assert accepted_keys(half_hourly)[-7:] == [
        "slot:2026-10-24T23:30:00Z",  # 01:30 CEST
        "slot:2026-10-25T00:00:00Z",  # 02:00 CEST
        "slot:2026-10-25T00:30:00Z",  # 02:30 CEST
        "slot:2026-10-25T01:00:00Z",  # 02:00 CET, the hour again
        "slot:2026-10-25T01:30:00Z",  # 02:30 CET
        "slot:2026-10-25T02:00:00Z",  # 03:00 CET
        "slot:2026-10-25T02:30:00Z",
    ]
    # The page shows the slots the tick fires.
    shown = cron_next(nightly, count=2, after=at("2026-10-24 12:00:00"))
    assert [slot.isoformat() for slot in shown] == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-26T02:00:00+01:00",
    ]


@pytest.mark.django_db
def test_an_expression_no_date_matches_shows_no_slots_and_fires_nothing(schedule, clock):
    trigger = schedule("0 0 30 2 *")  # 30 February
    assert cron_next(trigger) == []
    assert tick(clock, at("2026-03-01 00:00:10")) == []


# Input ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_input_mapping_reads_the_schedules_input_and_its_slot(schedule, clock):
    schedule(
        "0 10 * * *",
        input={"batch": "nightly", "limit": 50},
        input_mapping="{batch: batch, night: scheduled_for}",
    )
    tick(clock, at("2026-01-15 10:00:05"))
    assert Run.objects.get().input == {"batch": "nightly", "night": "2026-01-15T10:00:00+00:00"}


@pytest.mark.django_db
def test_a_task_whose_schema_has_no_room_for_the_slot_refuses_it_naming_the_fields(schedule, clock):
    strict = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"batch": {"type": "string"}},
    }
    trigger = schedule("0 10 * * *", input={"batch": "nightly"}, input_schema=strict)

    fired = tick(clock, at("2026-01-15 10:00:05"))

    assert not fired[0].accepted and fired[0].firing.refusal == Refusal.INPUT
    assert "'scheduled_for', 'slot' were unexpected" in fired[0].firing.reason
    Trigger.objects.filter(pk=trigger.pk).update(input_mapping="{batch: batch}")
    tick(clock, at("2026-01-16 10:00:05"))
    assert Run.objects.get().input == {"batch": "nightly"}


# Overlap -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_overlap_skip_refuses_a_slot_while_the_previous_run_is_live(schedule, clock):
    trigger = schedule("*/5 * * * *")  # overlap: skip, the default
    tick(clock, at("2026-01-15 10:00:10"))

    refused = tick(clock, at("2026-01-15 10:05:10"))
    runs_end(trigger)
    started = tick(clock, at("2026-01-15 10:10:10"))

    assert refused[0].firing.refusal == Refusal.OVERLAP and refused[0].run is None
    assert "is still queued" in refused[0].firing.reason
    assert started[0].accepted
    assert accepted_keys(trigger) == ["slot:2026-01-15T10:00:00Z", "slot:2026-01-15T10:10:00Z"]


@pytest.mark.django_db
def test_overlap_start_starts_a_slot_while_the_previous_run_is_live(schedule, clock):
    trigger = schedule("*/5 * * * *", overlap="start")
    tick(clock, at("2026-01-15 10:00:10"))
    tick(clock, at("2026-01-15 10:05:10"))
    assert Run.objects.filter(trigger=trigger, status=RunStatus.QUEUED).count() == 2


# Missed slots ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_missed_slots_under_skip_are_one_refused_firing_and_no_run(schedule, clock):
    trigger = schedule("*/5 * * * *")
    tick(clock, at("2026-01-15 09:59:00"))

    # Nothing ticked from 09:59 until 12:58:30: the grace reaches back to 12:55:30.
    fired = tick(clock, at("2026-01-15 12:58:30"))

    assert len(fired) == 1 and Run.objects.count() == 0
    firing = fired[0].firing
    assert (firing.accepted, firing.refusal) == (False, Refusal.MISSED)
    assert firing.key == "missed:2026-01-15T10:00:00Z..2026-01-15T12:55:00Z"
    assert firing.reason == (
        "36 slots missed while nothing ran, from 2026-01-15 10:00 UTC to 2026-01-15 12:55 "
        "UTC (UTC); the schedule skips missed slots"
    )
    assert firing.payload["missed"] == 36 and firing.payload["all_counted"]
    # The schedule goes on from there.
    assert [f.firing.key for f in tick(clock, at("2026-01-15 13:00:10"))] == [
        "slot:2026-01-15T13:00:00Z"
    ]
    assert accepted_keys(trigger) == ["slot:2026-01-15T13:00:00Z"]


@pytest.mark.django_db
def test_missed_slots_under_once_start_one_run_for_the_latest(schedule, clock):
    trigger = schedule("0 * * * *", timezone="Europe/Paris", missed="once")
    tick(clock, at("2026-01-15 09:59:00"))

    fired = tick(clock, at("2026-01-15 14:20:00"))

    assert accepted_keys(trigger) == ["slot:2026-01-15T14:00:00Z"]
    assert Run.objects.get().input["scheduled_for"] == "2026-01-15T15:00:00+01:00"
    earlier = trigger.firings.get(accepted=False)
    assert earlier.refusal == Refusal.MISSED
    assert earlier.key == "missed:2026-01-15T10:00:00Z..2026-01-15T13:00:00Z"
    assert earlier.reason == (
        "4 slots missed while nothing ran, from 2026-01-15 11:00 CET to 2026-01-15 14:00 "
        "CET (Europe/Paris); the schedule runs once for missed slots: the latest, "
        "2026-01-15 15:00 CET"
    )
    assert [f.accepted for f in fired] == [False, True]


@pytest.mark.django_db
def test_one_missed_slot_under_once_is_one_run_and_no_refusal(schedule, clock):
    trigger = schedule("0 10 * * *", missed="once")
    tick(clock, at("2026-01-15 09:59:00"))
    tick(clock, at("2026-01-15 11:00:00"))
    assert accepted_keys(trigger) == ["slot:2026-01-15T10:00:00Z"]
    assert trigger.firings.count() == 1


@pytest.mark.django_db
def test_a_minutely_schedule_down_for_a_year_costs_one_bounded_tick(schedule, clock):
    trigger = schedule("* * * * *")
    Trigger.objects.filter(pk=trigger.pk).update(cursor=at("2025-01-15 10:00:00"))

    began = time.monotonic()
    fired = tick(clock, at("2026-01-15 10:00:30"))
    took = time.monotonic() - began

    firing = fired[0].firing
    assert firing.key == "missed:2025-01-15T10:01:00Z..2026-01-15T09:57:00Z"
    assert firing.reason.startswith(f"more than {cron.MISSED_COUNT_LIMIT:,} slots missed")
    assert not firing.payload["all_counted"]
    assert [f.firing.key for f in fired[1:]] == [  # within the grace: due
        "slot:2026-01-15T09:58:00Z",
        "slot:2026-01-15T09:59:00Z",
        "slot:2026-01-15T10:00:00Z",
    ]
    assert took < 5, f"the tick took {took:.1f} s"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("gap_slots", "said", "all_counted"),
    [(5, "5 slots missed", True), (6, "more than 5 slots missed", False)],
)
def test_past_the_count_limit_the_gap_is_said_to_be_more(
    schedule, clock, monkeypatch, gap_slots, said, all_counted
):
    monkeypatch.setattr(cron, "MISSED_COUNT_LIMIT", 5)
    trigger = schedule("0 * * * *")
    Trigger.objects.filter(pk=trigger.pk).update(cursor=at("2026-01-15 00:00:00"))

    fired = tick(clock, at(f"2026-01-15 {gap_slots:02}:30:00"))

    assert fired[0].firing.key == f"missed:2026-01-15T01:00:00Z..2026-01-15T{gap_slots:02}:00:00Z"
    assert fired[0].firing.reason.startswith(said)
    assert fired[0].firing.payload["all_counted"] is all_counted


# Disabled and broken schedules -----------------------------------------------------------


@pytest.mark.django_db
def test_a_disabled_schedule_fires_nothing_and_its_gap_is_missed_when_enabled(schedule, clock):
    trigger = schedule("*/5 * * * *")
    tick(clock, at("2026-01-15 10:00:10"))
    runs_end(trigger)
    Trigger.objects.filter(pk=trigger.pk).update(enabled=False)

    assert tick(clock, at("2026-01-15 11:00:10")) == []
    trigger.refresh_from_db()
    assert trigger.cursor == at("2026-01-15 10:00:00")  # left where it was

    Trigger.objects.filter(pk=trigger.pk).update(enabled=True)
    fired = tick(clock, at("2026-01-15 11:30:10"))

    assert [(f.firing.key, f.accepted) for f in fired] == [
        ("missed:2026-01-15T10:05:00Z..2026-01-15T11:25:00Z", False),
        ("slot:2026-01-15T11:30:00Z", True),
    ]


@pytest.mark.django_db
def test_a_bad_stored_config_is_skipped_with_a_log_line_and_the_others_fire(
    schedule, clock, caplog
):
    caplog.set_level(logging.WARNING, logger="agentops.triggers.cron")
    good = schedule("0 10 * * *")
    broken = {
        "every day": {"expression": "every day"},
        "Mars/Base": {"expression": "0 10 * * *", "timezone": "Mars/Base"},
        "config: ['not', 'an', 'object'] is not of type 'object'": ["not", "an", "object"],
    }
    bad = []
    for config in broken.values():
        trigger = schedule("0 10 * * *")
        Trigger.objects.filter(pk=trigger.pk).update(config=config)  # around the admin
        bad.append(trigger)
    tick(clock, at("2026-01-15 09:59:00"))

    fired = tick(clock, at("2026-01-15 10:00:10"))

    assert [f.firing.trigger_id for f in fired] == [good.pk]
    assert fired[0].accepted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for trigger, said in zip(bad, broken, strict=True):
        assert any(f"(trigger {trigger.pk}) skipped" in w and said in w for w in warnings), said
        trigger.refresh_from_db()
        assert trigger.cursor is None and not trigger.firings.exists()


@pytest.mark.django_db
def test_a_schedule_whose_firing_fails_keeps_its_cursor_and_the_others_fire(
    schedule, clock, caplog, monkeypatch
):
    failing = schedule("0 10 * * *")
    other = schedule("0 10 * * *")
    tick(clock, at("2026-01-15 09:59:00"))
    failing.refresh_from_db()
    before = failing.cursor

    def fire_or_fail(**kwargs):
        if kwargs["trigger_id"] == failing.pk:
            raise RuntimeError("a bug met in one schedule")
        return real_fire(**kwargs)

    real_fire = cron.trigger_fire
    monkeypatch.setattr(cron, "trigger_fire", fire_or_fail)

    fired = tick(clock, at("2026-01-15 10:00:10"))

    assert [f.firing.trigger_id for f in fired] == [other.pk]
    failing.refresh_from_db()
    assert failing.cursor == before  # the claim rolled back: the next tick tries again
    assert "the tick failed" in caplog.text and "a bug met in one schedule" in caplog.text
    monkeypatch.setattr(cron, "trigger_fire", real_fire)
    assert accepted_keys(failing) == []
    tick(clock, at("2026-01-15 10:00:20"))
    assert accepted_keys(failing) == ["slot:2026-01-15T10:00:00Z"]


# Two schedulers ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_scheduler_that_read_the_cursor_before_another_moved_it_fires_nothing(schedule, clock):
    trigger = schedule("*/5 * * * *")
    tick(clock, at("2026-01-15 09:59:00"))
    stale = Trigger.objects.get(pk=trigger.pk)  # read by a slower scheduler

    clock.move_to(at("2026-01-15 10:00:10"))
    assert len(cron_tick()) == 1  # the faster one fires the slot
    assert cron_trigger_tick(stale, now=at("2026-01-15 10:00:10"), grace=tick_grace()) == []

    assert Firing.objects.count() == 1 and Run.objects.count() == 1


@pytest.mark.django_db
def test_even_a_slot_fired_twice_starts_one_run(schedule, clock):
    """The claim keeps a second scheduler out; the unique key holds without it."""
    trigger = schedule("*/5 * * * *")
    config = {**trigger.config, "input": {}, "overlap": "start"}
    slot = at("2026-01-15 10:00:00")
    first = slot_fire(trigger, config, slot, now=slot)
    second = slot_fire(trigger, config, slot, now=slot)
    assert second.duplicate and second.run == first.run and Run.objects.count() == 1


def race(target, count: int) -> list:
    """``target(index)`` in ``count`` threads, each with its own connection, released
    together."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = target(index)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    return results


@pytest.mark.django_db(transaction=True)
def test_schedulers_ticking_at_once_fire_each_slot_once(make_trigger):
    """Three schedulers (threads with connections of their own) tick at the same
    instant, minute after minute; then all three meet a gap at once."""
    with time_machine.travel(START, tick=False):
        trigger = make_trigger(
            Trigger.Kind.CRON, config={"expression": "* * * * *", "overlap": "start"}
        )
    cron_tick(now=START + timedelta(seconds=5))  # the cursor: 09:58:05
    slots = 8
    for minute in range(slots):
        now = START + timedelta(minutes=1 + minute, seconds=5)
        results = race(lambda index, now=now: cron_tick(now=now), 3)
        fired = [f for result in results for f in result]
        assert len(fired) == 1, f"{connection.vendor}: {fired}"
    assert Firing.objects.filter(accepted=True).count() == slots
    assert Run.objects.count() == slots
    assert len(set(accepted_keys(trigger))) == slots

    results = race(lambda index: cron_tick(now=START + timedelta(hours=3, seconds=30)), 3)

    assert sorted(len(result) for result in results) == [0, 0, 4]  # the gap and 3 due
    assert Firing.objects.filter(refusal=Refusal.MISSED).count() == 1
    assert Run.objects.count() == slots + 3


# Where the tick runs ---------------------------------------------------------------------


@pytest.mark.django_db
def test_migrate_schedules_the_tick_every_minute_on_django_q2():
    tick_schedule = Schedule.objects.get(name=CRON_TICK_SCHEDULE_NAME)
    assert tick_schedule.func == "triggers.cron.cron_tick_job"
    assert (tick_schedule.schedule_type, tick_schedule.minutes, tick_schedule.repeats) == (
        "I",
        1,
        -1,
    )


def test_the_tick_is_on_celery_beats_schedule_every_minute():
    entries = [e for e in app.conf.beat_schedule.values() if e["task"] == "agentops.cron_tick"]
    assert [entry["schedule"] for entry in entries] == [60]
    assert "agentops.cron_tick" in app.tasks


@pytest.mark.django_db
def test_the_tick_jobs_return_how_many_firings_they_recorded(schedule, clock):
    schedule("0 10 * * *")
    schedule("0 10 * * *")
    clock.move_to(at("2026-01-15 09:59:00"))
    assert cron_tick_job() == 0
    clock.move_to(at("2026-01-15 10:00:10"))
    assert cron_tick_task() == 2  # called directly, it runs here, as beat's worker runs it
    assert cron_tick_job() == 0
