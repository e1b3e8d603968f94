"""The demo's tools and its scripted model: reconcile an invoice batch against the
payments received, and email finance a summary once a person approves."""

from __future__ import annotations

import functools

from django.core.mail import EmailMessage

from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import check_turn, script, scripted_turn
from agentops.runtime.tools import ToolContext, ToolError, tool
from demo.ledger import ledger_query
from demo.transcript import plan_steps, run_input, tool_results

BATCH_SCHEMA = {
    "type": "object",
    "properties": {"batch": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}},
    "required": ["batch"],
    "additionalProperties": False,
}


@tool(schema=BATCH_SCHEMA, side_effect="read", idempotent=True)
def ledger_invoices(ctx: ToolContext, *, batch: str) -> dict:
    """List the invoices of a batch (YYYY-MM), with customer and amount in cents."""
    rows = ledger_query(
        "SELECT number, customer, amount_cents FROM invoice WHERE batch = ? ORDER BY number",
        (batch,),
    )
    return {"batch": batch, "invoices": rows}


@tool(schema=BATCH_SCHEMA, side_effect="read", idempotent=True)
def ledger_payments(ctx: ToolContext, *, batch: str) -> dict:
    """List the payments received against the invoices of a batch (YYYY-MM). Example:
    {"batch": "2026-11"}."""
    rows = ledger_query(
        "SELECT p.reference, p.invoice, p.amount_cents FROM payment p "
        "JOIN invoice i ON i.number = p.invoice WHERE i.batch = ? ORDER BY p.reference",
        (batch,),
    )
    return {"batch": batch, "payments": rows}


@tool(
    schema={
        "type": "object",
        "properties": {
            "to": {"type": "string", "format": "email", "pattern": "^[^@\\s]+@[^@\\s]+$"},
            "subject": {"type": "string", "minLength": 1, "maxLength": 200},
            "body": {"type": "string", "minLength": 1},
        },
        "required": ["to", "subject", "body"],
        "additionalProperties": False,
    },
    side_effect="irreversible",
)
def email_send(ctx: ToolContext, *, to: str, subject: str, body: str) -> dict:
    """Send one email. Example: {"to": "finance@example.com", "subject": "Reconciliation
    of batch 2026-11", "body": "..."}."""
    message = EmailMessage(subject=subject, body=body, to=[to])
    message.extra_headers["X-Agentops-Idempotency-Key"] = ctx.idempotency_key
    try:
        sent = message.send(fail_silently=False)
    except OSError as error:
        # Not transient: the server may have taken the message before the error, and
        # sending twice is worse than asking the agent to report the failure.
        raise ToolError(f"the mail server failed: {error}") from error
    return {"sent": sent, "to": to, "subject": subject}


def reconcile(invoices: list[dict], payments: list[dict]) -> list[str]:
    """The scripted model's 'reasoning': compare what was billed with what was paid."""
    paid: dict[str, list[dict]] = {}
    for payment in payments:
        paid.setdefault(payment["invoice"], []).append(payment)
    findings = []
    for invoice in invoices:
        got = paid.get(invoice["number"], [])
        total = sum(p["amount_cents"] for p in got)
        billed = invoice["amount_cents"]
        if not got:
            findings.append(
                f"{invoice['number']} ({invoice['customer']}): no payment received, "
                f"{billed / 100:,.2f} outstanding"
            )
        elif len(got) > 1:
            refs = ", ".join(p["reference"] for p in got)
            findings.append(
                f"{invoice['number']} ({invoice['customer']}): paid {len(got)} times "
                f"({refs}), {(total - billed) / 100:,.2f} overpaid"
            )
        elif total != billed:
            findings.append(
                f"{invoice['number']} ({invoice['customer']}): paid {total / 100:,.2f} "
                f"of {billed / 100:,.2f}, {(billed - total) / 100:,.2f} short"
            )
    return findings


PLAN = [
    "List the invoices of the batch",
    "List the payments received against them",
    "Compare invoices and payments; note every unpaid, short or double payment",
    "Email finance the summary (needs approval)",
    "Report the outcome",
]


plan_update = functools.partial(plan_steps, PLAN)


def batch_of(messages: list[dict]) -> str:
    return str(run_input(messages).get("batch", ""))


