"""Providers treated well: per model or per base URL, a cap on calls at once, and limits
on requests and tokens a minute.

``AGENTOPS_PROVIDER_LIMITS`` (JSON) names the limits, keyed by a model name, a base URL
or ``"*"`` (every other model)::

    {"gpt-4o": {"concurrency": 50, "rpm": 500, "tpm": 300000},
     "http://127.0.0.1:8080/v1": {"concurrency": 8}}

A model's calls follow the first key that names them: its model name, else its base
URL, else ``"*"``; the calls under one key share its limits. A call over them waits its
turn (``engine.waits.provider_admit``): on the async worker it holds nothing meanwhile,
and the run's page says what it waits for. A 429 with Retry-After holds every call to
that provider, not only the one that met it, until the time it asked.

The limits are kept by each worker process: a deployment of N worker processes sets
each to its share of the provider's limits (decisions.md, 2026-12-04).

Tokens a minute are counted as the calls go: a call reserves its answer's cap
(``max_tokens``) when it is let through, and the window holds what it really used once it
is answered (prompt and answer), so a minute's calls stay within the limit give or take
the prompts of the calls out at that moment."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 60.0
LIMIT_NAMES = ("concurrency", "rpm", "tpm")


class ProviderLimitsInvalid(ValueError):
    """``AGENTOPS_PROVIDER_LIMITS`` cannot be read: said at start-up, with what is wrong."""


@dataclass(frozen=True)
class Limits:
    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def describe(self) -> str:
        parts = []
        if self.concurrency:
            parts.append(f"{self.concurrency} calls at once")
        if self.rpm:
            parts.append(f"{self.rpm} requests a minute")
        if self.tpm:
            parts.append(f"{self.tpm} tokens a minute")
        return ", ".join(parts)


def limits_parse(text: str) -> dict[str, Limits]:
    """``AGENTOPS_PROVIDER_LIMITS`` read, or ``ProviderLimitsInvalid`` naming the fault."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProviderLimitsInvalid(
            f"AGENTOPS_PROVIDER_LIMITS is not JSON ({error.msg} at position {error.pos})"
        ) from None
    if not isinstance(raw, dict):
        raise ProviderLimitsInvalid(
            'AGENTOPS_PROVIDER_LIMITS must be a JSON object: {"model or base URL": '
            '{"concurrency": N, "rpm": N, "tpm": N}}'
        )
    parsed = {}
    for key, value in raw.items():
        where = f"AGENTOPS_PROVIDER_LIMITS[{key!r}]"
        if not key.strip():
            raise ProviderLimitsInvalid(f"{where}: a key must name a model, a base URL or '*'")
        if not isinstance(value, dict) or not value:
            raise ProviderLimitsInvalid(
                f"{where} must be an object with one or more of {', '.join(LIMIT_NAMES)}"
            )
        unknown = sorted(set(value) - set(LIMIT_NAMES))
        if unknown:
            raise ProviderLimitsInvalid(
                f"{where}: unknown limit {', '.join(unknown)} (known: {', '.join(LIMIT_NAMES)})"
            )
        for name, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ProviderLimitsInvalid(f"{where}.{name} must be a whole number from 1")
        parsed[key_normal(key)] = Limits(**value)
    return parsed


def key_normal(key: str) -> str:
    """A key as it is looked up: a base URL without its trailing slash."""
    key = key.strip()
    return key.rstrip("/") if "://" in key else key


class Provider:
    """One key's limits and what is using them in this process. Thread-safe: inline
    workers' threads and the async worker's engine thread share it."""

    def __init__(self, key: str, limits: Limits) -> None:
        self.key, self.limits = key, limits
        self._lock = threading.Lock()
        self.active = 0
        self._requests: deque[float] = deque()  # when each call of the window went
        self._tokens: deque[list] = deque()  # [when, tokens] of each call of the window
        self._held_until = 0.0  # a 429's Retry-After, for every call to the provider
        self._released: list[Callable[[], None]] = []  # who waits for a call to end

    def admission(self, tokens: int, *, now: float | None = None) -> tuple[float, str]:
        """Let one call through now, counting it (``(0, "")``), or say how long to wait
        before asking again and why (``math.inf``: until a call ends)."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        with self._lock:
            while self._requests and self._requests[0] <= now - WINDOW_SECONDS:
                self._requests.popleft()
            while self._tokens and self._tokens[0][0] <= now - WINDOW_SECONDS:
                self._tokens.popleft()
            if now < self._held_until:
                return self._held_until - now, "the provider asked to wait (429 Retry-After)"
            if limits.concurrency and self.active >= limits.concurrency:
                return math.inf, f"{limits.concurrency} calls at once"
            if limits.rpm and len(self._requests) >= limits.rpm:
                wait = self._requests[0] + WINDOW_SECONDS - now
                return wait, f"{limits.rpm} requests a minute"
            if limits.tpm:
                used = sum(entry[1] for entry in self._tokens)
                if used and used + tokens > limits.tpm:
                    wait = self._tokens[0][0] + WINDOW_SECONDS - now
                    return wait, f"{limits.tpm} tokens a minute"
            self.active += 1
            self._requests.append(now)
            self._tokens.append([now, tokens])
            return 0.0, ""

    def done(self, *, reserved: int, used: int | None) -> None:
        """The call let through by ``admission`` ended: its slot is free, and the tokens
        it reserved become what it used (if it said)."""
        with self._lock:
            self.active -= 1
            if used is not None:
                for entry in reversed(self._tokens):
                    if entry[1] == reserved:
                        entry[1] = used
                        break
            # One call ended, so one waiter may go: the first (a waiter gone meanwhile
            # looks again within a second by itself).
            wake = self._released.pop(0) if self._released else None
        if wake is not None:
            wake()

    def hold(self, seconds: float) -> None:
        """The provider answered 429 with Retry-After: no call to it until then."""
        with self._lock:
            self._held_until = max(self._held_until, time.monotonic() + seconds)

    def on_release(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once, when a call ends (or at once if none is out)."""
        with self._lock:
            if self.active < (self.limits.concurrency or math.inf):
                ready = True
            else:
                self._released.append(wake)
                ready = False
        if ready:
            wake()


_providers: dict[str, Provider] = {}
_providers_lock = threading.Lock()


def provider_for(model: str, base_url: str | None) -> Provider | None:
    """The provider whose limits a call to ``model`` at ``base_url`` follows, or None."""
    from django.conf import settings

    configured: dict[str, Limits] = settings.AGENTOPS_PROVIDER_LIMITS
    if not configured:
        return None
    names = (model, key_normal(base_url or ""), "*")
    key = next((name for name in names if name and name in configured), None)
    if key is None:
        return None
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None or provider.limits != configured[key]:
            provider = _providers[key] = Provider(key, configured[key])
        return provider
