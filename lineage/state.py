"""A run's state as of one event of its trail, derived from the trail alone.

The lineage page steps through a run's history: at each event it shows the plan, the
conversation so far, the budget used and the approvals open. The Run row holds only the
state now, so the state then is folded from the events up to the one selected, in their
order (``state_at``). Pure functions over the events' bodies: no database, no Django.

An event's body is evidence, not trusted input: a trail someone changed by hand may hold
any JSON (or none: ``lineage.models.UNREADABLE``). Nothing here raises on a body of the
wrong shape; a value of the wrong type is left out, and what is shown is bounded
(``TEXT_KEPT``), so one huge tool result cannot make the page huge.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

# The run statuses a ``run.<status>`` event moves to (tasks.models.RunStatus; named
# here, since lineage depends on no other app).
RUN_STATUSES = frozenset(
    {"queued", "running", "waiting", "succeeded", "failed", "halted", "cancelled"}
)
# The ``approval.<status>`` events that close an approval; ``approval.reassigned`` and
# ``approval.escalated`` leave it open.
APPROVAL_CLOSING = frozenset({"approved", "rejected", "expired", "cancelled"})
# Tool events that end a call the engine started.
CALL_ENDING = frozenset(
    {"tool.succeeded", "tool.failed", "tool.unknown", "tool.refused", "tool.late_outcome"}
)

# The conversation shows its latest entries; earlier ones are a step back in the
# timeline (each entry links to its event).
CONVERSATION_KEPT = 20
# Characters of one text kept for the state panel; the event itself holds the rest.
TEXT_KEPT = 2_000
# Counters as the engine writes them: an int of at most 15 digits, a cost as a plain
# decimal string. Anything else (a forged 10**5000, "1e999999999") is left out rather
# than made into a number too long to print.
COUNT_MAX = 10**15
COST = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?")


@dataclass(frozen=True)
class TrailEvent:
    """One event as the fold reads it: its columns and its body (the payload hashed)."""

    seq: int
    kind: str
    actor: str
    at: datetime
    body: Any


@dataclass
class Budget:
    """What the run had used as of the event. ``seconds`` is the time the trail shows
    the run ``running`` (from ``run.running`` to its next status): the engine's own
    count of seconds of work is not in the trail, and is close to this."""

    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    spend: Decimal = Decimal(0)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass
class OpenApproval:
    approval: int
    kind: str
    tool: str
    arguments: str  # as JSON text
    gate: str
    confidence: str
    step: int | None
    seq: int  # the ``approval.requested`` event
    notes: list[str] = field(default_factory=list)  # reassigned, escalated


@dataclass(frozen=True)
class Entry:
    """One entry of the conversation: who said or did it, and what."""

    seq: int
    role: str  # objective, model, call, tool, question, human, check
    title: str
    text: str = ""
    clipped: int = 0  # characters of ``text`` left out
    status: str = ""


@dataclass
class RunState:
    """The run as of event ``seq``: what the trail up to it says."""

    seq: int = 0
    kind: str = ""
    at: datetime | None = None
    status: str = ""
    reason: str = ""
    plan: list[dict[str, str]] = field(default_factory=list)
    plan_version: int = 0
    plan_seq: int = 0
    plan_reason: str = ""
    conversation: list[Entry] = field(default_factory=list)
    conversation_total: int = 0
    # Internal: the latest entries as (seq, role, title, value, status), made into
    # Entry (their text written out) only once the fold ends: most are dropped.
    said: deque = field(default_factory=lambda: deque(maxlen=CONVERSATION_KEPT), repr=False)
    budget: Budget = field(default_factory=Budget)
    limits: dict[str, str] = field(default_factory=dict)
    limits_seq: int = 0
    approvals_open: dict[int, OpenApproval] = field(default_factory=dict)
    in_flight: dict[int, str] = field(default_factory=dict)  # step -> tool
    # Internal: the step numbers seen, and when the run last started running.
    steps_seen: set[int] = field(default_factory=set, repr=False)
    running_since: datetime | None = field(default=None, repr=False)

    @property
    def conversation_earlier(self) -> int:
        return self.conversation_total - len(self.conversation)

    @property
    def approvals(self) -> list[OpenApproval]:
        return sorted(self.approvals_open.values(), key=lambda item: item.seq)

    @property
    def calls_in_flight(self) -> list[tuple[int, str]]:
        return sorted(self.in_flight.items())


def state_at(events: Iterable[TrailEvent]) -> RunState:
    """The run's state after the last of ``events`` (the trail from its first event, in
    seq order). Time running counts up to that event's time while the run is running."""
    state = RunState()
    for event in events:
        event_apply(state, event)
    if state.running_since is not None and state.at is not None:
        state.budget.seconds += seconds_between(state.running_since, state.at)
    state.conversation = [
        Entry(seq, role, title, *text_of(json_text(value)), status)
        for seq, role, title, value, status in state.said
    ]
    return state


