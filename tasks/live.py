"""The run page, live: what changed since the page last looked, as fragments to swap.

The run's trail is the feed. Every step the engine records, every approval decided and
every change of the run's status appends an event to the run's trail, so the trail's
head (its last ``seq``) moves exactly when there is something new to show; while it
stands still, a look costs one indexed query.

What the page holds is written in a *cursor*, a short string the page carries (the SSE
event id, which the browser sends back as ``Last-Event-ID`` when it reconnects; or the
polling fallback's ``cursor`` parameter): the trail's head it has seen, the last step it
shows, whether it shows the run as live, the pending approvals it offers to decide, and
a digest of each step it shows that may still change (a call proposed or in flight, or
one with an approval waiting). From it, ``run_changes`` sends only:

- steps the page does not have yet, appended to the timeline;
- steps it has whose digest changed, each replaced on its own;
- the summary (status, counters, notices, plan, outcome, the call in flight), which
  holds nothing an operator types or opens;
- the cancel form and the incident form, only when the run goes from live to finished;
- the decide-in-place panel, only when the set of pending approvals changed.

So a reason typed in the cancel box, a result opened in a step, or a decision half
written stays as it is while the run moves on. The function keeps no state between
calls: any process serves any reconnect.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.db.models import Max
from django.template.loader import render_to_string
from django.utils import timezone

from approvals.models import ApprovalStatus
from lineage.models import LineageEvent
from tasks import selectors
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus

# Step statuses after which a step no longer changes (unless an approval on it waits).
STEP_SETTLED = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.REFUSED, StepStatus.SIMULATED}
)
# A cursor names at most this many open steps; a page with more (it cannot happen with
# the engine's one call at a time, but a hostile cursor may try) re-sends the rest.
OPEN_STEPS_TRACKED = 20
# The pending approvals a cursor names (the run page offers the first of them).
WAITING_TRACKED = 20
CURSOR_PATTERN = re.compile(
    r"^(?P<seq>\d{1,12})\.(?P<last>\d{1,9})\.(?P<live>[01])"
    r"\.(?P<waiting>(\d{1,12}(-\d{1,12}){0,19})?)"
    r"\.(?P<open>(\d{1,9}:[0-9a-f]{8}(-\d{1,9}:[0-9a-f]{8}){0,19})?)",
    re.ASCII,
)


class CursorInvalid(ValueError):
    """A cursor this module did not write."""


@dataclass(frozen=True)
class Cursor:
    seq: int  # the run's trail head the page has seen (0: none)
    last_step: int  # the highest step number the page shows (0: none)
    live: bool  # whether the page shows the run as live (its cancel form)
    waiting: tuple[int, ...] = ()  # the pending approvals' ids the page offers to decide
    open_steps: dict[int, str] = field(default_factory=dict)  # number -> digest

    def text(self) -> str:
        waiting = "-".join(str(pk) for pk in self.waiting)
        opened = "-".join(
            f"{number}:{digest}" for number, digest in sorted(self.open_steps.items())
        )
        return f"{self.seq}.{self.last_step}.{int(self.live)}.{waiting}.{opened}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        found = CURSOR_PATTERN.fullmatch(text or "")
        if found is None:
            raise CursorInvalid("not a cursor of the run page")
        waiting = found["waiting"]
        opened = found["open"]
        return cls(
            seq=int(found["seq"]),
            last_step=int(found["last"]),
            live=found["live"] == "1",
            waiting=tuple(int(pk) for pk in waiting.split("-")) if waiting else (),
            open_steps=dict(
                (int(number), digest)
                for number, digest in (item.split(":") for item in opened.split("-"))
            )
            if opened
            else {},
        )


def step_digest(step: Step) -> str:
    """What of a step the page shows that can still change, hashed short."""
    approvals = ",".join(
        f"{approval.pk}:{approval.status}:{approval.edited_arguments is not None}"
        for approval in step.approvals.all()
    )
    finished = step.finished_at.isoformat() if step.finished_at else ""
    text = f"{step.status}|{finished}|{step.duration_ms}|{step.gate}|{approvals}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def step_is_open(step: Step, *, run_live: bool) -> bool:
    """Whether the step may still change: an approval on it waits, or, while the run is
    live, it is not settled. A finished run's step left ``proposed``, ``started`` or
    ``unknown`` changes no more."""
    if any(approval.status == ApprovalStatus.PENDING for approval in step.approvals.all()):
        return True
    return run_live and step.status not in STEP_SETTLED


def trail_head(run_id) -> int:
    """The run's last trail event's ``seq`` (0 for none): one index lookup."""
    head = LineageEvent.objects.filter(run_uuid=run_id).aggregate(head=Max("seq"))["head"]
    return head or 0


def following(run: Run, waiting: tuple[int, ...]) -> bool:
    """Whether the page has more to come: the run is live, or an approval on it waits."""
    return run.is_live or bool(waiting)


def run_waiting_ids(run: Run) -> tuple[int, ...]:
    return tuple(
        sorted(run.approvals.filter(status=ApprovalStatus.PENDING).values_list("pk", flat=True))
    )


def run_deciding(run: Run, *, user, waiting: tuple[int, ...]) -> dict:
    """The run's pending approvals this person may decide on the run page, each as the
    inbox's card (approvals/_approval.html), and the groups it may be handed to."""
    if not waiting or user is None:
        return {"deciding": [], "groups": []}
    from approvals.selectors import approvals_pending_on_run
    from approvals.services import groups_deciding

    return {
        "deciding": list(approvals_pending_on_run(user, run.pk)),
        "groups": groups_deciding(),
    }