def demo_check(messages: list[dict]) -> ModelTurn:
    """The scripted self-check: every mismatch the data shows is in the final answer."""
    done = tool_results(messages)
    final = next(m for m in reversed(messages) if m["role"] == "assistant")["content"] or ""
    findings = reconcile(
        done.get("ledger_invoices", {}).get("invoices", []),
        done.get("ledger_payments", {}).get("payments", []),
    )
    missing = [f for f in findings if f.split(" ", 1)[0] not in final]
    if missing or (not findings and "0 mismatches" not in final):
        return check_turn(0.3, "the answer leaves out: " + "; ".join(missing), objective_met=False)
    email = done.get("email_send", {"error": "not asked for"})
    sent = "error" not in email
    if email.get("simulated"):
        said = "the summary email was simulated (Shadow mode), not sent"
    else:
        said = "the summary email was sent" if sent else "the email was not sent"
    return check_turn(
        0.95 if sent else 0.6,
        f"recomputed {len(findings)} mismatches from the two tool results and found each in "
        f"the answer; {said}",
        objective_met=sent,
    )


@script("invoice-reconcile", check=demo_check)
def invoice_reconcile(messages: list[dict]) -> ModelTurn:
    """A deterministic stand-in for a model, so the demo runs offline. It reads only
    the transcript, as a model would."""
    batch = batch_of(messages)
    done = tool_results(messages)
    turn = sum(1 for m in messages if m["role"] == "assistant")
    usage = {"tokens_in": 400 + 120 * turn, "tokens_out": 60}
    if "ledger_invoices" not in done:
        return scripted_turn(
            {
                "content": f"Plan: list the invoices of batch {batch}, list the payments "
                "against them, compare the two, and email finance a summary of the mismatches.",
                "calls": [
                    plan_update(0, "drafted from the objective"),
                    ("ledger_invoices", {"batch": batch, "_confidence": 0.95}),
                ],
                **usage,
            },
            turn,
        )
    if "ledger_payments" not in done:
        count = len(done["ledger_invoices"].get("invoices", []))
        return scripted_turn(
            {
                "content": f"Found {count} invoices. Next, the payments received against them.",
                "calls": [("ledger_payments", {"batch": batch, "_confidence": 0.95})],
                **usage,
            },
            turn,
        )
    invoices = done["ledger_invoices"].get("invoices", [])
    payments = done["ledger_payments"].get("payments", [])
    findings = reconcile(invoices, payments)
    summary = (
        f"Batch {batch}: {len(invoices)} invoices, {len(payments)} payments, "
        f"{len(findings)} mismatches."
    )
    email = done.get("email_send")
    if email is None:
        if findings:
            listed = "\n".join(f"- {line}" for line in findings)
            body = f"{summary}\n\n{listed}\n\nPlease follow up with the customers above."
        elif invoices:
            body = f"{summary}\n\nEvery invoice is paid in full, once: nothing to follow up."
        else:
            body = f"{summary}\n\nThe ledger has no invoices for this batch."
        body += "\n-- agentops (scripted demo agent)"
        return scripted_turn(
            {
                "content": f"{summary} Emailing finance the list; this is irreversible, so it "
                "needs approval.",
                "calls": [
                    plan_update(3, f"compared: {len(findings)} mismatches"),
                    (
                        "email_send",
                        {
                            "to": "finance@example.com",
                            "subject": f"Reconciliation of batch {batch}: "
                            f"{len(findings)} mismatches",
                            "body": body,
                            "_confidence": 0.9,
                        },
                    ),
                ],
                **usage,
            },
            turn,
        )
    if "error" in email:
        return scripted_turn(
            {
                "content": f"{summary} The summary email was not sent ({email['error']}). "
                "Mismatches:\n" + "\n".join(f"- {line}" for line in findings),
                **usage,
            },
            turn,
        )
    plans = sum(
        1
        for m in messages
        for call in m.get("tool_calls") or []
        if call["function"]["name"] == "plan_update"
    )
    if plans < 3:
        return scripted_turn(
            {
                "content": "The email is sent.",
                "calls": [plan_update(len(PLAN), "the summary email was sent")],
                **usage,
            },
            turn,
        )
    # In Shadow mode the call was recorded, not made: say so rather than claim it.
    emailed = (
        "The email to finance was simulated (Shadow mode), not sent."
        if email.get("simulated")
        else "Finance has the list by email."
    )
    return scripted_turn(
        {
            "content": f"{summary} {emailed}\n" + "\n".join(f"- {line}" for line in findings),
            **usage,
        },
        turn,
    )


# The other two workflows' tools and scripted models register when this module is
# discovered (agentops.apps autodiscovers each app's agent_tools).
from demo import leads, support  # noqa: E402,F401
