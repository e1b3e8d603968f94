"""Inbound-email triggers over real SMTP: the listener (aiosmtpd) on 127.0.0.1, mail
sent with smtplib. A message from a listed sender starts a run with its subject, text,
sender and attachments mapped; the same message again starts nothing more; a sender not
on the list, a DKIM signature that does not verify, or too large an attachment is
refused with a reply naming why, and records nothing."""

from __future__ import annotations

import base64
import hashlib
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from django.db import DataError, OperationalError

from tasks.models import Run, Trigger
from tests.peers.smtp import HOST, free_port
from triggers import inbound_email
from triggers.config import config_errors
from triggers.inbound_email import (
    EmailRoute,
    InboundEmailHandler,
    dkim_dns,
    dkim_problem,
    smtp_listener,
)
from triggers.models import Firing

pytestmark = pytest.mark.django_db(transaction=True)

ADDRESS = "invoices@agentops.test"
SCHEMA = {
    "type": "object",
    "required": ["subject", "body", "sender"],
    "properties": {
        "subject": {"type": "string", "minLength": 1},
        "body": {"type": "string"},
        "sender": {"type": "string"},
        "files": {"type": "array"},
    },
}
MAPPING = "{subject: subject, body: text, sender: from, files: attachments}"


@pytest.fixture
def attachments_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "attachments"
    monkeypatch.setattr(settings, "AGENTOPS_ATTACHMENT_DIR", path)
    return path


@pytest.fixture
def listening(attachments_dir) -> Iterator[Callable[..., int]]:
    """``listening(trigger, ...)``: an SMTP listener for the triggers on a free port
    of 127.0.0.1 (stopped after the test); returns the port."""
    started = []

    def start(*triggers: Trigger) -> int:
        handler = InboundEmailHandler()
        handler.routes_set([EmailRoute.of(trigger) for trigger in triggers])
        port = free_port()
        listener = smtp_listener(handler, host=HOST, port=port)
        listener.start()
        started.append(listener)
        return port

    yield start
    for listener in started:
        listener.stop()


def email_trigger(make_trigger, **config) -> Trigger:
    return make_trigger(
        Trigger.Kind.EMAIL,
        config={"address": ADDRESS, "senders": ["ann@example.com", "@example.org"], **config},
        input_mapping=MAPPING,
        input_schema=SCHEMA,
    )


def message(
    *,
    sender: str = "ann@example.com",
    to: str = ADDRESS,
    subject: str = "Invoice batch 42",
    text: str = "Please reconcile the attached batch.\n",
    message_id: str | None = "<batch-42@example.com>",
    attachments: list[tuple[str, bytes, str]] = (),
) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = f"Ann Example <{sender}>"
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = "Tue, 01 Dec 2026 09:30:00 +0000"
    if message_id:
        mail["Message-ID"] = message_id
    mail.set_content(text)
    for name, data, kind in attachments:
        maintype, subtype = kind.split("/")
        mail.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return mail


def send(port: int, mail: EmailMessage | bytes, *, sender: str = "", to: str = ADDRESS) -> dict:
    """Send over SMTP; what smtplib returns (the refused recipients), or it raises."""
    with smtplib.SMTP(HOST, port, timeout=20) as client:
        if isinstance(mail, bytes):
            return client.sendmail(sender, [to], mail)
        return client.send_message(mail, from_addr=sender or None, to_addrs=[to])


def test_an_email_starts_a_run_with_its_subject_text_and_sender_mapped(make_trigger, listening):
    trigger = email_trigger(make_trigger)
    port = listening(trigger)

    assert send(port, message()) == {}

    run = Run.objects.get()
    assert run.trigger == trigger and run.trigger_kind == "email"
    assert run.input == {
        "subject": "Invoice batch 42",
        "body": "Please reconcile the attached batch.\n",
        "sender": "ann@example.com",
        "files": [],
    }
    firing = Firing.objects.get()
    assert firing.key == "<batch-42@example.com>"
    assert firing.payload["from_name"] == "Ann Example" and firing.payload["to"] == ADDRESS
    assert firing.payload["date"] == "2026-12-01T09:30:00+00:00"


