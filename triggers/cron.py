"""Schedules: a cron trigger's slots in its time zone, and the tick that fires them.

A slot is an instant; its firing key is ``slot:<its UTC time>``, so a slot is one key
however many schedulers see it. ``cron_tick`` runs from three places at once by design
(the listeners' process every ``AGENTOPS_TRIGGER_TICK_SECONDS``, and django-q2's
schedule or Celery beat every minute): each trigger's ``cursor`` (the last slot
considered) is moved by a conditional UPDATE that only one of them wins, and the unique
key on accepted firings holds even if two ever fired the same slot.

Daylight-saving days follow cron's own convention (Vixie cron's): a fixed-time slot in
the hour a spring change skips fires when the clock jumps (02:30 fires at 03:00, as
croniter gives it); a fixed-time slot in the hour an autumn change repeats fires once,
on the first pass. A schedule whose minute or hour field is a wildcard (``*/15 * * *
*``, ``0 * * * *``) follows elapsed time: its slots in the skipped hour do not exist,
and those in the repeated hour fire on both passes (they are different instants).
"""

from __future__ import annotations

import logging
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from croniter import CroniterBadDateError, croniter
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from tasks.models import Trigger
from triggers.config import config_errors, config_of
from triggers.models import Firing
from triggers.services import Fired, trigger_fire

logger = logging.getLogger("agentops.triggers.cron")

# The name of the django-q2 schedule that ticks the schedules (triggers/migrations).
CRON_TICK_SCHEDULE_NAME = "agentops: tick the schedules"

# A slot is due, and fires, while it is at most this late (or twice the listeners'
# tick, if longer); older, it was missed while nothing ran, and the missed policy
# decides. Not 60 s: when only the minutely backstop ticks (django-q2's scheduler
# looks at its schedules every ~30 s), a slot is seen up to ~90 s late with nothing
# wrong; three minutes holds that with room for a busy queue.
GRACE_FLOOR = timedelta(minutes=3)
# The most missed slots a tick counts one by one (about a quarter of a second of
# croniter). Past it the gap's last slot is found backwards from its end and the
# refusal says "more than": a minutely schedule down for a year costs one bounded
# tick, not half a million steps.
MISSED_COUNT_LIMIT = 10_000
# The most due slots one tick fires for one trigger (the rest wait for the next tick,
# the cursor stopping at the last one fired). A valid five-field expression has at most
# one slot a minute, so only a very long tick interval comes near it.
DUE_LIMIT = 100


# Slots -------------------------------------------------------------------------------


def slots_after(expression: str, zone: zoneinfo.ZoneInfo, after: datetime) -> Iterator[datetime]:
    """The slots of ``expression`` strictly after ``after``, oldest first, as aware
    times in ``zone``; none at all for an expression no date matches (``0 0 30 2 *``)."""
    fixed = fixed_times(expression)
    slots = croniter(expression, after.astimezone(zone))
    while True:
        try:
            slot = slots.get_next(datetime)
        except CroniterBadDateError:
            return
        if fixed and repeated(slot):
            continue
        yield slot


def slot_before(expression: str, zone: zoneinfo.ZoneInfo, before: datetime) -> datetime | None:
    """The latest slot strictly before ``before`` (the same slots ``slots_after`` gives)."""
    fixed = fixed_times(expression)
    slots = croniter(expression, before.astimezone(zone))
    while True:
        try:
            slot = slots.get_prev(datetime)
        except CroniterBadDateError:
            return None
        if not (fixed and repeated(slot)):
            return slot


def fixed_times(expression: str) -> bool:
    """A fixed-time schedule (neither minute nor hour a wildcard) names wall-clock
    times: it fires once in a repeated hour. Others follow elapsed time."""
    minute, hour = [*expression.split(), "*", "*"][:2]
    return not (minute.startswith("*") or hour.startswith("*"))


def repeated(slot: datetime) -> bool:
    """``slot`` is the second pass of a wall-clock time an autumn change repeats."""
    return slot.fold == 1 and slot.utcoffset() != slot.replace(fold=0).utcoffset()


def cron_next(trigger: Trigger, *, count: int = 5, after: datetime | None = None) -> list[datetime]:
    """The next ``count`` slots of a cron trigger after ``after`` (now), as aware times
    in the trigger's time zone: the slots ``cron_tick`` fires, daylight-saving days
    included (see the module's docstring). Fewer, or none, for an expression that
    matches no date."""
    config = config_of(trigger)
    zone = zoneinfo.ZoneInfo(config["timezone"])
    return list(islice(slots_after(config["expression"], zone, after or timezone.now()), count))


