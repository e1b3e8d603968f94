from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings

from agentops.strict_json import text_storable

if TYPE_CHECKING:
    from agentops.runtime.budgets import Limits, Usage

SCRIPTED_PREFIX = "scripted:"


@dataclass(frozen=True)
class ToolCallRequest:
    """One tool call as the model asked for it; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str
    # Set by ``turn_storable`` when the arguments were over AGENTOPS_MAX_ARGUMENT_BYTES:
    # ``arguments`` is then a bounded stand-in (``arguments_stand_in``), and this says
    # what was not kept: {"bytes", "limit", "sha256"}. The engine refuses such a call.
    oversized: dict | None = None

    def as_dict(self) -> dict:
        call = {"id": self.id, "name": self.name, "arguments": self.arguments}
        return {**call, "oversized": self.oversized} if self.oversized else call


@dataclass(frozen=True)
class ModelTurn:
    content: str
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""
    finish_reason: str = ""
    # What had to change for the turn to be stored (``turn_storable``), one note each.
    normalised: list[str] = field(default_factory=list)


# The widest the step's columns take: Step.tool_call_id, Step.tool_name, and a count in a
# PositiveIntegerField (PostgreSQL's integer).
CALL_ID_CHARS = 100
TOOL_NAME_CHARS = 64
COUNT_MAX = 2**31 - 1
# How much of oversized arguments their stand-in keeps, to show what they began with.
ARGUMENT_HEAD_BYTES = 256


def arguments_stand_in(arguments: str, limit: int) -> tuple[str, dict | None]:
    """``arguments`` (a call's JSON text), or, past ``limit`` UTF-8 bytes, a stand-in
    that is small whatever the arguments were: a JSON object that gives their size, the
    limit, their sha256 and their first bytes. Returns the text to keep and, for a
    stand-in, what was not kept ({"bytes", "limit", "sha256"}), else None."""
    if len(arguments) * 4 <= limit:  # no UTF-8 character takes more than four bytes
        return arguments, None
    encoded = arguments.encode()  # text_storable made it encodable: no lone surrogates
    if len(encoded) <= limit:
        return arguments, None
    oversized = {
        "bytes": len(encoded),
        "limit": limit,
        "sha256": hashlib.sha256(encoded).hexdigest(),
    }
    head = encoded[:ARGUMENT_HEAD_BYTES].decode(errors="ignore")  # whole characters only
    return json.dumps({"oversized": {**oversized, "head": head}}), oversized


def turn_storable(turn: ModelTurn) -> ModelTurn:
    """``turn`` as both databases store it, with a note in ``normalised`` for each
    change: text that is not text (None, a number, a list of parts) made text; NUL and
    unpaired surrogates replaced by U+FFFD; an id or a tool name too long for its column
    dropped (the engine gives the call an id) or cut (a cut name ends in "…", so it never
    names a granted tool); a call's arguments over AGENTOPS_MAX_ARGUMENT_BYTES kept only
    as a stand-in (``arguments_stand_in``; the engine refuses the call); a token count
    that is not a count made 0, one too large cut.

    A model server is the far side: what it sent happened and is kept, never refused.
    Everything the engine derives from a turn (calls, the final answer) is read from
    what is stored, so a run resumed from its record acts on the same values."""
    notes = list(turn.normalised)

    def text(value: Any, where: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            notes.append(f"{where}: a {type(value).__name__}, not text; stored as its JSON")
            try:
                value = json.dumps(value, default=str)
            except (TypeError, ValueError, RecursionError):
                value = repr(value)
        stored, found = text_storable(value, where=where)
        notes.extend(found)
        return stored

    def count(value: Any, where: str) -> int:
        if value is None:
            return 0  # many local servers report no usage
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            notes.append(f"{where}: {value!r} is not a count of tokens; counted as 0")
            return 0
        if value > COUNT_MAX:
            notes.append(f"{where}: {value} is more than {COUNT_MAX}; counted as {COUNT_MAX}")
            return COUNT_MAX
        return value

    limit = settings.AGENTOPS_MAX_ARGUMENT_BYTES
    calls = []
    for position, call in enumerate(turn.tool_calls):
        where = f"tool_calls[{position}]"
        call_id = text(call.id, f"{where}.id")
        if len(call_id) > CALL_ID_CHARS:
            notes.append(f"{where}.id: longer than {CALL_ID_CHARS} characters; replaced")
            call_id = ""
        name = text(call.name, f"{where}.name")
        if len(name) > TOOL_NAME_CHARS:
            notes.append(f"{where}.name: longer than {TOOL_NAME_CHARS} characters; cut")
            name = name[: TOOL_NAME_CHARS - 1] + "…"
        arguments = text(call.arguments, f"{where}.arguments")
        arguments, oversized = arguments_stand_in(arguments, limit)
        if oversized:
            notes.append(
                f"{where}.arguments: {oversized['bytes']} bytes, more than the limit of "
                f"{limit}; kept as a stand-in (their first bytes and their sha256)"
            )
        calls.append(
            ToolCallRequest(
                id=call_id, name=name, arguments=arguments, oversized=oversized or call.oversized
            )
        )
    return ModelTurn(
        content=text(turn.content, "content"),
        tool_calls=calls,
        tokens_in=count(turn.tokens_in, "tokens_in"),
        tokens_out=count(turn.tokens_out, "tokens_out"),
        model=text(turn.model, "model"),
        finish_reason=text(turn.finish_reason, "finish_reason"),
        normalised=notes,
    )


# The longest a model call waits for its server's Retry-After: a server that asks for
# more is asked again after this, rather than holding the worker for as long as it says.
RETRY_AFTER_MAX_SECONDS = 60.0


class ModelError(Exception):
    """A model call that failed. Transient ones (timeouts, 429, 5xx, refused
    connections) may be retried; others end the attempt. ``retry_after``: the seconds
    the server asked us to wait before the next attempt (its Retry-After), if it said."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after

    def retry_wait(self, backoff: float, limits: Limits, usage: Usage) -> float:
        """The seconds to wait before the next attempt: the server's Retry-After where
        it gave one and it is longer than ``backoff`` (else ``backoff``), at most
        ``RETRY_AFTER_MAX_SECONDS``, and never past the run's time budget."""
        wait = backoff
        if self.retry_after is not None:
            wait = max(backoff, min(self.retry_after, RETRY_AFTER_MAX_SECONDS))
        if limits.seconds is not None:
            wait = min(wait, max(0.0, limits.seconds - usage.seconds))
        return round(wait, 3)


def retry_after_seconds(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The wait a server asked for, from its headers (names in lower case, as an HTTP
    client's case-insensitive headers give them): ``retry-after-ms`` (OpenAI's, in
    milliseconds) or ``Retry-After`` in seconds or as an HTTP date (RFC 9110 10.2.3).
    None when it gave none or none that reads; a date in the past is no wait (0)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            value = float(milliseconds) / 1000
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and value >= 0:
            return value
    text = (headers.get("retry-after") or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT; a malformed one may say no zone
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return value if math.isfinite(value) and value >= 0 else None


class ModelNotConfigured(Exception):
    """The task names a model this deployment cannot reach; said before a run starts."""


class ModelClient(Protocol):
    label: str

    def complete(
        self,
        *,
        messages: list[dict],
        tools: list[dict],
        tool_choice: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> ModelTurn:
        """One turn. ``tool_choice`` names a tool the model must call; ``max_tokens``
        bounds the answer; ``timeout`` the seconds to wait."""


def model_label_for(model: str) -> str:
    """What a run records and shows as its model: ``scripted:NAME`` or the model name."""
    if model.startswith(SCRIPTED_PREFIX):
        return model
    name = model or settings.AGENTOPS_MODEL
    if not name:
        raise ModelNotConfigured(
            "No model is configured: set AGENTOPS_MODEL (and OPENAI_API_KEY / "
            "OPENAI_BASE_URL for your server), or name a model on the task."
        )
    if not (settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL):
        raise ModelNotConfigured(
            f"The model {name!r} needs an OpenAI-compatible server: set OPENAI_API_KEY "
            "(OpenAI) or OPENAI_BASE_URL (a local server such as vLLM or Ollama)."
        )
    return name


def client_for(model_label: str) -> ModelClient:
    from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
    from agentops.runtime.models.scripted import ScriptedClient

    if model_label.startswith(SCRIPTED_PREFIX):
        return ScriptedClient.named(model_label[len(SCRIPTED_PREFIX) :])
    return OpenAICompatibleClient(
        model=model_label,
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL or None,
        timeout=settings.AGENTOPS_MODEL_TIMEOUT,
    )