def test_the_same_message_delivered_again_starts_one_run(make_trigger, listening):
    port = listening(email_trigger(make_trigger))
    send(port, message())
    with smtplib.SMTP(HOST, port, timeout=20) as client:
        client.ehlo()
        client.mail("ann@example.com")
        client.rcpt(ADDRESS)
        code, said = client.data(message().as_bytes(policy=SMTP_POLICY))
    run = Run.objects.get()
    assert code == 250 and f"already received: run {run.pk}" in said.decode()
    assert Firing.objects.count() == 1


def test_a_message_without_a_message_id_is_keyed_by_its_digest(make_trigger, listening):
    port = listening(email_trigger(make_trigger))
    send(port, message(message_id=None))
    send(port, message(message_id=None))
    assert Run.objects.count() == 1
    assert Firing.objects.get().key.startswith("sha256:")


def test_mail_to_an_address_no_trigger_has_is_refused_at_rcpt(make_trigger, listening):
    port = listening(email_trigger(make_trigger))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(port, message(to="nobody@agentops.test"), to="nobody@agentops.test")
    code, said = refused.value.recipients["nobody@agentops.test"]
    assert code == 550 and b"no trigger takes mail at this address" in said
    assert Firing.objects.count() == 0


def test_a_sender_not_on_the_list_is_refused_and_nothing_is_recorded(make_trigger, listening):
    port = listening(email_trigger(make_trigger))

    # The envelope sender, at RCPT.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(port, message(sender="mallory@evil.test"))
    code, said = refused.value.recipients[ADDRESS]
    assert code == 550 and b"the sender <mallory@evil.test> may not send to" in said

    # The From header, with an envelope sender on the list, at DATA.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message(sender="mallory@evil.test"), sender="ann@example.com")
    assert refused.value.smtp_code == 550
    assert b"the From address <mallory@evil.test> may not send" in refused.value.smtp_error

    # A listed domain is that domain, not its subdomains.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(port, message(sender="bob@sub.example.org"))
    assert send(port, message(sender="bob@example.org", message_id="<b@example.org>")) == {}

    assert Firing.objects.count() == 1 and Run.objects.count() == 1


@pytest.mark.parametrize(
    "headers",
    [
        b"From: ann@example.com\r\nFrom: mallory@evil.test\r\n",
        b"From: ann@example.com, mallory@evil.test\r\n",
        b"From: not an address at all\r\n",
        b"",
    ],
)
def test_a_message_without_exactly_one_from_address_is_refused(make_trigger, listening, headers):
    port = listening(email_trigger(make_trigger))
    raw = headers + b"To: " + ADDRESS.encode() + b"\r\nSubject: s\r\n\r\nbody\r\n"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, raw, sender="ann@example.com")
    assert refused.value.smtp_code == 550
    assert b"one From header with one address" in refused.value.smtp_error
    assert Firing.objects.count() == 0


def test_attachments_are_stored_by_their_digest_and_their_names_never_become_paths(
    make_trigger, listening, attachments_dir
):
    port = listening(email_trigger(make_trigger))
    pdf = b"%PDF-1.4 the batch\n" * 100
    send(
        port,
        message(
            attachments=[
                ("../../etc/passwd", b"root:x:0:0\n", "text/plain"),
                ("batch.pdf", pdf, "application/pdf"),
            ]
        ),
    )

    files = Run.objects.get().input["files"]
    digest = hashlib.sha256(pdf).hexdigest()
    assert files[1] == {
        "filename": "batch.pdf",
        "content_type": "application/pdf",
        "bytes": len(pdf),
        "sha256": digest,
    }
    assert files[0]["filename"] == "passwd"
    assert (attachments_dir / digest[:2] / digest).read_bytes() == pdf
    stored = sorted(p.name for p in attachments_dir.rglob("*") if p.is_file())
    assert stored == sorted([digest, files[0]["sha256"]])  # nothing else, nothing elsewhere


