"""Inbound-email triggers: an SMTP listener (aiosmtpd) that turns a message sent to an
email trigger's address into a firing of that trigger. ``triggers.listeners`` runs it
at ``AGENTOPS_SMTP_LISTEN_HOST:PORT`` while any email trigger is enabled; in production
the organisation's mail server relays the addresses' mail to it (it speaks plain SMTP,
without TLS or AUTH, and is meant for loopback or a private network).

What a message passes, in order, each refusal an SMTP reply naming what was wrong:

1. ``RCPT TO``: an enabled email trigger has the address (else 550), one trigger per
   message (a second one is answered 452, and the sending server sends the message
   again for it), and the envelope sender is on its list (else 550).
2. ``DATA``: at most the largest size the triggers allow (aiosmtpd answers 552); one
   From address, on the list (550); where the trigger asks, a DKIM signature that
   verifies, covers the From header and the whole body, and is the From domain's (550);
   attachments within the trigger's count and size (552).

Where DKIM is required, what the payload reads must be what the signature vouches
for: one copy each of the headers the payload or the MIME parsing reads
(``HEADERS_READ``: a second Subject above a signed message would be the one read,
unsigned), CRLF line ends only in the header block (so Python's parser and dkimpy's
see the same headers), and a signature whose ``h=`` covers Subject and, when the
message has them, Message-ID, Date and Content-Type. A signature not of the From
domain is set aside before its key is looked up; pinned keys (``dkim_keys``) are the
only keys then, no DNS; and the whole check has ``DKIM_DEADLINE_SECONDS``.

At most ``SMTP_SESSIONS`` connections are served at once (421 beyond), and a client
silent for ``SMTP_TIMEOUT_SECONDS`` (between commands, or between lines of DATA) is let
go.

Mail refused before the firing records nothing: anyone can send mail, and a refusal
row for each would let them fill the table (the log says what was refused). Past
those checks the message is a firing: its attachments are stored by their sha256 under
``AGENTOPS_ATTACHMENT_DIR``, and ``trigger_fire`` decides, with the Message-ID as the
key, so a message the sending server delivers twice starts one run. A rate or live-runs
refusal is answered 451: the sending server tries again later, as a queue's consumer
would. Refused input is 550, with the reason, in the sender's bounce; so is a value the
database refuses (a ``DatabaseError`` other than a lost connection, which is 451).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import hashlib
import html.parser
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import dkim
import dkim.dnsplug
import dkim.util
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection

from tasks.models import Trigger
from triggers.config import config_of
from triggers.models import Firing
from triggers.services import trigger_fire

logger = logging.getLogger("agentops.triggers.email")

Refusal = Firing.Refusal

# Room in a message for its text and headers beyond its attachments, and the most any
# message may be, whatever the triggers allow: aiosmtpd holds a message in memory.
TEXT_ALLOWANCE_BYTES = 1024**2
MESSAGE_MAX_BYTES = 64 * 1024**2
# The most of a message's text the payload carries.
TEXT_CHARS = 256 * 1024
# Signatures looked at, at most, in one message.
DKIM_SIGNATURES = 5
DKIM_MIN_KEY_BITS = 1024
DNS_TIMEOUT_SECONDS = 5
# The most all of one message's DKIM checking (lookups, hashing) may take.
DKIM_DEADLINE_SECONDS = 15.0
# Headers the payload or the MIME parsing reads: with DKIM required, one copy each.
HEADERS_READ = (
    "from",
    "to",
    "subject",
    "message-id",
    "date",
    "content-type",
    "content-transfer-encoding",
    "mime-version",
)
# Headers a signature's h= must cover: Subject always (signing an absent one keeps
# one from being added), the others when the message has them. From is checked apart.
HEADERS_SIGNED_ALWAYS = ("subject",)
HEADERS_SIGNED_PRESENT = ("message-id", "date", "content-type")
# Connections served at once, and how long a silent client is waited for.
SMTP_SESSIONS = 50
SMTP_TIMEOUT_SECONDS = 30
# An SMTP reply's text is one line; a reason longer than this is cut.
REPLY_CHARS = 400


@dataclass(frozen=True)
class EmailRoute:
    """What the listener needs of one enabled email trigger."""

    trigger_id: int
    name: str
    address: str
    senders: tuple[str, ...]
    dkim: bool
    dkim_keys: dict[str, str] = field(default_factory=dict)
    max_attachment_bytes: int = 1024**2
    max_attachments: int = 10

    @classmethod
    def of(cls, trigger: Trigger) -> EmailRoute:
        config = config_of(trigger)
        return cls(
            trigger_id=trigger.pk,
            name=trigger.name,
            address=config["address"].lower(),
            senders=tuple(sender.lower() for sender in config["senders"]),
            dkim=config["dkim"],
            dkim_keys=dict(config.get("dkim_keys") or {}),
            max_attachment_bytes=config["max_attachment_bytes"],
            max_attachments=config["max_attachments"],
        )

    def message_bytes_allowed(self) -> int:
        """The largest message this trigger can take: its attachments at their most,
        in base64 (4 bytes for 3), and room for the text."""
        attachments = self.max_attachments * self.max_attachment_bytes * 4 // 3
        return min(attachments + TEXT_ALLOWANCE_BYTES, MESSAGE_MAX_BYTES)


class EmailRefused(Exception):
    """A message refused before it became a firing: ``reply`` is the SMTP answer."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply_line(code, reason)


