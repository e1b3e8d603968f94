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

import contextlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agentops.runtime.models.base import COUNT_MAX

logger = logging.getLogger("agentops.providers")

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


def token_count(value: object) -> int | None:
    """``value`` if it is a count of tokens a call can have used (a whole number from 0
    to ``COUNT_MAX``, as ``turn_storable`` keeps a turn's), else None. A server's usage
    is the far side's word: None, a negative, a float (NaN, inf), a string or an absurd
    size in the window would stop its sum meaning anything, or stop it adding up."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= COUNT_MAX:
        return None
    return value


class Reservation:
    """One call let through, in its provider's window: when, and the tokens it holds
    there (its answer's cap until it is answered, then what it used). ``done`` settles
    this one and no other, so two calls that reserved the same number of tokens never
    settle each other's."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at, self.tokens = at, tokens


class Admission(tuple[float, str]):
    """What ``admission`` answers: ``(delay, why)``, as before, and for a call let
    through (``(0.0, "")``) the ``reservation`` its ``done`` settles."""

    reservation: Reservation | None

    def __new__(cls, delay: float, why: str, reservation: Reservation | None = None) -> Admission:
        admission = super().__new__(cls, (delay, why))
        admission.reservation = reservation
        return admission


class Provider:
    """One key's limits and what is using them in this process. Thread-safe: inline
    workers' threads and the async worker's engine thread share it."""

    def __init__(self, key: str, limits: Limits) -> None:
        self.key, self.limits = key, limits
        self._lock = threading.Lock()
        self.active = 0
        self._requests: deque[float] = deque()  # when each call of the window went
        self._tokens: deque[Reservation] = deque()  # each call of the window
        self._held_until = 0.0  # a 429's Retry-After, for every call to the provider
        self._released: deque[Callable[[], None]] = deque()  # who waits for a call to end

    def admission(self, tokens: int, *, now: float | None = None) -> Admission:
        """Let one call through now, counting it (``(0, "")``, with its reservation), or
        say how long to wait before asking again and why (``math.inf``: until a call
        ends)."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        with self._lock:
            while self._requests and self._requests[0] <= now - WINDOW_SECONDS:
                self._requests.popleft()
            while self._tokens and self._tokens[0].at <= now - WINDOW_SECONDS:
                self._tokens.popleft()
            if now < self._held_until:
                return Admission(
                    self._held_until - now, "the provider asked to wait (429 Retry-After)"
                )
            if limits.concurrency and self.active >= limits.concurrency:
                return Admission(math.inf, f"{limits.concurrency} calls at once")
            if limits.rpm and len(self._requests) >= limits.rpm:
                wait = self._requests[0] + WINDOW_SECONDS - now
                return Admission(wait, f"{limits.rpm} requests a minute")
            if limits.tpm:
                used = sum(entry.tokens for entry in self._tokens)
                if used and used + tokens > limits.tpm:
                    wait = self._tokens[0].at + WINDOW_SECONDS - now
                    return Admission(wait, f"{limits.tpm} tokens a minute")
            reservation = Reservation(now, tokens)
            self.active += 1
            self._requests.append(now)
            self._tokens.append(reservation)
            return Admission(0.0, "", reservation)

    def done(self, *, reserved: Reservation | int, used: object = None) -> None:
        """The call let through by ``admission`` ended: its slot is free, and its
        reservation (``reserved``) holds what it used where it said so as a count
        (``token_count``); anything else leaves what it reserved counted. A bare
        number names no one call, so it settles nothing. Never raises: it is every
        call's ``finally``, and a slot not given back is lost to the process."""
        with self._lock:
            self.active -= 1
            counted = token_count(used)
            if counted is not None and isinstance(reserved, Reservation):
                reserved.tokens = counted
            wake = self._waiter_next()
        wake_safely(wake)

    def hold(self, seconds: float) -> None:
        """The provider answered 429 with Retry-After: no call to it until then."""
        with self._lock:
            self._held_until = max(self._held_until, time.monotonic() + seconds)

    def on_release(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once: when a call ends, or at once if one may start now. The
        look and the registration hold the lock together, so a call that ends between a
        waiter's ``admission`` and this is not missed. A waiter whose wait ends takes
        ``wake`` back (``on_release_cancel``), so no call that ends spends its wake-up
        on a waiter gone while another sleeps."""
        with self._lock:
            if self.active < (self.limits.concurrency or math.inf):
                ready = True
            else:
                self._released.append(wake)
                ready = False
        if ready:
            wake_safely(wake)

    def on_release_cancel(self, wake: Callable[[], None]) -> None:
        """``wake`` waits no more (its wait timed out, or it was woken: then it is
        gone already)."""
        with self._lock, contextlib.suppress(ValueError):
            self._released.remove(wake)

    def waiter_left(self) -> None:
        """A waiter went without a slot (its run went back to the queue, or its wait
        failed). It may have been woken for a slot that it leaves free: the next waiter
        is woken in its place."""
        with self._lock:
            wake = self._waiter_next()
        wake_safely(wake)

    def _waiter_next(self) -> Callable[[], None] | None:
        """Under the lock: the first waiter, taken off the list, if a call may start."""
        if self._released and self.active < (self.limits.concurrency or math.inf):
            return self._released.popleft()
        return None


def wake_safely(wake: Callable[[], None] | None) -> None:
    """``wake()``, if any, logged rather than raised: the waiter looks again by itself
    within ``waits.RELEASE_WAIT_SECONDS``, and the call that ends must not fail for it."""
    if wake is None:
        return
    try:
        wake()
    except Exception:
        logger.exception("waking a call that waits for its provider's capacity failed")


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