def test_too_many_or_too_large_attachments_are_refused_naming_the_limit(
    make_trigger, listening, attachments_dir
):
    port = listening(email_trigger(make_trigger, max_attachment_bytes=1000, max_attachments=2))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message(attachments=[("big.bin", b"x" * 1001, "application/octet-stream")]))
    assert refused.value.smtp_code == 552
    assert b"the attachment 'big.bin' is 1001 bytes" in refused.value.smtp_error
    three = [(f"{n}.txt", b"n", "text/plain") for n in range(3)]
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message(attachments=three))
    assert b"the message has 3 attachments" in refused.value.smtp_error
    assert Firing.objects.count() == 0 and not attachments_dir.exists()


def test_a_message_over_the_size_limit_is_refused(make_trigger, listening):
    port = listening(email_trigger(make_trigger, max_attachments=0))
    huge = message(text=("y" * 76 + "\n") * 20_000)  # about 1.5 MiB, over 1 MiB
    with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as refused:
        send(port, huge)
    assert refused.value.smtp_code == 552
    assert Firing.objects.count() == 0


def test_refused_input_is_a_recorded_refusal_and_a_550_naming_the_field(make_trigger, listening):
    port = listening(email_trigger(make_trigger))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message(subject=""))
    assert refused.value.smtp_code == 550
    assert b"subject: '' should be non-empty" in refused.value.smtp_error
    assert Firing.objects.get().refusal == Firing.Refusal.INPUT and Run.objects.count() == 0


def test_over_the_rate_limit_the_sender_is_told_to_try_again_later(make_trigger, listening):
    trigger = email_trigger(make_trigger)
    trigger.max_per_minute = 1
    trigger.save()
    port = listening(trigger)
    send(port, message())
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(port, message(message_id="<second@example.com>"))
    assert deferred.value.smtp_code == 451 and b"rate limit" in deferred.value.smtp_error


def test_one_trigger_a_message_a_second_recipient_is_told_to_send_again(make_trigger, listening):
    first = email_trigger(make_trigger)
    second = make_trigger(
        Trigger.Kind.EMAIL, config={"address": "leads@agentops.test", "senders": ["@example.com"]}
    )
    port = listening(first, second)
    with smtplib.SMTP(HOST, port, timeout=20) as client:
        refused = client.sendmail(
            "ann@example.com",
            [ADDRESS, "leads@agentops.test"],
            message().as_bytes(policy=SMTP_POLICY),
        )
    assert refused["leads@agentops.test"][0] == 452
    assert Run.objects.get().trigger == first


