"""Standard Webhooks signatures (https://www.standardwebhooks.com, the spec's
"Verifying webhook authenticity"): who may fire a webhook trigger.

A delivery carries three headers: ``webhook-id`` (the sender's id for the event, the
same on every retry: the firing's key), ``webhook-timestamp`` (whole seconds since the
epoch, when this attempt was signed) and ``webhook-signature``, a space-separated list of
``v1,<base64>`` entries. Each entry is HMAC-SHA256 over ``{id}.{timestamp}.{body}`` with
the secret's bytes (the base64 after ``whsec_``); one entry made with any secret the
trigger holds now is enough, so a sender moving to a rotated secret can sign with both.
Entries of other versions (``v1a``, asymmetric) are passed over, as the spec asks.

The signature is checked before the timestamp: a party that cannot sign learns only
that its signature is wrong, and a stale timestamp is reported only to someone who
holds the secret (a replay, or a clock that is off). Signatures are compared in
constant time (``hmac.compare_digest``).

Not the ``standardwebhooks`` package: its tolerance is fixed at five minutes (ours is
the trigger's ``tolerance_seconds``), it takes one secret, and its one error does not
say whether the signature or the timestamp failed, which the sender needs to know. The
scheme is a few lines of the standard library; tests/triggers/test_webhooks.py proves
it on the spec's published test vectors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from triggers.services import SECRET_PREFIX

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SIGNATURE_VERSION = "v1"
# A header naming more signatures than this is refused before any is computed: a
# sender rotating a secret sends two, and the spec's own examples three or four.
MAX_SIGNATURES = 16
# An id is the firing's key and goes into a URL, a log and a database column: printable
# ASCII, no spaces (Standard Webhooks senders use ids such as msg_2KWPBgLlAfxdpx2AI5).
# A longer one than trigger_fire keeps is kept as its digest.
_ID = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class WebhookRefused(Exception):
    """A delivery that does not authenticate. ``reason``: ``"signature"`` (missing or
    wrong headers, no signature that matches) or ``"timestamp"`` (signed, but too old or
    too far ahead, or not a timestamp)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Delivery:
    """A delivery whose signature and timestamp passed."""

    id: str
    timestamp: int


def secret_bytes(secret: str) -> bytes:
    """The key a ``whsec_`` secret stands for: its base64 part, decoded (padding may
    be left off, as the spec's reference libraries accept)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)


def signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    """What is signed: ``{id}.{timestamp}.{body}``, the body's bytes exactly as sent.
    The headers arrive as WSGI gives them (ISO-8859-1 text for the bytes that came), so
    encoding them back as ISO-8859-1 gives the bytes the sender signed (text that is
    not, which no WSGI server hands over, cannot have been signed: it is replaced)."""
    return f"{msg_id}.{timestamp}.".encode("latin-1", errors="replace") + body


def webhook_sign(*, secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``v1,<base64>`` signature of a delivery: what a sender puts in
    ``webhook-signature`` (the bench and the tests sign with it)."""
    digest = hmac.new(
        secret_bytes(secret), signed_content(msg_id, str(timestamp), body), hashlib.sha256
    ).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signatures_given(header: str) -> list[bytes]:
    """The ``v1`` digests in a ``webhook-signature`` header (other versions and entries
    that are not base64 are passed over)."""
    entries = header.split()
    if len(entries) > MAX_SIGNATURES:
        raise WebhookRefused(
            "signature",
            f"{SIGNATURE_HEADER}: {len(entries)} signatures; at most {MAX_SIGNATURES} are read",
        )
    digests = []
    for entry in entries:
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            digests.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return digests


def webhook_verify(
    *,
    secrets: list[str],
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: int,
    now: float | None = None,
) -> Delivery:
    """The delivery, if one of ``secrets`` signed it and its timestamp is within
    ``tolerance_seconds`` of ``now`` (either way); otherwise ``WebhookRefused`` saying
    why. ``headers`` is looked up by the lower-case names above (Django's
    ``request.headers`` matches any case)."""
    msg_id = headers.get(ID_HEADER) or ""
    timestamp = headers.get(TIMESTAMP_HEADER) or ""
    signature = headers.get(SIGNATURE_HEADER) or ""
    missing = [
        name
        for name, value in (
            (ID_HEADER, msg_id),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, signature),
        )
        if not value.strip()
    ]
    if missing:
        raise WebhookRefused(
            "signature",
            f"missing the {', '.join(missing)} header{'s' if len(missing) > 1 else ''} "
            "(Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)",
        )
    if not _ID.fullmatch(msg_id):
        raise WebhookRefused(
            "signature", f"{ID_HEADER}: must be printable ASCII characters without spaces"
        )
    given = signatures_given(signature)
    if not given:
        raise WebhookRefused(
            "signature",
            f"{SIGNATURE_HEADER}: no {SIGNATURE_VERSION},<base64> signature in the header",
        )
    content = signed_content(msg_id, timestamp, body)
    matched = False
    for secret in secrets:
        try:
            key = secret_bytes(secret)
        except (binascii.Error, ValueError):
            continue  # never made by secret_new; such a secret signs nothing
        expected = hmac.new(key, content, hashlib.sha256).digest()
        # Every given signature is compared, whatever matched before: the time taken
        # does not depend on which one matched.
        for digest in given:
            matched |= hmac.compare_digest(expected, digest)
    if not matched:
        raise WebhookRefused(
            "signature",
            "no signature matches: sign '{webhook-id}.{webhook-timestamp}.{body}' with "
            "HMAC-SHA256, keyed with the base64-decoded part of the trigger's secret after "
            "whsec_, over the body's exact bytes",
        )
    if not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookRefused(
            "timestamp",
            f"{TIMESTAMP_HEADER}: {timestamp[:40]!r} is not whole seconds since the epoch",
        )
    now = time.time() if now is None else now
    skew = int(timestamp) - now
    if abs(skew) > tolerance_seconds:
        said = "old" if skew < 0 else "far in the future"
        raise WebhookRefused(
            "timestamp",
            f"{TIMESTAMP_HEADER}: {abs(skew):.0f} seconds {said}; at most "
            f"{tolerance_seconds} seconds either way are accepted (sign each attempt anew, "
            "and check the sender's clock)",
        )
    return Delivery(id=msg_id, timestamp=int(timestamp))
