"""A real SMTP server for the tests: aiosmtpd on 127.0.0.1, in a thread of the test
process, keeping every message it accepts so the test reads them directly.

    with smtp_peer(refuse={"gone@example.com": "550 5.1.1 no such mailbox"}) as peer:
        settings.EMAIL_PORT = peer.port
        ...
        assert peer.messages[0].rcpt_tos == ["ann@example.com"]
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

HOST = "127.0.0.1"  # named: aiosmtpd's default binds ::1 only


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


def free_port() -> int:
    """A port nobody listens on now. aiosmtpd cannot bind port 0, so the test picks one;
    another process could take it before the server binds, hence the retries below."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class RecordingHandler:
    """Accepts what it is sent, except the recipients in ``refuse`` (address -> the
    reply, such as ``"550 5.1.1 no such mailbox"``); at a recipient in ``hang_up`` it
    drops the connection without a word. With ``reply_delay``, the server
    keeps the message, then waits that long before it answers the end of DATA: a client
    that times out first cannot know the message arrived."""

    def __init__(
        self, *, refuse: Mapping[str, str], hang_up: Collection[str], reply_delay: float
    ) -> None:
        self.refuse = {address.lower(): reply for address, reply in refuse.items()}
        self.hang_up = {address.lower() for address in hang_up}
        self.reply_delay = reply_delay
        self.messages: list[Received] = []
        self._lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address.lower() in self.hang_up:
            server.transport.close()
            return "250 OK"  # never arrives: the connection is gone
        refusal = self.refuse.get(address.lower())
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append(
                Received(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    message=message,
                )
            )
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        return "250 Message accepted for delivery"


class SmtpPeer:
    def __init__(self, handler: RecordingHandler, controller: Controller) -> None:
        self.handler = handler
        self.controller = controller
        self.host = HOST
        self.port: int = controller.port

    @property
    def messages(self) -> list[Received]:
        with self.handler._lock:
            return list(self.handler.messages)


@contextmanager
def smtp_peer(
    *,
    refuse: Mapping[str, str] | None = None,
    hang_up: Collection[str] = (),
    reply_delay: float = 0.0,
    attempts: int = 5,
) -> Iterator[SmtpPeer]:
    """Start the server on a free port; stop it (cancelling any reply still waiting)
    when the block ends, however it ends."""
    handler = RecordingHandler(refuse=refuse or {}, hang_up=hang_up, reply_delay=reply_delay)
    controller = None
    last_error: Exception | None = None
    for _ in range(attempts):
        candidate = Controller(handler, hostname=HOST, port=free_port(), ready_timeout=5.0)
        try:
            candidate.start()
        except (OSError, RuntimeError, TimeoutError) as error:  # the port was taken meanwhile
            last_error = error
            candidate.stop(no_assert=True)
            continue
        controller = candidate
        break
    if controller is None:
        raise RuntimeError(f"the SMTP peer did not start in {attempts} tries: {last_error}")
    try:
        yield SmtpPeer(handler, controller)
    finally:
        controller.stop()


def smtp_settings(settings: Any, peer_or_port: SmtpPeer | int, *, timeout: float = 5.0) -> None:
    """Point Django at a real SMTP server (the test settings send mail to memory)."""
    port = peer_or_port if isinstance(peer_or_port, int) else peer_or_port.port
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = HOST
    settings.EMAIL_PORT = port
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = timeout