# DKIM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> tuple[bytes, str]:
    """An RSA key: its private half (PEM, as dkimpy signs with) and its DNS record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()


SIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"content-type",
    b"content-transfer-encoding",
    b"mime-version",
]


def signed(
    mail: EmailMessage,
    private: bytes,
    *,
    domain: str = "example.com",
    include_headers: list[bytes] = SIGNED_HEADERS,
) -> bytes:
    raw = mail.as_bytes(policy=SMTP_POLICY)
    header = dkim.sign(
        raw,
        b"mail",
        domain.encode(),
        private,
        include_headers=include_headers,
    )
    return header + raw


def dkim_trigger(make_trigger, record: str, *, domain: str = "example.com") -> Trigger:
    return email_trigger(make_trigger, dkim=True, dkim_keys={f"mail._domainkey.{domain}": record})


def test_a_dkim_signed_message_verifies_against_a_pinned_key(make_trigger, listening, signing_key):
    private, record = signing_key
    port = listening(dkim_trigger(make_trigger, record))
    assert send(port, signed(message(), private), sender="ann@example.com") == {}
    assert Run.objects.get().input["subject"] == "Invoice batch 42"


def test_a_tampered_or_unsigned_message_is_refused_when_dkim_is_required(
    make_trigger, listening, signing_key
):
    private, record = signing_key
    port = listening(dkim_trigger(make_trigger, record))
    tampered = signed(message(), private).replace(b"reconcile", b"pay out")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, tampered, sender="ann@example.com")
    assert refused.value.smtp_code == 550
    assert (
        b"DKIM:" in refused.value.smtp_error and b"body hash mismatch" in refused.value.smtp_error
    )

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message(message_id="<unsigned@example.com>"))
    assert b"no DKIM signature" in refused.value.smtp_error
    assert Firing.objects.count() == 0 and Run.objects.count() == 0


def test_a_valid_signature_of_another_domain_does_not_vouch_for_the_from_address(
    make_trigger, listening, signing_key
):
    private, record = signing_key
    trigger = email_trigger(
        make_trigger, dkim=True, dkim_keys={"mail._domainkey.evil.test": record}
    )
    port = listening(trigger)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, signed(message(), private, domain="evil.test"), sender="ann@example.com")
    assert b"the signature is evil.test's, not the From domain's (example.com)" in (
        refused.value.smtp_error
    )


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"dkim_keys": {"mail._domainkey.example.com": "v=DKIM1; p=AAAA"}},
         "config/dkim_keys: pinned DKIM keys are read only when dkim is true"),
        ({"dkim": True, "dkim_keys": {"mail._domainkey.example.com": "v=DKIM1; k=rsa"}},
         "config/dkim_keys/mail._domainkey.example.com: no public key (p=)"),
        ({"dkim": True, "dkim_keys": {"mail._domainkey.example.com": "v=DKIM1; p=***"}},
         "p= is not base64"),
        ({"dkim": True, "dkim_keys": {"example.com": "v=DKIM1; p=AAAA"}}, "does not match"),
    ],
)  # fmt: skip
def test_a_bad_pinned_dkim_key_is_refused_naming_it(config, said):
    full = {"address": ADDRESS, "senders": ["@example.com"], **config}
    errors = config_errors(kind="email", config=full)
    assert any(said in error for error in errors), errors


def test_a_good_pinned_dkim_key_passes(signing_key):
    _private, record = signing_key
    config = {
        "address": ADDRESS,
        "senders": ["@example.com"],
        "dkim": True,
        "dkim_keys": {"mail._domainkey.example.com": record},
    }
    assert config_errors(kind="email", config=config) == []


@pytest.mark.parametrize(
    "forged",
    [
        b"Subject: URGENT: wire 50000 EUR to IBAN XX00 EVIL\r\n",
        b"Message-ID: <fresh-2@example.com>\r\n",
        b"Date: Wed, 02 Dec 2026 09:30:00 +0000\r\n",
        b"Content-Type: text/html\r\n",
        b"To: someone-else@example.com\r\n",
    ],
)
def test_a_header_prepended_above_a_signed_message_is_refused(
    make_trigger, listening, signing_key, forged
):
    """DKIM verifies the bottom copy of a header; the payload would read the top one.
    A second copy of any header the payload reads is refused, whatever verifies."""
    private, record = signing_key
    port = listening(dkim_trigger(make_trigger, record))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, forged + signed(message(), private), sender="ann@example.com")
    assert refused.value.smtp_code == 550
    assert b"DKIM: the message has more than one" in refused.value.smtp_error
    assert Firing.objects.count() == 0 and Run.objects.count() == 0
    # The message as it was signed still passes.
    assert send(port, signed(message(), private), sender="ann@example.com") == {}
    assert Run.objects.get().input["subject"] == "Invoice batch 42"


def test_a_bare_line_feed_in_the_headers_is_refused_when_dkim_is_required(
    make_trigger, listening, signing_key
):
    """Python's parser ends a header line at a lone LF; dkimpy reads on to the CRLF."""
    private, record = signing_key
    port = listening(dkim_trigger(make_trigger, record))
    raw = signed(message(), private)
    forged = raw.replace(b"Subject: Invoice batch 42\r\n", b"Subject: Invoice batch 42\nX: y\r\n")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, forged, sender="ann@example.com")
    assert b"line end other than CRLF" in refused.value.smtp_error