def reply_line(code: str, text: str) -> str:
    """``code`` and ``text`` as one SMTP reply line: no line breaks, ASCII, bounded."""
    text = re.sub(r"\s+", " ", text).strip()
    text = text.encode("ascii", "replace").decode()
    if len(text) > REPLY_CHARS:
        text = text[: REPLY_CHARS - 3] + "..."
    return f"{code} {text}"


def sender_allowed(senders: tuple[str, ...], address: str) -> bool:
    """``address`` is on the list: written there whole, or its domain as ``@domain``
    (that domain exactly: a subdomain is listed by itself)."""
    address = address.strip().lower()
    if "@" not in address:
        return False
    domain = address.rsplit("@", 1)[1]
    return any(
        (sender.startswith("@") and domain == sender[1:]) or address == sender for sender in senders
    )


# The listener ---------------------------------------------------------------------------


class InboundEmailHandler:
    """aiosmtpd's handler. ``routes`` (address -> route) is replaced whole by the
    listeners when they read the triggers again; the handler never reads the database
    on the event loop: the firing runs in a thread (``asyncio.to_thread``)."""

    def __init__(self) -> None:
        self.routes: dict[str, EmailRoute] = {}
        # Addresses two enabled triggers claim: mail to them waits (451) until one goes.
        self.ambiguous: frozenset[str] = frozenset()

    def routes_set(self, routes: list[EmailRoute]) -> None:
        by_address: dict[str, EmailRoute] = {}
        ambiguous = set()
        for route in routes:
            if route.address in by_address:
                ambiguous.add(route.address)
            by_address[route.address] = route
        for address in ambiguous:
            by_address.pop(address)
            logger.error(
                "two enabled email triggers have the address %s: mail to it is deferred "
                "(451) until one is disabled or changed",
                address,
            )
        self.routes, self.ambiguous = by_address, frozenset(ambiguous)

    def data_size_limit(self) -> int:
        routes = list(self.routes.values())
        return max(
            (route.message_bytes_allowed() for route in routes), default=TEXT_ALLOWANCE_BYTES
        )

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options) -> str:
        wanted = address.strip().lower()
        if wanted in self.ambiguous:
            return reply_line("451 4.3.5", f"<{address}>: two triggers claim this address")
        route = self.routes.get(wanted)
        if route is None:
            return reply_line("550 5.1.1", f"<{address}>: no trigger takes mail at this address")
        if envelope.rcpt_tos:
            if envelope.rcpt_tos[0].lower() == wanted:
                return "250 OK"  # the same recipient twice is one
            # One reply to DATA cannot say "run started" for one trigger and "refused"
            # for another: one trigger a message, the sender's server sends it again.
            return reply_line(
                "452 4.5.3", f"<{address}>: one trigger a message; send it again for this one"
            )
        sender = envelope.mail_from or ""
        if not sender_allowed(route.senders, sender):
            logger.info("email to %s: refused the envelope sender <%s>", route.address, sender)
            return reply_line(
                "550 5.7.1",
                f"the sender <{sender}> may not send to <{route.address}> (not on its list)",
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        address = envelope.rcpt_tos[0].lower()
        route = self.routes.get(address)
        if route is None:  # disabled between RCPT and DATA
            return reply_line("450 4.2.1", f"<{address}> takes no mail right now")
        try:
            return await asyncio.to_thread(
                email_receive,
                route=route,
                mail_from=envelope.mail_from or "",
                content=envelope.original_content,
            )
        except Exception:
            # A fault of ours, not the sender's: the sending server keeps the message
            # and tries again, and the log has the traceback.
            logger.exception("email to %s: handling the message failed", address)
            return reply_line("451 4.3.0", "a temporary failure here; try again later")


class InboundEmailSMTP(SMTP):
    """aiosmtpd's SMTP session, counted: past the controller's ``sessions_max`` open at
    once, a new connection is answered 421 and closed before it may say anything."""

    def __init__(
        self, handler: InboundEmailHandler, *, controller: InboundEmailController, **kwargs
    ):
        super().__init__(handler, **kwargs)
        self.controller = controller
        self.counted = False

    def connection_made(self, transport) -> None:
        # Called on the listener's one event loop thread: the count needs no lock.
        # (A second call is STARTTLS on the same connection, never here: no TLS.)
        if not self.counted and self.controller.sessions < self.controller.sessions_max:
            self.controller.sessions += 1
            self.counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted:
            self.controller.sessions -= 1
            self.counted = False
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if not self.counted:
            await self.push("421 4.3.2 too many connections here; try again later")
            self.transport.close()
            return
        await super()._handle_client()


class InboundEmailController(Controller):
    """aiosmtpd's threaded controller, its size limit read from the handler for each
    connection, so a trigger's new limits hold without restarting the server; at most
    ``sessions_max`` connections served at once."""

    def __init__(
        self, handler: InboundEmailHandler, *, sessions_max: int = SMTP_SESSIONS, **kwargs
    ):
        super().__init__(handler, **kwargs)
        self.sessions_max = sessions_max
        self.sessions = 0

    def factory(self) -> SMTP:
        kwargs = {**self.SMTP_kwargs, "data_size_limit": self.handler.data_size_limit()}
        return InboundEmailSMTP(self.handler, controller=self, **kwargs)


def smtp_listener(
    handler: InboundEmailHandler, *, host: str, port: int, sessions_max: int = SMTP_SESSIONS
) -> InboundEmailController:
    """The listener, not yet started (``.start()`` binds and raises if it cannot)."""
    return InboundEmailController(
        handler,
        hostname=host,
        port=port,
        sessions_max=sessions_max,
        server_hostname="agentops",
        ident="agentops inbound email",
        # A client that says nothing for this long (between commands, or between the
        # lines of DATA) is let go: a connection held open costs one of SMTP_SESSIONS.
        timeout=SMTP_TIMEOUT_SECONDS,
    )


# A message, from its bytes to its firing -------------------------------------------------


def email_receive(*, route: EmailRoute, mail_from: str, content: bytes) -> str:
    """Check the message ``content``, sent by ``mail_from`` to the route's trigger, and
    fire the trigger; the SMTP reply to give. Runs in a thread, off the event loop."""
    try:
        message = message_parse(content)
        sender = from_address(message)
        if not sender_allowed(route.senders, sender):
            raise EmailRefused(
                "550 5.7.1",
                f"the From address <{sender}> may not send to <{route.address}> (not on its list)",
            )
        if route.dkim:
            problem = headers_problem(message, content) or dkim_problem(
                content, sender, dkim_dns(route.dkim_keys)
            )
            if problem:
                raise EmailRefused("550 5.7.20", f"DKIM: {problem}")
        attachments = attachments_checked(message, route)
        payload = email_payload(message, route, sender, attachments)
        key = message_key(message, content)
    except EmailRefused as refused:
        logger.info("email to %s from <%s>: %s", route.address, mail_from, refused.reply)
        return refused.reply
    try:
        # Stored before the run can ask for them; named by their content, so a message
        # delivered twice stores nothing twice.
        for part, entry in attachments:
            attachment_store(entry["sha256"], part_bytes(part))
        fired = trigger_fire(trigger_id=route.trigger_id, key=key, payload=payload)
    except (OperationalError, InterfaceError) as error:
        logger.warning("email to %s: the database failed (%s); deferred", route.address, error)
        return reply_line("451 4.3.0", "a temporary failure here; try again later")
    except DatabaseError as error:
        # Not a lost connection: the database refused something of this message's,
        # and would again on every try. Permanent; the reason stays in our log.
        logger.warning("email to %s: the database refused the message: %s", route.address, error)
        return reply_line("550 5.6.0", f"the message could not be stored ({type(error).__name__})")
    except OSError as error:
        logger.error("email to %s: storing an attachment failed: %s", route.address, error)
        return reply_line("451 4.3.0", "a temporary failure here; try again later")
    finally:
        # The thread is the event loop's executor's, not ours: a connection left open
        # in it would outlive the listener. Mail is not so frequent that it costs.
        connection.close()
    firing = fired.firing
    if fired.duplicate:
        return reply_line("250 2.0.0", f"already received: run {firing.run_id}")
    if fired.accepted:
        logger.info("email to %s from <%s>: run %s", route.address, sender, firing.run_id)
        return reply_line("250 2.0.0", f"run {firing.run_id} queued")
    logger.info("email to %s from <%s>: refused: %s", route.address, sender, firing.reason)
    if firing.refusal in (Refusal.RATE, Refusal.LIVE, Refusal.OVERLAP):
        return reply_line("451 4.7.0", f"{firing.reason}; try again later")
    return reply_line("550 5.6.0", firing.reason)


def message_parse(content: bytes) -> EmailMessage:
    try:
        return BytesParser(policy=email.policy.default).parsebytes(content)
    except Exception as error:  # the parser is lenient; this is rare
        raise EmailRefused("550 5.6.0", f"the message could not be read: {error}") from None


def from_address(message: EmailMessage) -> str:
    """The one address of the message's one From header."""
    headers: list = []
    try:
        headers = message.get_all("from") or []
        addresses = [address for header in headers for address in header.addresses]
    except Exception:
        addresses = []
    if len(headers) != 1 or len(addresses) != 1 or "@" not in addresses[0].addr_spec:
        raise EmailRefused("550 5.7.1", "the message must have one From header with one address")
    return addresses[0].addr_spec


def header_text(message: EmailMessage, name: str) -> str:
    try:
        return str(message.get(name, "") or "").strip()
    except Exception:
        return ""


def message_key(message: EmailMessage, content: bytes) -> str:
    """The firing key: the Message-ID, which a sending server keeps when it delivers a
    message again; without one, a digest of what a delivery again keeps too (From, Date,
    Subject, the body), not of the whole message, whose Received lines change."""
    message_id = header_text(message, "message-id")
    if message_id:
        return message_id
    digest = hashlib.sha256()
    for name in ("from", "date", "subject"):
        digest.update(header_text(message, name).encode("utf-8", "replace") + b"\0")
    body = re.split(rb"\r?\n\r?\n", content, maxsplit=1)[-1]
    digest.update(body)
    return "sha256:" + digest.hexdigest()


# DKIM -----------------------------------------------------------------------------------


def dkim_dns(pinned: dict[str, str]) -> Callable[..., bytes | None]:
    """dkimpy's DNS lookup: with keys pinned in the trigger's config (``dkim_keys``, by
    ``selector._domainkey.domain``), those keys only (a name not pinned has none: the
    trigger said which keys it trusts); with none pinned, a real TXT lookup."""
    keys = {name.lower().rstrip("."): record for name, record in pinned.items()}

    def txt(name: bytes | str, timeout: float = DNS_TIMEOUT_SECONDS) -> bytes | None:
        if keys:
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            record = keys.get(text.lower().rstrip("."))
            return record.encode() if record is not None else None
        return dkim.dnsplug.get_txt(name, timeout=timeout)

    return txt


def headers_problem(message: EmailMessage, content: bytes) -> str:
    """What keeps the headers the payload reads from being the ones a DKIM signature
    can vouch for, or "": a header block with a line end other than CRLF (Python's
    parser would split a line dkimpy reads whole), or a second copy of a header in
    ``HEADERS_READ`` (the payload would read one copy, the signature cover another)."""
    head = re.split(rb"\r\n\r\n", content, maxsplit=1)[0]
    if re.search(rb"\r(?!\n)|(?<!\r)\n", head):
        return "the header block has a line end other than CRLF"
    repeated = [name for name in HEADERS_READ if len(message.get_all(name) or []) > 1]
    if repeated:
        return f"the message has more than one {', '.join(repeated)} header"
    return ""


def domain_aligned(from_domain: str, signer: str) -> bool:
    """The signer's domain is the From domain, or one it belongs to."""
    from_domain, signer = from_domain.lower().rstrip("."), signer.lower().rstrip(".")
    return from_domain == signer or from_domain.endswith("." + signer)


def dkim_deadlined(
    dnsfunc: Callable[..., bytes | None], deadline: float
) -> Callable[..., bytes | None]:
    """``dnsfunc``, each lookup given no more than the time left before ``deadline``
    (``time.monotonic()``), and refused once it has passed."""

    def txt(name: bytes | str, timeout: float = DNS_TIMEOUT_SECONDS) -> bytes | None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("out of time for DKIM key lookups")
        return dnsfunc(name, timeout=min(timeout, left))

    return txt


def dkim_signer(value: bytes) -> str:
    """A DKIM-Signature header's d= domain, read without verifying anything ("" when
    the header does not parse or has none)."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:
        return ""
    return re.sub(rb"\s+", b"", tags.get(b"d", b"")).decode("ascii", "replace")


def dkim_problem(
    content: bytes,
    sender: str,
    dnsfunc: Callable[..., bytes | None],
    *,
    deadline_seconds: float = DKIM_DEADLINE_SECONDS,
) -> str:
    """What keeps the message from being DKIM-authenticated for ``sender``, or "" when
    one signature is the From domain's, verifies, signs the From header and
    ``HEADERS_SIGNED_*``, and covers the whole body (a signature with ``l=`` lets anyone
    append to it). A signature of another domain is set aside before its key is looked
    up, so a sender cannot make this listener query names of its choosing; all of it
    within ``deadline_seconds``."""
    deadline = time.monotonic() + deadline_seconds
    dnsfunc = dkim_deadlined(dnsfunc, deadline)
    from_domain = sender.rsplit("@", 1)[1]
    try:
        first = dkim.DKIM(content, minkey=DKIM_MIN_KEY_BITS, timeout=DNS_TIMEOUT_SECONDS)
    except dkim.DKIMException as error:
        return f"the message could not be read ({error})"
    signatures = [value for name, value in first.headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return "the message has no DKIM signature, and this address requires one"
    present = {name.strip().lower().decode("ascii", "replace") for name, _ in first.headers}
    wanted = [*HEADERS_SIGNED_ALWAYS, *(h for h in HEADERS_SIGNED_PRESENT if h in present)]
    problems = []
    checker = first
    for index, value in enumerate(signatures[:DKIM_SIGNATURES]):
        signer = dkim_signer(value)
        if not signer or not domain_aligned(from_domain, signer):
            problems.append(
                f"the signature is {signer or 'of no domain'}'s, not the From domain's "
                f"({from_domain})"
            )
            continue
        if time.monotonic() >= deadline:
            problems.append("out of time checking the signatures")
            break
        # One checker a signature: verifying leaves the last one's state behind.
        if checker is None:
            checker = dkim.DKIM(content, minkey=DKIM_MIN_KEY_BITS, timeout=DNS_TIMEOUT_SECONDS)
        try:
            verified = checker.verify(idx=index, dnsfunc=dnsfunc)
        except Exception as error:  # dkimpy's refusals, and a DNS lookup's failures
            problems.append(f"a signature does not verify ({error})")
            checker = None
            continue
        fields, signed = checker.signature_fields, checker.include_headers
        checker = None
        signer = fields[b"d"].decode("ascii", "replace")
        unsigned = [name for name in wanted if name.encode() not in signed]
        if not verified:
            problems.append(f"the signature of {signer} does not verify")
        elif b"l" in fields:
            problems.append(f"the signature of {signer} covers only part of the body (l=)")
        elif b"from" not in signed:
            problems.append(f"the signature of {signer} does not sign the From header")
        elif not domain_aligned(from_domain, signer):
            problems.append(f"the signature is {signer}'s, not the From domain's ({from_domain})")
        elif unsigned:
            problems.append(
                f"the signature of {signer} does not sign the {', '.join(unsigned)} header"
            )
        else:
            return ""
    return "; ".join(problems) or "no signature verifies"


# The payload ----------------------------------------------------------------------------


def parts_leaf(part: EmailMessage) -> Iterator[EmailMessage]:
    """The message's parts that are not containers; a message attached whole
    (message/rfc822) is one part, not opened."""
    if part.get_content_maintype() == "multipart":
        for inner in part.iter_parts():
            yield from parts_leaf(inner)
    else:
        yield part


def part_bytes(part: EmailMessage) -> bytes:
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        inner = inner[0] if isinstance(inner, list) and inner else inner
        return inner.as_bytes() if hasattr(inner, "as_bytes") else b""
    return part.get_payload(decode=True) or b""


def filename_shown(name: str | None) -> str:
    """An attachment's name as a label only (it is never a path here): its last path
    component, without control characters, bounded."""
    name = re.split(r"[/\\]", name or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    return name[:255] or "attachment"


def body_part(message: EmailMessage) -> EmailMessage | None:
    try:
        return message.get_body(preferencelist=("plain", "html"))
    except Exception:
        return None


def attachments_checked(
    message: EmailMessage, route: EmailRoute
) -> list[tuple[EmailMessage, dict[str, Any]]]:
    """The message's attachments and their payload entries, within the trigger's count
    and size (else refused 552, naming the one over)."""
    body = body_part(message)
    found = []
    for part in parts_leaf(message):
        if part is body:
            continue
        disposition = part.get_content_disposition()
        if not (
            disposition == "attachment"
            or part.get_filename()
            or part.get_content_maintype() not in ("text",)
        ):
            continue  # another rendering of the text (the HTML beside the plain)
        found.append(part)
    if len(found) > route.max_attachments:
        raise EmailRefused(
            "552 5.3.4",
            f"the message has {len(found)} attachments; <{route.address}> takes at most "
            f"{route.max_attachments}",
        )
    checked = []
    for part in found:
        data = part_bytes(part)
        name = filename_shown(part.get_filename())
        if len(data) > route.max_attachment_bytes:
            raise EmailRefused(
                "552 5.3.4",
                f"the attachment {name!r} is {len(data)} bytes; <{route.address}> takes "
                f"at most {route.max_attachment_bytes} bytes an attachment",
            )
        checked.append(
            (
                part,
                {
                    "filename": name,
                    "content_type": part.get_content_type(),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                },
            )
        )
    return checked


class _TextOfHTML(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3"):
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def text_of(message: EmailMessage) -> str:
    """The message's text: its plain part, else its HTML part's text."""
    part = body_part(message)
    if part is None:
        return ""
    try:
        text = part.get_content()
    except (LookupError, ValueError):  # a charset Python does not know
        text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    if not isinstance(text, str):
        return ""
    text = text.replace("\r\n", "\n")  # the wire's line ends, not the writer's
    if part.get_content_subtype() == "html":
        reader = _TextOfHTML()
        reader.feed(text)
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(reader.chunks)).strip()
    return text


def date_of(message: EmailMessage) -> str | None:
    raw = header_text(message, "date")
    if not raw:
        return None
    try:
        return email.utils.parsedate_to_datetime(raw).isoformat()
    except (TypeError, ValueError):
        return None


def email_payload(
    message: EmailMessage,
    route: EmailRoute,
    sender: str,
    attachments: list[tuple[EmailMessage, dict[str, Any]]],
) -> dict[str, Any]:
    """What the trigger's input mapping reads: ``{from, from_name, to, subject, text,
    text_truncated, message_id, date, attachments: [{filename, content_type, bytes,
    sha256}]}``; ``to`` is the trigger's address, ``date`` ISO 8601 (or null)."""
    try:
        from_name = message.get_all("from")[0].addresses[0].display_name
    except Exception:
        from_name = ""
    text = text_of(message)
    return {
        "from": sender,
        "from_name": from_name,
        "to": route.address,
        "subject": header_text(message, "subject"),
        "text": text[:TEXT_CHARS],
        "text_truncated": len(text) > TEXT_CHARS,
        "message_id": header_text(message, "message-id") or None,
        "date": date_of(message),
        "attachments": [entry for _part, entry in attachments],
    }


def attachment_path(sha256: str) -> Path:
    """Where an attachment with this digest is kept: named by the digest alone (the
    name the sender gave is never part of a path)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return Path(settings.AGENTOPS_ATTACHMENT_DIR) / sha256[:2] / sha256


def attachment_store(sha256: str, data: bytes) -> Path:
    """Keep ``data`` at ``attachment_path(sha256)``, whole or not at all (written
    aside, then renamed); kept already, it is left as it is."""
    path = attachment_path(sha256)
    if path.exists():
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path
