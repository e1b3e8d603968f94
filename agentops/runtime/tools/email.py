"""Email tools: a message sent through Django's email backend (SMTP in production).

A tool row of kind ``email`` holds its policy in ``config``::

    {"allowed_domains": ["example.com", ".example.org"],  # required
     "from": "agentops@example.com",                       # else DEFAULT_FROM_EMAIL
     "subject_prefix": "[agentops] ",                      # prepended as written
     "max_recipients": 10}

A recipient's domain must equal an entry, or, for an entry that starts with a dot, be
that domain or one of its subdomains (as Django's ALLOWED_HOSTS reads ``.example.org``).
The arguments are ``to`` (an address or a list of them), ``subject``, ``body`` and
optionally ``cc``; bare addresses only, no display names.

Sending cannot be undone and SMTP has no idempotency keys, so such a tool is
``irreversible`` with idempotency ``none``. The call's key still travels in the
``X-Agentops-Idempotency-Key`` header, and the Message-ID is derived from it, so a
message sent again for the same step carries the same Message-ID (which many mailbox
providers use to drop a duplicate).

The SMTP host and its credentials are Django's settings (EMAIL_HOST...), not the tool's
config, so there is no ``secret:NAME`` to resolve here.
"""

from __future__ import annotations

import logging
import re
import smtplib
from dataclasses import dataclass
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMessage, get_connection
from django.core.mail.utils import DNS_NAME
from django.core.validators import validate_email
from django.utils.encoding import punycode

from agentops.runtime.tools.base import ToolContext, ToolResult, arguments_errors

if TYPE_CHECKING:
    from tasks.models import Tool

logger = logging.getLogger("agentops.tools.email")

CONFIG_KEYS = ("allowed_domains", "from", "subject_prefix", "max_recipients")
DEFAULT_MAX_RECIPIENTS = 10
IDEMPOTENCY_HEADER = "X-Agentops-Idempotency-Key"
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_ENTRY = re.compile(rf"\.?{LABEL}(?:\.{LABEL})*")