def slot_text(slot: datetime) -> str:
    """A slot's name in keys and payloads: its UTC time, to the second."""
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SlotPlan:
    """What a tick found between a trigger's cursor and now. ``missed``: how many slots
    were too late to fire (more than that when ``missed_all_counted`` is false), the
    first and last named; ``due``: the slots to fire, oldest first."""

    due: tuple[datetime, ...] = ()
    missed: int = 0
    missed_first: datetime | None = None
    missed_last: datetime | None = None
    missed_all_counted: bool = True

    @property
    def last(self) -> datetime | None:
        """The last slot considered: where the cursor moves to."""
        return self.due[-1] if self.due else self.missed_last


def slots_plan(
    expression: str,
    zone: zoneinfo.ZoneInfo,
    *,
    since: datetime,
    now: datetime,
    grace: timedelta,
) -> SlotPlan:
    """The slots in (``since``, ``now``]: those at least ``now - grace`` are due, older
    ones missed. Bounded: at most ``MISSED_COUNT_LIMIT`` steps counting the missed and
    ``DUE_LIMIT`` due, however long the gap."""
    boundary = now - grace
    missed, first, last, all_counted = 0, None, None, True
    if since < boundary:
        for slot in slots_after(expression, zone, since):
            if slot >= boundary:
                break
            missed += 1
            first = first or slot
            last = slot
            if missed >= MISSED_COUNT_LIMIT:
                # Stop counting; the gap's last slot is the one before its end.
                last = slot_before(expression, zone, boundary) or slot
                all_counted = last == slot
                break
    due = []
    for slot in slots_after(expression, zone, last or since):
        if slot > now or len(due) >= DUE_LIMIT:
            break
        due.append(slot)
    return SlotPlan(
        due=tuple(due),
        missed=missed,
        missed_first=first,
        missed_last=last,
        missed_all_counted=all_counted,
    )


# The tick ----------------------------------------------------------------------------


def tick_grace() -> timedelta:
    return max(timedelta(seconds=2 * settings.AGENTOPS_TRIGGER_TICK_SECONDS), GRACE_FLOOR)


def cron_tick(*, now: datetime | None = None) -> list[Fired]:
    """Fire every enabled schedule's slots up to ``now``, each at most once however
    many schedulers tick at the same time; return what came of each firing.

    A trigger whose stored config fails the checks (written around the admin) is
    skipped with a warning (every tick, until it is fixed), its cursor left where it
    was: once fixed, the time it spent broken is a gap its missed policy decides. One
    trigger's failure is logged and does not stop the others' ticks."""
    now = now or timezone.now()
    grace = tick_grace()
    fired: list[Fired] = []
    schedules = (
        Trigger.objects.filter(kind=Trigger.Kind.CRON, enabled=True)
        .select_related("task")
        .order_by("pk")
    )
    for trigger in schedules:
        errors = config_errors(
            kind=trigger.kind, config=trigger.config, input_mapping=trigger.input_mapping
        )
        if errors:
            logger.warning(
                "schedule %s (trigger %s) skipped: its config is refused: %s",
                trigger,
                trigger.pk,
                "; ".join(errors),
            )
            continue
        try:
            fired += cron_trigger_tick(trigger, now=now, grace=grace)
        except (OperationalError, InterfaceError):
            raise  # the database is out of reach: no other trigger would do better
        except Exception:
            # Broad on purpose: whatever one schedule meets, the others still fire.
            # Its claim rolled back with its firings, so the next tick tries again.
            logger.exception("schedule %s (trigger %s): the tick failed", trigger, trigger.pk)
    return fired


def cron_trigger_tick(trigger: Trigger, *, now: datetime, grace: timedelta) -> list[Fired]:
    """Fire one schedule's slots after its cursor, as ``trigger`` was read.

    A trigger never ticked (no cursor) starts from when it was created or ``grace``
    ago, whichever is later: nothing before is due, nothing is missed. A trigger ticked
    before counts from its cursor, so the time it was disabled is a gap like any other
    and its missed policy applies when it is enabled again."""
    config = config_of(trigger)
    zone = zoneinfo.ZoneInfo(config["timezone"])
    since = trigger.cursor or max(trigger.created_at, now - grace)
    plan = slots_plan(config["expression"], zone, since=since, now=now, grace=grace)
    if plan.last is None and trigger.cursor is not None:
        return []  # nothing new: no write
    with transaction.atomic():
        # The claim: a conditional UPDATE that checks one row changed. Of schedulers
        # that read the same cursor, the first UPDATE wins; another's matches no row
        # (PostgreSQL re-reads the row once the winner commits; SQLite's IMMEDIATE
        # transactions take turns) and it fires nothing. A failure below rolls the claim
        # back with the firings, so the next tick finds the same slots.
        claimed = Trigger.objects.filter(
            pk=trigger.pk, kind=Trigger.Kind.CRON, enabled=True, cursor=trigger.cursor
        ).update(cursor=plan.last or max(since, now))
        if claimed != 1:
            return []
        fired = slots_fire(trigger, config, zone, plan, now=now)
    for outcome in fired:
        firing = outcome.firing
        logger.info(
            "schedule %s (trigger %s): %s %s%s",
            trigger,
            trigger.pk,
            firing.key,
            f"started run {firing.run_id}" if firing.accepted else "refused",
            "" if firing.accepted else f" ({firing.refusal}: {firing.reason})",
        )
    return fired