def event_apply(state: RunState, event: TrailEvent) -> None:
    """Fold one event into ``state``."""
    body = event.body if isinstance(event.body, dict) else {}
    kind = event.kind
    state.seq, state.kind, state.at = event.seq, kind, event.at
    step = count(body.get("step"))
    if step is not None:
        state.steps_seen.add(step)
        state.budget.steps = len(state.steps_seen)
    family, _, name = kind.partition(".")
    if family == "run":
        run_apply(state, event, name, body)
    elif family == "plan" and name in ("drafted", "revised"):
        plan_apply(state, event, body)
    elif family == "model" and name == "responded":
        model_apply(state, event, body)
    elif family == "tool":
        tool_apply(state, event, name, body, step)
    elif family == "approval":
        approval_apply(state, event, name, body, step)
    elif kind == "question.asked":
        entry_add(state, event.seq, "question", "The agent asks a person", body.get("question"))
    elif kind == "human.feedback":
        entry_add(state, event.seq, "human", f"A person ({event.actor})", body.get("content"))
    elif kind == "check.reported":
        tokens_add(state, body)
        met = body.get("objective_met")
        entry_add(
            state,
            event.seq,
            "check",
            "Self-check: objective met" if met is True else "Self-check: objective not met",
            body.get("evidence"),
            status="succeeded" if met is True else "failed",
        )


def run_apply(state: RunState, event: TrailEvent, name: str, body: dict) -> None:
    if name not in RUN_STATUSES:
        return
    if state.running_since is not None:
        state.budget.seconds += seconds_between(state.running_since, event.at)
        state.running_since = None
    if name == "running":
        state.running_since = event.at
    if name == "queued" and not state.status and "objective" in body:
        entry_add(state, event.seq, "objective", "Objective", body.get("objective"))
        if body.get("input") not in (None, {}, ""):
            entry_add(state, event.seq, "objective", "Input", body.get("input"))
    state.status = name
    state.reason = text_field(body, "reason")
    if name in ("succeeded", "failed", "halted", "cancelled"):
        state.in_flight.clear()


def plan_apply(state: RunState, event: TrailEvent, body: dict) -> None:
    steps = body.get("steps")
    if not isinstance(steps, list):
        return
    plan = []
    for item in steps:
        if isinstance(item, dict):
            title = item.get("title")
            plan.append(
                {
                    "title": text_of(title if isinstance(title, str) else json_text(title))[0],
                    "status": text_field(item, "status"),
                }
            )
    state.plan = plan
    version = count(body.get("version"))
    state.plan_version = version if version is not None else state.plan_version + 1
    state.plan_seq = event.seq
    state.plan_reason = text_field(body, "reason")


def model_apply(state: RunState, event: TrailEvent, body: dict) -> None:
    tokens_add(state, body)
    cost = body.get("cost")
    if isinstance(cost, str) and COST.fullmatch(cost):
        state.budget.spend += Decimal(cost)
    content = body.get("content")
    if isinstance(content, str) and content:
        entry_add(state, event.seq, "model", "The model", content)
    calls = body.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        name = text_field(call, "name") or "?"
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            # The model's own text: shown parsed when it is JSON, else as it came.
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                arguments = call.get("arguments")
        entry_add(
            state,
            event.seq,
            "call",
            f"The model calls {name}",
            arguments,
        )