@dataclass(frozen=True)
class InFlight:
    """What the run's worker is doing now, as far as the record shows."""

    what: str  # "model" (a turn asked of the model) or "tool"
    label: str
    since: datetime


def in_flight(run: Run, steps: list[Step]) -> InFlight | None:
    """The call in flight: a tool step committed ``started`` and not settled, or else,
    while the run is running, the model turn asked after its last recorded step."""
    if run.status != RunStatus.RUNNING:
        return None
    for step in reversed(steps):
        if step.kind == StepKind.TOOL and step.status == StepStatus.STARTED:
            return InFlight("tool", step.tool_name, step.created_at)
    marks = [run.started_at, run.queued_at]
    if steps:
        last = steps[-1]
        marks.append(last.finished_at or last.created_at)
    since = max((mark for mark in marks if mark is not None), default=run.created_at)
    if run.waiting_on:
        return InFlight("capacity", run.waiting_on, since)
    return InFlight("model", run.model_label, since)


def page_cursor(run: Run, steps: list[Step], *, seq: int, waiting: tuple[int, ...]) -> Cursor:
    opened = {
        step.number: step_digest(step) for step in steps if step_is_open(step, run_live=run.is_live)
    }
    return Cursor(
        seq=seq,
        last_step=steps[-1].number if steps else 0,
        live=run.is_live,
        waiting=waiting[:WAITING_TRACKED],
        open_steps=dict(sorted(opened.items())[-OPEN_STEPS_TRACKED:]),
    )


@dataclass
class Changes:
    html: str  # fragments, each swapped out of band; "" when nothing changed
    cursor: Cursor
    finished: bool  # the run is finished and the page shows all of it: no more to come


def run_changes(run_id, cursor: Cursor, *, request=None) -> Changes:
    """What the page at ``cursor`` lacks, as out-of-band fragments, and the new cursor.

    At most STEPS_SHOWN new steps are sent: a page further behind (or a cursor claiming
    to be) gets the timeline replaced by the latest STEPS_SHOWN, as a reload would show
    it, so no cursor makes the server render a whole long run."""
    seq = trail_head(run_id)
    if seq == cursor.seq:
        finished = not cursor.live and not cursor.waiting and not cursor.open_steps
        return Changes("", cursor, finished=finished)
    run = selectors.run_for_detail(run_id)
    # The last step shown comes too: the call in flight is timed from it.
    known = selectors.steps_for_run(run, numbers=set(cursor.open_steps) | {cursor.last_step})
    new = selectors.steps_for_run(run, after=cursor.last_step, limit=selectors.STEPS_SHOWN + 1)
    replaced = len(new) > selectors.STEPS_SHOWN
    if replaced:
        new = new[1:]
    changed = [
        step
        for step in known
        if step.number in cursor.open_steps and step_digest(step) != cursor.open_steps[step.number]
    ]
    waiting = run_waiting_ids(run)[:WAITING_TRACKED]
    steps = sorted({step.number: step for step in [*known, *new]}.values(), key=lambda s: s.number)
    context = {
        "run": run,
        "new_steps": new,
        "timeline_replaced": replaced,
        "earlier": new[0].number if replaced else None,
        "changed_steps": [] if replaced else changed,
        "in_flight": in_flight(run, steps),
        "live_changed": run.is_live != cursor.live,
        "waiting_changed": waiting != cursor.waiting,
        "first_waiting": waiting[0] if waiting else None,
        "now": timezone.now(),
    }
    if context["waiting_changed"]:
        user = getattr(request, "user", None)
        context.update(run_deciding(run, user=user, waiting=waiting))
    html = render_to_string("runs/_changes.html", context, request=request)
    shown = known if not replaced else []
    still_open = {
        step.number: step_digest(step)
        for step in [*shown, *new]
        if step_is_open(step, run_live=run.is_live)
    }
    next_cursor = replace(
        cursor,
        seq=seq,
        last_step=new[-1].number if new else cursor.last_step,
        live=run.is_live,
        waiting=waiting,
        open_steps=dict(sorted(still_open.items())[-OPEN_STEPS_TRACKED:]),
    )
    finished = not following(run, waiting) and not next_cursor.open_steps
    return Changes(html, next_cursor, finished=finished)