def slots_fire(
    trigger: Trigger,
    config: dict[str, Any],
    zone: zoneinfo.ZoneInfo,
    plan: SlotPlan,
    *,
    now: datetime,
) -> list[Fired]:
    """Inside the claim: the gap by the missed policy, then the due slots."""
    fired = []
    if plan.missed and config["missed"] == "once":
        latest = plan.missed_last
        earlier = slot_before(config["expression"], zone, latest)
        if plan.missed > 1 and earlier is not None:
            fired.append(
                missed_record(
                    trigger,
                    zone,
                    plan.missed - 1,
                    plan.missed_first,
                    earlier,
                    all_counted=plan.missed_all_counted,
                    instead=latest,
                    now=now,
                )
            )
        fired.append(slot_fire(trigger, config, latest, now=now))
    elif plan.missed:
        fired.append(
            missed_record(
                trigger,
                zone,
                plan.missed,
                plan.missed_first,
                plan.missed_last,
                all_counted=plan.missed_all_counted,
                now=now,
            )
        )
    for slot in plan.due:
        fired.append(slot_fire(trigger, config, slot, now=now))
    return fired


def slot_payload(config: dict[str, Any], slot: datetime) -> dict[str, Any]:
    """What a slot brings: the schedule's ``input`` with the slot added, its UTC time
    (``slot``) and its time in the schedule's zone (``scheduled_for``). With no input
    mapping this is the run's input; a mapping reads it like any payload. The slot's two
    fields win over the same names in ``input``: a firing tells the truth about its slot."""
    given = config.get("input") or {}  # callers may pass the stored config, defaults unfilled
    return {**given, "slot": slot_text(slot), "scheduled_for": slot.isoformat()}


def slot_fire(trigger: Trigger, config: dict[str, Any], slot: datetime, *, now: datetime) -> Fired:
    return trigger_fire(
        trigger_id=trigger.pk,
        key=f"slot:{slot_text(slot)}",
        payload=slot_payload(config, slot),
        overlap=config["overlap"],
        now=now,
    )


def missed_record(
    trigger: Trigger,
    zone: zoneinfo.ZoneInfo,
    count: int,
    first: datetime,
    last: datetime,
    *,
    all_counted: bool,
    instead: datetime | None = None,
    now: datetime,
) -> Fired:
    """One refused firing for a whole gap of missed slots (not one per slot): ``count``
    of them (more, when not ``all_counted``) from ``first`` to ``last``."""
    many = f"{count:,}" if all_counted else f"more than {count:,}"
    slots = "slot" if count == 1 and all_counted else "slots"
    span = (
        f"at {local_text(first)}"
        if first == last
        else f"from {local_text(first)} to {local_text(last)}"
    )
    reason = f"{many} {slots} missed while nothing ran, {span} ({zone.key}); "
    if instead is None:
        reason += "the schedule skips missed slots"
    else:
        reason += f"the schedule runs once for missed slots: the latest, {local_text(instead)}"
    firing = Firing.objects.create(
        trigger=trigger,
        key=f"missed:{slot_text(first)}..{slot_text(last)}",
        accepted=False,
        refusal=Firing.Refusal.MISSED,
        reason=reason,
        payload={
            "missed": count,
            "all_counted": all_counted,
            "first": slot_text(first),
            "last": slot_text(last),
            "first_scheduled_for": first.isoformat(),
            "last_scheduled_for": last.isoformat(),
        },
        received_at=now,
    )
    return Fired(firing)


def local_text(slot: datetime) -> str:
    return f"{slot:%Y-%m-%d %H:%M %Z}"


def cron_tick_job() -> int:
    """The periodic job (a django-q2 schedule, or Celery beat): tick the schedules.
    Returns how many firings it recorded."""
    return len(cron_tick())