def tool_apply(state: RunState, event: TrailEvent, name: str, body: dict, step: int | None):
    tool = text_field(body, "tool") or "a tool"
    if name == "started" and step is not None:
        state.in_flight[step] = tool
        return
    if event.kind in CALL_ENDING and step is not None:
        state.in_flight.pop(step, None)
    if name == "succeeded":
        entry_add(state, event.seq, "tool", f"{tool} returned", body.get("result"))
    elif name == "late_outcome":
        entry_add(state, event.seq, "tool", f"{tool}: an outcome arrived late", body)
    elif name in ("failed", "refused"):
        error = body.get("error")
        entry_add(
            state,
            event.seq,
            "tool",
            f"{tool} {'failed' if name == 'failed' else 'was refused'}",
            error,
            status=name,
        )
    elif name == "simulated":
        entry_add(
            state,
            event.seq,
            "tool",
            f"{tool} simulated (not made)",
            body.get("arguments"),
            status="simulated",
        )
    elif name == "unknown":
        entry_add(
            state,
            event.seq,
            "tool",
            f"{tool}: outcome unknown",
            "The call was in flight when its worker stopped: whether it took effect is not known.",
            status="unknown",
        )


def approval_apply(
    state: RunState, event: TrailEvent, name: str, body: dict, step: int | None
) -> None:
    approval = count(body.get("approval"))
    if approval is None:
        return
    if name == "requested":
        state.approvals_open[approval] = OpenApproval(
            approval=approval,
            kind=text_field(body, "kind"),
            tool=text_field(body, "tool"),
            arguments=text_of(json_text(body.get("arguments")))[0],
            gate=text_field(body, "gate"),
            confidence=text_of(json_text(body.get("confidence")))[0],
            step=step,
            seq=event.seq,
        )
        context = body.get("context")
        budgets = context.get("budgets") if isinstance(context, dict) else None
        if isinstance(budgets, dict):
            limits = {
                text_of(budget)[0]: text_of(value["limit"])[0]
                for budget, value in budgets.items()
                if isinstance(budget, str)
                and isinstance(value, dict)
                and isinstance(value.get("limit"), str)
            }
            if limits:
                state.limits, state.limits_seq = limits, event.seq
    elif name in APPROVAL_CLOSING:
        state.approvals_open.pop(approval, None)
    elif approval in state.approvals_open:
        state.approvals_open[approval].notes.append(f"{name} by {event.actor} (#{event.seq})")


def tokens_add(state: RunState, body: dict) -> None:
    tokens_in, tokens_out = count(body.get("tokens_in")), count(body.get("tokens_out"))
    state.budget.tokens_in += tokens_in or 0
    state.budget.tokens_out += tokens_out or 0


def entry_add(
    state: RunState, seq: int, role: str, title: str, text: Any, *, status: str = ""
) -> None:
    """Add to the conversation, which keeps only its latest ``CONVERSATION_KEPT``
    entries (``state_at`` writes their text out)."""
    state.said.append((seq, role, title, text, status))
    state.conversation_total += 1


def count(value: Any) -> int | None:
    """A counter or number as the engine writes them (an int, not a bool), or None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < COUNT_MAX:
        return value
    return None


def text_field(body: dict, key: str) -> str:
    """``body[key]`` when it is a string (cut to ``TEXT_KEPT``), else ""."""
    value = body.get(key)
    return text_of(value)[0] if isinstance(value, str) else ""


# What no page can carry as it is: control characters other than tab and newline, and
# unpaired surrogates (which cannot even be encoded as UTF-8).
UNSHOWABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def showable(value: str) -> str:
    """``value`` with what no page can carry written as its JSON escape (``\\u0000``)."""
    return UNSHOWABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", value)


def text_of(value: str) -> tuple[str, int]:
    """``value`` cut to ``TEXT_KEPT`` characters and made showable, and how many
    characters were cut."""
    if len(value) <= TEXT_KEPT:
        return showable(value), 0
    return showable(value[:TEXT_KEPT]), len(value) - TEXT_KEPT


def json_text(value: Any) -> str:
    """A value as the panel shows it: a string as it is, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, indent=1, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def seconds_between(start: datetime, end: datetime) -> float:
    """Seconds from ``start`` to ``end``; never negative (clocks of two workers may
    disagree a little)."""
    return max(0.0, (end - start).total_seconds())
