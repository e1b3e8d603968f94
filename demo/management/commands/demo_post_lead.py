"""``manage.py demo_post_lead NAME``: post one of the bundled sample leads
(demo/data/leads/NAME.json) to the lead webhook, signed as Standard Webhooks sign (with
the trigger's current secret, read from the database), as the website's form would."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

from django.core.management.base import BaseCommand, CommandError

from demo.crm import lead_files
from demo.triggers import DEMO_LEAD_WEBHOOK_PUBLIC_ID, webhook_signed_headers
from tasks.models import Trigger
from triggers.selectors import webhook_path
from triggers.services import trigger_secrets


class Command(BaseCommand):
    help = "Post a bundled sample lead to the demo's lead webhook, signed."

    def add_arguments(self, parser):
        parser.add_argument("lead", choices=sorted(lead_files()), help="which lead")
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")
        parser.add_argument(
            "--id", default="", help="the webhook-id (a retry keeps it); new by default"
        )

    def handle(self, *args, **options):
        trigger = Trigger.objects.filter(
            kind=Trigger.Kind.WEBHOOK, public_id=DEMO_LEAD_WEBHOOK_PUBLIC_ID
        ).first()
        if trigger is None or not trigger.enabled:
            raise CommandError(
                f"there is no enabled webhook trigger {DEMO_LEAD_WEBHOOK_PUBLIC_ID!r}: run "
                "`manage.py load_demo` (or enable it in the admin)"
            )
        secrets = trigger_secrets(trigger)
        if not secrets:
            raise CommandError(f"the trigger {trigger.name!r} has no signing secret")
        body = json.dumps(
            json.loads(lead_files()[options["lead"]].read_text()), separators=(",", ":")
        ).encode()
        headers = webhook_signed_headers(
            secret=secrets[0],
            body=body,
            msg_id=options["id"] or f"msg_{uuid.uuid4().hex}",
            timestamp=int(time.time()),
        )
        url = options["base_url"].rstrip("/") + webhook_path(trigger)
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, answer = response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            answer = error.read().decode(errors="replace")
            raise CommandError(f"{url} refused the lead: {error.code} {answer}") from None
        except (urllib.error.URLError, OSError) as error:
            raise CommandError(
                f"could not reach {url} ({error}): is the demo running (make demo)?"
            ) from None
        self.stdout.write(f"{options['lead']}: {status} {answer}")