@pytest.mark.parametrize(
    ("left_out", "said"),
    [
        (b"subject", b"does not sign the subject header"),
        (b"message-id", b"does not sign the message-id header"),
        (b"content-type", b"does not sign the content-type header"),
    ],
)
def test_a_signature_that_leaves_out_a_header_the_payload_reads_is_refused(
    make_trigger, listening, signing_key, left_out, said
):
    private, record = signing_key
    port = listening(dkim_trigger(make_trigger, record))
    headers = [name for name in SIGNED_HEADERS if name != left_out]
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, signed(message(), private, include_headers=headers), sender="ann@example.com")
    assert said in refused.value.smtp_error and Run.objects.count() == 0


def test_a_signature_of_another_domain_is_set_aside_before_any_key_lookup(signing_key):
    private, _record = signing_key
    looked_up = []

    def recording(name, timeout=5):
        looked_up.append(name)
        return None

    raw = signed(message(), private, domain="attacker.test")
    problem = dkim_problem(raw, "ann@example.com", recording)
    assert "the signature is attacker.test's, not the From domain's (example.com)" in problem
    assert looked_up == []


def test_pinned_keys_are_the_only_keys_no_dns_for_a_name_not_pinned(monkeypatch, signing_key):
    _private, record = signing_key

    def no_dns(*args, **kwargs):
        raise AssertionError("DNS was asked though keys are pinned")

    monkeypatch.setattr(inbound_email.dkim.dnsplug, "get_txt", no_dns)
    txt = dkim_dns({"mail._domainkey.example.com": record})
    assert txt(b"mail._domainkey.example.com.") == record.encode()
    assert txt(b"other._domainkey.example.com.") is None


def test_dkim_checking_stops_at_its_deadline(signing_key):
    private, record = signing_key
    raw = signed(message(), private)
    pinned = dkim_dns({"mail._domainkey.example.com": record})
    assert dkim_problem(raw, "ann@example.com", pinned) == ""
    problem = dkim_problem(raw, "ann@example.com", pinned, deadline_seconds=0)
    assert "out of time" in problem


@pytest.mark.parametrize(
    ("error", "code", "said"),
    [
        (DataError("value too long for type character varying(200)"), 550, b"DataError"),
        (OperationalError("server closed the connection unexpectedly"), 451, b"try again"),
    ],
)
def test_a_value_the_database_refuses_is_permanent_a_lost_connection_is_not(
    make_trigger, listening, monkeypatch, error, code, said
):
    """The database's refusal of the message itself (a DataError: it would refuse it
    on every try) is a 550; a lost connection is a 451, the sender tries again. The
    fault is injected: services.py makes what a message can carry storable."""

    def refusing(**kwargs):
        raise error

    monkeypatch.setattr(inbound_email, "trigger_fire", refusing)
    port = listening(email_trigger(make_trigger))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message())
    assert refused.value.smtp_code == code and said in refused.value.smtp_error


def greeting(port: int) -> tuple[socket.socket, bytes]:
    client = socket.create_connection((HOST, port), timeout=10)
    return client, client.recv(512)


def test_connections_past_the_limit_are_told_421_and_let_go(make_trigger, attachments_dir):
    handler = InboundEmailHandler()
    handler.routes_set([EmailRoute.of(email_trigger(make_trigger))])
    port = free_port()
    listener = smtp_listener(handler, host=HOST, port=port, sessions_max=2)
    listener.start()
    held = []
    try:
        for _ in range(2):
            client, said = greeting(port)
            held.append(client)
            assert said.startswith(b"220 ")
        extra, said = greeting(port)
        assert said.startswith(b"421 4.3.2 too many connections")
        assert extra.recv(512) == b""  # closed by the listener
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the freed place is counted once the listener sees the close
            client, said = greeting(port)
            if said.startswith(b"220 ") or time.monotonic() > deadline:
                break
            client.close()
            time.sleep(0.05)
        held.append(client)
        assert said.startswith(b"220 ")
        # A place held by a session serves mail as before.
        held.pop().close()
        time.sleep(0.2)
        assert send(port, message()) == {}
    finally:
        for client in held:
            client.close()
        listener.stop()
    assert Run.objects.count() == 1
