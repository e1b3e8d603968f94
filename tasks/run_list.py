"""The runs list's filters: read from the URL's query, each one it cannot take left off
with a sentence saying why, and written back into links (the page's rows, its pages).

The filters live in the URL (GET) so a filtered list can be linked, bookmarked and
refreshed with the same filters; the overview's figures link to them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from urllib.parse import urlencode

from django.utils import timezone

from agentops.bad_input import BadInput, id_parse, shown, text_refusal
from tasks.models import RunStatus, Task, Trigger

# How a run started, for the filter: its trigger's kind, or a person.
RUN_STARTS = [
    (Trigger.Kind.MANUAL, "by a person"),
    (Trigger.Kind.CRON, "by a schedule"),
    (Trigger.Kind.WEBHOOK, "by a webhook"),
    (Trigger.Kind.QUEUE, "by a queue message"),
    (Trigger.Kind.EMAIL, "by an email"),
]
# The longest text searched for in the runs' input: a phrase, not a document.
TEXT_MAX = 200
MODEL_MAX = 200


@dataclass
class RunFilters:
    status: str = ""
    started: str = ""
    trigger: Trigger | None = None
    task: Task | None = None
    model: str = ""
    since: datetime.date | None = None
    until: datetime.date | None = None
    text: str = ""
    refusals: list[str] = field(default_factory=list)

    def any(self) -> bool:
        return bool(
            self.status
            or self.started
            or self.trigger
            or self.task
            or self.model
            or self.since
            or self.until
            or self.text
        )

    def query(self, **changes: str) -> str:
        """The filters as a query string (without the page), with ``changes`` applied."""
        values = {
            "status": self.status,
            "started": self.started,
            "trigger": str(self.trigger.pk) if self.trigger else "",
            "task": self.task.slug if self.task else "",
            "model": self.model,
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
            "q": self.text,
        }
        values.update(changes)
        return urlencode({name: value for name, value in values.items() if value})

    def query_without_trigger(self) -> str:
        return self.query(trigger="")

    def created_range(self) -> tuple[datetime.datetime | None, datetime.datetime | None]:
        """The creation times the dates cover: from the start of ``since`` to the end
        of ``until``, as days in the server's time zone."""
        zone = timezone.get_current_timezone()

        def midnight(day: datetime.date) -> datetime.datetime:
            return datetime.datetime.combine(day, datetime.time.min, tzinfo=zone)

        start = midnight(self.since) if self.since else None
        end = midnight(self.until + datetime.timedelta(days=1)) if self.until else None
        return start, end


def _date(raw: str, *, name: str, refusals: list[str]) -> datetime.date | None:
    if not raw:
        return None
    try:
        day = datetime.date.fromisoformat(raw)
    except ValueError:
        refusals.append(f"{name}: {shown(raw)} is not a date (YYYY-MM-DD)")
        return None
    if day.year < 2000 or day.year > 9998:
        refusals.append(f"{name}: {day.isoformat()} is out of range (years 2000 to 9998)")
        return None
    return day


def filters_from(query) -> RunFilters:
    """The runs list's filters from a request's GET ``query``."""
    found = RunFilters()
    refusals = found.refusals
    status = query.get("status", "")
    if status and status not in RunStatus.values:
        refusals.append(f"No run status is called {shown(status)} ({', '.join(RunStatus.values)})")
    else:
        found.status = status
    started = query.get("started", "")
    if started and started not in Trigger.Kind.values:
        refusals.append(f"No run starts {shown(started)} ({', '.join(Trigger.Kind.values)})")
    else:
        found.started = started
    if raw := query.get("trigger", ""):
        try:
            trigger_id = id_parse(raw, field="trigger", what="a trigger's id")
            found.trigger = (
                Trigger.objects.select_related("task")
                .only("pk", "name", "kind", "task__name")
                .get(pk=trigger_id)
            )
        except BadInput as error:
            refusals.append(f"No such trigger: {error}")
        except Trigger.DoesNotExist:
            refusals.append(f"No trigger has the id {raw}")
    if slug := query.get("task", ""):
        refusal = text_refusal(slug, field="task")
        if refusal or len(slug) > 200:
            refusals.append(refusal or "task: longer than any task's slug")
        else:
            found.task = Task.objects.only("pk", "slug", "name").filter(slug=slug).first()
            if found.task is None:
                refusals.append(f"No task is called {shown(slug)}")
    if model := query.get("model", ""):
        refusal = text_refusal(model, field="model") or (
            f"model: longer than {MODEL_MAX} characters" if len(model) > MODEL_MAX else ""
        )
        if refusal:
            refusals.append(refusal)
        else:
            found.model = model
    found.since = _date(query.get("since", ""), name="since", refusals=refusals)
    found.until = _date(query.get("until", ""), name="until", refusals=refusals)
    if found.since and found.until and found.since > found.until:
        refusals.append(
            f"since ({found.since}) is after until ({found.until}): no day is in between"
        )
        found.since = found.until = None
    text = query.get("q", "").strip()
    if text:
        refusal = text_refusal(text, field="q") or (
            f"q: longer than {TEXT_MAX} characters ({len(text):,})" if len(text) > TEXT_MAX else ""
        )
        if refusal:
            refusals.append(refusal)
        else:
            found.text = text
    return found
