"""The demo's triggers: the reconcile task runs every night, and when the accounting
system says a month's batch is closed (a signed webhook).

For the demo only, the webhook's URL and signing secret are fixed, so the guide's curl
line works as printed. A real trigger's URL is unguessable and its secret is random,
shown once when it is made.
"""

from __future__ import annotations

import base64
import json
import shlex

from tasks.models import Task, Trigger

# 32 bytes, known to everyone who reads this file: a demo's secret, never a real one.
DEMO_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"agentops-demo-only-signing-key!!").decode()
DEMO_WEBHOOK_PUBLIC_ID = "demo-batch-closed"
# What the accounting system posts when it closes a month (the mapping keeps the batch).
DEMO_WEBHOOK_BODY = {
    "type": "batch.closed",
    "data": {"batch": "2026-11", "closed_by": "erp", "invoices": 8},
}
DEMO_WEBHOOK_MAPPING = "{batch: data.batch}"


def demo_triggers_create(task: Task) -> list[Trigger]:
    """The nightly schedule and the batch-closed webhook, made on the demo's task."""
    nightly = Trigger.objects.create(
        task=task,
        kind=Trigger.Kind.CRON,
        name="Reconcile every night",
        config={
            "expression": "0 2 * * *",
            "timezone": "UTC",
            "overlap": "skip",
            "missed": "skip",
            "input": {"batch": "2026-11"},
        },
        # A slot brings the input with its time added (slot, scheduled_for); the task's
        # input takes the batch only.
        input_mapping="{batch: batch}",
    )
    webhook = Trigger.objects.create(
        task=task,
        kind=Trigger.Kind.WEBHOOK,
        name="Batch closed (accounting webhook)",
        config={"tolerance_seconds": 300},
        input_mapping=DEMO_WEBHOOK_MAPPING,
        public_id=DEMO_WEBHOOK_PUBLIC_ID,
        secret=DEMO_WEBHOOK_SECRET,
        max_per_minute=10,
        max_per_hour=100,
    )
    return [nightly, webhook]


def webhook_curl(*, url: str, secret: str, body: object) -> str:
    """A bash snippet that signs ``body`` as Standard Webhooks do (HMAC-SHA256 over
    "id.timestamp.body" with the secret's bytes, base64) with openssl, and POSTs it."""
    text = json.dumps(body, separators=(",", ":"))
    return "\n".join(
        [
            f"SECRET={shlex.quote(secret)} URL={shlex.quote(url)} BODY={shlex.quote(text)}",
            'ID="msg_$(date +%s%N)" TS=$(date +%s)',
            'SIG=$(printf %s "$ID.$TS.$BODY" | openssl dgst -sha256 -mac HMAC -macopt '
            '"hexkey:$(printf %s "${SECRET#whsec_}" | base64 -d | od -An -vtx1 | tr -d \' \\n\')" '
            "-binary | base64)",
            'curl -sS "$URL" -H \'content-type: application/json\' -H "webhook-id: $ID" '
            '-H "webhook-timestamp: $TS" -H "webhook-signature: v1,$SIG" --data "$BODY"',
        ]
    )


# The support inbox and the lead webhook ---------------------------------------------

# The sample tickets' senders are at these domains (demo/helpdesk.py's customers).
DEMO_SUPPORT_SENDERS = ["@example.com", "@example.org", "@example.net"]
DEMO_SUPPORT_MAPPING = "{sender: from, sender_name: from_name, subject: subject, text: text}"

# 32 bytes, known to everyone who reads this file: a demo's secret, never a real one.
DEMO_LEAD_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"agentops-demo-lead-signing-key!!").decode()
DEMO_LEAD_WEBHOOK_PUBLIC_ID = "demo-lead-created"
DEMO_LEAD_MAPPING = (
    "{name: data.name, email: data.email, domain: data.company_domain, message: data.message}"
)


def support_triggers_create(task: Task, *, address: str) -> list[Trigger]:
    """The support inbox: an email to ``address`` from a listed domain starts a run."""
    inbox = Trigger.objects.create(
        task=task,
        kind=Trigger.Kind.EMAIL,
        name="Support inbox (inbound email)",
        config={"address": address, "senders": DEMO_SUPPORT_SENDERS, "max_attachments": 3},
        input_mapping=DEMO_SUPPORT_MAPPING,
        max_per_minute=20,
        max_per_hour=200,
    )
    return [inbox]


def lead_triggers_create(task: Task) -> list[Trigger]:
    """The website form's webhook: a signed ``lead.created`` delivery starts a run."""
    webhook = Trigger.objects.create(
        task=task,
        kind=Trigger.Kind.WEBHOOK,
        name="Lead created (website form webhook)",
        config={"tolerance_seconds": 300},
        input_mapping=DEMO_LEAD_MAPPING,
        public_id=DEMO_LEAD_WEBHOOK_PUBLIC_ID,
        secret=DEMO_LEAD_WEBHOOK_SECRET,
        max_per_minute=20,
        max_per_hour=200,
    )
    return [webhook]


def webhook_signed_headers(*, secret: str, body: bytes, msg_id: str, timestamp: int) -> dict:
    """The three Standard Webhooks headers of a delivery of ``body`` signed with
    ``secret`` (what demo_post_lead sends, and the tests)."""
    from triggers.webhooks import webhook_sign

    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_sign(
            secret=secret, msg_id=msg_id, timestamp=timestamp, body=body
        ),
    }
