"""Schedules: a cron trigger's slots, in its time zone."""

from __future__ import annotations

import zoneinfo
from datetime import datetime

from croniter import croniter
from django.utils import timezone

from tasks.models import Trigger
from triggers.config import config_of


def cron_next(trigger: Trigger, *, count: int = 5, after: datetime | None = None) -> list[datetime]:
    """The next ``count`` slots of a cron trigger after ``after`` (now), as aware times
    in the trigger's time zone. Daylight-saving changes follow croniter: a slot in the
    hour a spring change skips does not happen; one in the hour an autumn change
    repeats happens once."""
    config = config_of(trigger)
    zone = zoneinfo.ZoneInfo(config["timezone"])
    start = (after or timezone.now()).astimezone(zone)
    slots = croniter(config["expression"], start)
    return [slots.get_next(datetime) for _ in range(count)]