class EmailExecutor:
    def config_errors(self, config: dict) -> list[str]:
        """Every problem with an email tool's config, each naming its key."""
        if not isinstance(config, dict):
            return ["the config must be a JSON object"]
        errors = [
            f"unknown key {key!r} (an email tool takes {', '.join(CONFIG_KEYS)})"
            for key in sorted(set(config) - set(CONFIG_KEYS))
        ]
        errors += allowed_domains_errors(config)
        if "from" in config:
            sender = config["from"]
            if not isinstance(sender, str) or not sender.strip():
                errors.append(
                    "from: give an address, or leave the key out to send from DEFAULT_FROM_EMAIL"
                )
            elif not address_valid(parseaddr(sender)[1]):
                errors.append(f"from: {sender!r} is not a valid email address")
        if "subject_prefix" in config:
            prefix = config["subject_prefix"]
            if not isinstance(prefix, str):
                errors.append(f"subject_prefix: {prefix!r} is not a string")
            elif "\n" in prefix or "\r" in prefix:
                errors.append("subject_prefix: must be one line")
        if "max_recipients" in config:
            limit = config["max_recipients"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                errors.append(f"max_recipients: {limit!r} is not a positive whole number")
        return errors

    def validate(self, tool: Tool, arguments: dict) -> list[str]:
        """The schema's errors, then the message's own shape (when the schema is looser
        than what sending needs), then the policy: valid addresses, each in an allowed
        domain, no more of them than ``max_recipients``. A tool whose config is broken
        refuses every call rather than send under no policy."""
        errors = arguments_errors(tool.input_schema, arguments)
        config_problems = self.config_errors(tool.config)
        errors += [f"the tool's config is invalid: {problem}" for problem in config_problems]
        if not isinstance(arguments, dict):
            return errors
        if not errors:
            errors += shape_errors(arguments)
        to, cc = recipients_of(arguments.get("to")), recipients_of(arguments.get("cc"))
        errors += addresses_errors("to", to) + addresses_errors("cc", cc)
        if not config_problems:
            errors += policy_errors(tool.config, to, cc)
        return errors

    def execute(self, tool: Tool, arguments: dict, context: ToolContext) -> ToolResult:
        # Checked again at the moment of sending: the config may have been narrowed
        # while the call waited for its approval.
        problems = self.validate(tool, arguments)
        if problems:
            return ToolResult(ok=False, error="not sent: " + "; ".join(problems))
        config = tool.config
        sender = config.get("from") or settings.DEFAULT_FROM_EMAIL
        to, cc = recipients_of(arguments["to"]), recipients_of(arguments.get("cc"))
        subject = config.get("subject_prefix", "") + arguments["subject"]
        message_id = message_id_for(context.idempotency_key, sender)
        message = EmailMessage(
            subject=subject,
            body=arguments["body"],
            from_email=sender,
            to=to,
            cc=cc,
            headers={"Message-ID": message_id, IDEMPOTENCY_HEADER: context.idempotency_key},
        )
        try:
            message.message()  # a header the backend would refuse fails here, unsent
        except ValueError as error:
            return ToolResult(ok=False, error=f"not sent: the message could not be built: {error}")
        connection = get_connection(timeout=tool.timeout_seconds)
        return message_send(connection, message, timeout=tool.timeout_seconds)


# Checks ------------------------------------------------------------------------------


def allowed_domains_errors(config: dict) -> list[str]:
    if "allowed_domains" not in config:
        return [
            "allowed_domains is required: the domains recipients may be in, such as "
            '["example.com", ".example.org"] (the dot admits subdomains)'
        ]
    domains = config["allowed_domains"]
    if not isinstance(domains, list) or not domains:
        return [f"allowed_domains must be a non-empty list of domains, not {domains!r}"]
    errors = []
    for index, entry in enumerate(domains):
        if not isinstance(entry, str):
            errors.append(f"allowed_domains[{index}]: {entry!r} is not a string")
        elif not DOMAIN_ENTRY.fullmatch(domain_normal(entry)):
            errors.append(
                f"allowed_domains[{index}]: {entry!r} is not a domain (write example.com, or "
                ".example.com for it and its subdomains)"
            )
    return errors


def shape_errors(arguments: dict) -> list[str]:
    errors = []
    for name, required in (("to", True), ("cc", False)):
        value = arguments.get(name)
        if value is None:
            if required:
                errors.append(f"{name}: required: an address or a list of addresses")
        elif recipients_of(value) is None:
            errors.append(f"{name}: must be an address or a list of addresses, not {value!r}")
        elif required and not recipients_of(value):
            errors.append(f"{name}: name at least one recipient")
    for name in ("subject", "body"):
        if not isinstance(arguments.get(name), str):
            errors.append(f"{name}: required: a string")
    if "\n" in str(arguments.get("subject", "")) or "\r" in str(arguments.get("subject", "")):
        errors.append("subject: must be one line")
    return errors


def recipients_of(value: Any) -> list[str] | None:
    """The addresses of a ``to`` or ``cc`` argument, or None when it is not one."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


def addresses_errors(name: str, addresses: list[str] | None) -> list[str]:
    return [
        f"{name}: {address!r} is not a valid email address"
        for address in addresses or []
        if not address_valid(address)
    ]


def policy_errors(config: dict, to: list[str] | None, cc: list[str] | None) -> list[str]:
    allowed = config["allowed_domains"]
    errors = []
    for name, addresses in (("to", to or []), ("cc", cc or [])):
        for address in addresses:
            if address_valid(address) and not domain_allowed(address, allowed):
                errors.append(
                    f"{name}: {address} is outside the allowed domains ({', '.join(allowed)})"
                )
    limit = config.get("max_recipients", DEFAULT_MAX_RECIPIENTS)
    count = len({address.lower() for address in [*(to or []), *(cc or [])]})
    if count > limit:
        errors.append(f"the call names {count} recipients (to and cc); this tool allows {limit}")
    return errors


def address_valid(address: str) -> bool:
    try:
        validate_email(address)
    except ValidationError:
        return False
    return True


def domain_normal(domain: str) -> str:
    try:
        return punycode(domain.strip().lower())
    except UnicodeError:
        return domain.strip().lower()


def domain_allowed(address: str, allowed: list[str]) -> bool:
    domain = domain_normal(address.rpartition("@")[2])
    for entry in map(domain_normal, allowed):
        if entry.startswith("."):
            if domain == entry[1:] or domain.endswith(entry):
                return True
        elif domain == entry:
            return True
    return False


def message_id_for(idempotency_key: str, sender: str) -> str:
    """One Message-ID per call, the same for every send of it."""
    left = re.sub(r"[^A-Za-z0-9-]+", ".", idempotency_key).strip(".")
    domain = parseaddr(sender)[1].rpartition("@")[2] or DNS_NAME.get_fqdn()
    return f"<agentops.{left}@{domain}>"


# Sending -----------------------------------------------------------------------------


@dataclass
class SmtpWatch:
    """What Django's SMTP backend does not report about one conversation: whether the
    DATA command went out (from then on a failure may come after the server took the
    message) and which recipients the server refused while accepting the others."""

    data_started: bool = False
    refused: dict[str, tuple[int, bytes]] | None = None

    @classmethod
    def attach(cls, smtp: smtplib.SMTP) -> SmtpWatch:
        # Wrapping two methods of this one connection object, which this call opened
        # and closes, is the only way in: the backend discards sendmail's return value.
        watch = cls()
        data, sendmail = smtp.data, smtp.sendmail

        def watched_data(*args: Any, **kwargs: Any) -> Any:
            watch.data_started = True
            return data(*args, **kwargs)

        def watched_sendmail(*args: Any, **kwargs: Any) -> Any:
            watch.refused = sendmail(*args, **kwargs)
            return watch.refused

        smtp.data = watched_data
        smtp.sendmail = watched_sendmail
        return watch


def message_send(connection: Any, message: EmailMessage, *, timeout: float) -> ToolResult:
    """Send, and on failure say whether anything can have reached the server: a failure
    before the message's data (a refused connection, a 4xx reply) is transient, so the
    engine may try again; one after the data began is not, since the message may be
    delivered."""
    where = f"{getattr(connection, 'host', '')}:{getattr(connection, 'port', '')}".strip(":")
    try:
        try:
            connection.open()
        except OSError as error:  # smtplib's errors are OSErrors too
            return open_failure(error, where=where or "the mail backend", timeout=timeout)
        smtp = getattr(connection, "connection", None)
        watch = SmtpWatch.attach(smtp) if isinstance(smtp, smtplib.SMTP) else None
        try:
            sent = connection.send_messages([message])
        except Exception as error:  # any backend's failure is reported, never raised
            return send_failure(error, watch=watch, timeout=timeout)
        value = {
            "sent": sent,
            "to": message.to,
            "subject": message.subject,
            "message_id": message.extra_headers["Message-ID"],
        }
        if message.cc:
            value["cc"] = message.cc
        if watch is not None and watch.refused:
            value["refused"] = {
                address: reply_words(*reply) for address, reply in watch.refused.items()
            }
            value["note"] = "the server took the message for the other recipients only"
        return ToolResult(ok=True, value=value)
    finally:
        try:
            connection.close()
        except Exception:  # the outcome is known; a failed QUIT changes nothing
            logger.warning("closing the mail connection failed", exc_info=True)


def open_failure(error: OSError, *, where: str, timeout: float) -> ToolResult:
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return ToolResult(
            ok=False,
            error=f"the mail server at {where} refused the login "
            f"({reply_words(error.smtp_code, error.smtp_error)}); nothing was sent",
        )
    if isinstance(error, smtplib.SMTPResponseException):
        return reply_failure(error, f"the mail server at {where} refused the connection")
    if isinstance(error, smtplib.SMTPNotSupportedError):
        return ToolResult(ok=False, error=f"the mail server at {where}: {error}; nothing was sent")
    return ToolResult(
        ok=False,
        error=f"could not reach the mail server at {where} ({failure_words(error, timeout)}); "
        "nothing was sent",
        transient=True,
    )


def send_failure(error: Exception, *, watch: SmtpWatch | None, timeout: float) -> ToolResult:
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        replies = error.recipients.items()
        words = "; ".join(f"{address}: {reply_words(*reply)}" for address, reply in replies)
        return ToolResult(
            ok=False,
            error=f"the mail server refused the recipients ({words}); nothing was sent",
            transient=all(temporary(code) for code, _ in error.recipients.values()),
        )
    if isinstance(error, smtplib.SMTPSenderRefused):
        return reply_failure(error, f"the mail server refused the sender {error.sender}")
    if isinstance(error, smtplib.SMTPDataError):
        return reply_failure(error, "the mail server refused the message")
    if isinstance(error, smtplib.SMTPResponseException):
        return reply_failure(error, "the mail server refused the conversation")
    if isinstance(error, OSError) and watch is not None and not watch.data_started:
        return ToolResult(
            ok=False,
            error=f"the connection to the mail server failed ({failure_words(error, timeout)}) "
            "before the message was handed over; nothing was sent",
            transient=True,
        )
    if watch is not None and watch.data_started:
        return ToolResult(
            ok=False,
            error=f"the mail server did not confirm the message ({failure_words(error, timeout)}) "
            "after its data began: it may have been sent; check with the recipients before "
            "sending it again",
        )
    # Another backend (or a failure this code cannot place): it may have sent.
    return ToolResult(
        ok=False,
        error=f"sending failed ({failure_words(error, timeout)}): the message may have been "
        "sent; check with the recipients before sending it again",
    )


def reply_failure(error: smtplib.SMTPResponseException, what: str) -> ToolResult:
    """An explicit refusal: nothing was accepted. A 4xx reply is SMTP's "try again
    later", so it is transient; a 5xx one goes back to the model in the server's words."""
    return ToolResult(
        ok=False,
        error=f"{what} ({reply_words(error.smtp_code, error.smtp_error)}); nothing was sent",
        transient=temporary(error.smtp_code),
    )


def temporary(code: int) -> bool:
    return 400 <= code < 500


def reply_words(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}".strip()


def failure_words(error: Exception, timeout: float) -> str:
    if isinstance(error, TimeoutError) or "timed out" in str(error):
        return f"no answer within {timeout:g} seconds"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
