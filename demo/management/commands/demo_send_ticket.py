"""``manage.py demo_send_ticket NAME``: email one of the bundled sample tickets
(demo/data/tickets/NAME.eml) to the support inbox, over SMTP, as a customer's mail
server would: to the inbound-email listener that ``make demo`` (``manage.py serve``)
runs at AGENTOPS_SMTP_LISTEN_HOST:PORT. The listener's reply says which run started."""

from __future__ import annotations

import smtplib
from email import policy
from email.parser import BytesParser
from email.utils import make_msgid

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from demo.helpdesk import SUPPORT_ADDRESS, ticket_files


class Command(BaseCommand):
    help = "Email a bundled sample ticket to the demo's support inbox (the SMTP listener)."

    def add_arguments(self, parser):
        names = sorted(ticket_files())
        parser.add_argument("ticket", nargs="?", choices=[*names, "all"], help="which ticket")
        parser.add_argument("--host", default=settings.AGENTOPS_SMTP_LISTEN_HOST)
        parser.add_argument("--port", type=int, default=settings.AGENTOPS_SMTP_LISTEN_PORT)
        parser.add_argument("--to", default=SUPPORT_ADDRESS, help="the support address")
        parser.add_argument(
            "--keep-message-id",
            action="store_true",
            help="send the file's own Message-ID (sent twice, it starts one run); by "
            "default each send gets a new one, so each is a new ticket",
        )

    def handle(self, *args, **options):
        files = ticket_files()
        if not options["ticket"]:
            raise CommandError(f"name a ticket: one of {', '.join(sorted(files))}, or all")
        names = sorted(files) if options["ticket"] == "all" else [options["ticket"]]
        for name in names:
            reply = self.ticket_send(files[name].read_bytes(), name=name, **options)
            self.stdout.write(f"{name}: {reply}")

    def ticket_send(self, content: bytes, *, name: str, **options) -> str:
        message = BytesParser(policy=policy.SMTP).parsebytes(content)
        if not options["keep_message_id"]:
            del message["Message-ID"]
            message["Message-ID"] = make_msgid(domain="demo.agentops")
        sender = message["From"].addresses[0].addr_spec
        where = f"{options['host']}:{options['port']}"
        try:
            with smtplib.SMTP(options["host"], options["port"], timeout=30) as client:
                client.ehlo()
                code, said = client.mail(sender)
                if code != 250:
                    raise CommandError(f"{name}: the listener refused the sender: {code} {said}")
                code, said = client.rcpt(options["to"])
                if code not in (250, 251):
                    raise CommandError(
                        f"{name}: the listener refused <{options['to']}>: {code} "
                        f"{said.decode(errors='replace')}"
                    )
                code, said = client.data(message.as_bytes())
        except smtplib.SMTPDataError as error:
            raise CommandError(
                f"{name}: the listener refused the message: {error.smtp_code} "
                f"{error.smtp_error.decode(errors='replace')}"
            ) from None
        except (ConnectionError, TimeoutError, OSError) as error:
            raise CommandError(
                f"nothing took the mail at {where} ({error}): is the demo running (make demo, "
                "or manage.py serve)? Its listener takes mail while an email trigger is enabled."
            ) from None
        return f"{code} {said.decode(errors='replace')}"
