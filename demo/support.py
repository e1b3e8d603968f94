"""Support-queue triage: a customer's email arrives at the support address (an
inbound-email trigger); the agent looks the customer up, files the ticket with a
category and a priority, and drafts a reply, which a person reads, may edit, and
approves before it is sent.

The tools are written for small models too: one action each, short descriptions with
an example, and every choice an enumerated value."""

from __future__ import annotations

import functools
import re

from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import check_turn, script, scripted_turn
from agentops.runtime.tools import ToolContext, ToolError, tool
from demo.helpdesk import CATEGORIES, PRIORITIES, helpdesk_path, ticket_label
from demo.store import store_query, write_once
from demo.transcript import plan_steps, run_input, tool_results

EMAIL = {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$", "maxLength": 254}
TICKET = {"type": "string", "pattern": "^T-[0-9]{1,9}$", "description": "e.g. T-1001"}


@tool(
    schema={
        "type": "object",
        "properties": {"email": {**EMAIL, "description": "the sender's address"}},
        "required": ["email"],
        "additionalProperties": False,
    },
    side_effect="read",
    idempotent=True,
)
def helpdesk_customer(ctx: ToolContext, *, email: str) -> dict:
    """Look up a customer by email address. Returns their name, company and plan
    (free, pro or enterprise). Example: {"email": "dana@example.com"}."""
    rows = store_query(
        helpdesk_path(),
        "SELECT email, name, company, plan FROM customer WHERE email = ? COLLATE NOCASE",
        (email,),
    )
    if not rows:
        return {"found": False, "email": email, "plan": "free"}
    return {"found": True, **rows[0]}


@tool(
    schema={
        "type": "object",
        "properties": {
            "sender": {**EMAIL, "description": "the customer's email address"},
            "subject": {"type": "string", "minLength": 1, "maxLength": 200},
            "category": {"type": "string", "enum": list(CATEGORIES)},
            "priority": {"type": "string", "enum": list(PRIORITIES)},
        },
        "required": ["sender", "subject", "category", "priority"],
        "additionalProperties": False,
    },
    side_effect="reversible",
    idempotent=True,
)
def ticket_file(
    ctx: ToolContext, *, sender: str, subject: str, category: str, priority: str
) -> dict:
    """File the email as a ticket in the helpdesk, with one category and one priority.
    Returns the ticket number. Example: {"sender": "dana@example.com", "subject":
    "Charged twice", "category": "billing", "priority": "urgent"}."""

    def write(db) -> dict:
        cursor = db.execute(
            "INSERT INTO ticket (sender, subject, category, priority, run_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (sender, subject, category, priority, str(ctx.run_id)),
        )
        return {
            "ticket": ticket_label(cursor.lastrowid),
            "category": category,
            "priority": priority,
        }

    return write_once(helpdesk_path(), key=ctx.idempotency_key, tool="ticket_file", write=write)


@tool(
    schema={
        "type": "object",
        "properties": {
            "ticket": TICKET,
            "body": {"type": "string", "minLength": 1, "maxLength": 5000},
        },
        "required": ["ticket", "body"],
        "additionalProperties": False,
    },
    side_effect="irreversible",
    idempotent=True,
)
def reply_send(ctx: ToolContext, *, ticket: str, body: str) -> dict:
    """Send your reply to the customer of a ticket. A person reads (and may edit) it
    first. Example: {"ticket": "T-1001", "body": "Hi Dana, ..."}."""
    # Only a ticket this run filed: an email that tells the agent to reply on another
    # customer's ticket must not reach that customer.
    found = store_query(
        helpdesk_path(),
        "SELECT sender FROM ticket WHERE id = ? AND run_id = ?",
        (int(ticket[2:]), str(ctx.run_id)),
    )
    if not found:
        raise ToolError(
            f"there is no ticket {ticket} filed by this run: file it with ticket_file first"
        )
    recipient = found[0]["sender"]

    def write(db) -> dict:
        replied = db.execute(
            "SELECT 1 FROM reply WHERE ticket = ? AND run_id = ?", (ticket, str(ctx.run_id))
        ).fetchone()
        if replied:
            raise ToolError(f"this run already replied on {ticket}: one reply a ticket")
        db.execute(
            "INSERT INTO reply (ticket, recipient, body, run_id) VALUES (?, ?, ?, ?)",
            (ticket, recipient, body, str(ctx.run_id)),
        )
        return {"sent": True, "ticket": ticket, "to": recipient}

    return write_once(helpdesk_path(), key=ctx.idempotency_key, tool="reply_send", write=write)


# The scripted model ---------------------------------------------------------------------

# What the scripted triage reads in an email, in the order it looks (the instructions
# give a real model the same rules in words).
CATEGORY_WORDS = [
    ("billing", r"charged|charge|invoice|refund|payment|billing"),
    ("account", r"password|log ?in|locked|sign ?in|2fa"),
    ("bug", r"error|crash|broken|fails|not working|\b500\b"),
    ("feature_request", r"feature|would be great|could you add|idea"),
]
URGENT_WORDS = r"charged twice|double charge|outage|is down|cannot log in|locked out"

DRAFTS = {
    "billing": "I am sorry about the billing problem. Our billing team is checking your "
    "account now and will correct any wrong charge within one business day.",
    "bug": "Thank you for the report. Our engineers are looking into the error, and I "
    "will write again as soon as it is fixed.",
    "account": "I am sorry you cannot get in. I have asked our account team to unlock "
    "your account; you will get an email to set a new password within the hour.",
    "how_to": "Good question: open Settings, then Team, and press Invite. Type your "
    "colleague's email address and they get an invitation at once.",
    "feature_request": "Thank you for the idea. I have passed it to our product team, "
    "who read every request.",
}

PLAN = [
    "Look up the customer",
    "File the ticket with a category and a priority",
    "Draft the reply and send it (a person approves it first)",
    "Report the outcome",
]


plan_update = functools.partial(plan_steps, PLAN)


def triage(subject: str, text: str, plan: str) -> tuple[str, str]:
    """The scripted model's reading of an email: its category and its priority."""
    words = f"{subject}\n{text}".lower()
    category = next(
        (name for name, pattern in CATEGORY_WORDS if re.search(pattern, words)), "how_to"
    )
    if re.search(URGENT_WORDS, words):
        priority = "urgent"
    elif plan == "enterprise":
        priority = "high"
    elif category == "feature_request":
        priority = "low"
    else:
        priority = "normal"
    return category, priority


def support_check(messages: list[dict]) -> ModelTurn:
    done = tool_results(messages)
    reply = done.get("reply_send", {"error": "not asked for"})
    filed = done.get("ticket_file", {})
    if filed.get("simulated"):
        return check_turn(0.9, "Shadow mode: the ticket and the reply were simulated, not made")
    if "ticket" not in filed:
        return check_turn(0.2, "no ticket was filed", objective_met=False)
    if reply.get("simulated"):
        return check_turn(0.9, f"{filed['ticket']} filed; the reply was simulated (Shadow)")
    if "error" in reply:
        return check_turn(
            0.6,
            f"{filed['ticket']} filed; the reply was not sent ({reply['error']})",
            objective_met=False,
        )
    return check_turn(
        0.95,
        f"{filed['ticket']} filed as {filed['category']}, {filed['priority']}; the reply "
        f"went to {reply.get('to')}",
    )


@script("support-triage", check=support_check)
def support_triage(messages: list[dict]) -> ModelTurn:
    """A deterministic stand-in for a model: it reads only the transcript."""
    given = run_input(messages)
    done = tool_results(messages)
    turn = sum(1 for m in messages if m["role"] == "assistant")
    usage = {"tokens_in": 350 + 110 * turn, "tokens_out": 50}
    sender = given.get("sender", "")
    if "helpdesk_customer" not in done:
        return scripted_turn(
            {
                "content": f"A support email from {sender}. First, who is the customer?",
                "calls": [
                    plan_update(0, "drafted from the objective"),
                    ("helpdesk_customer", {"email": sender, "_confidence": 0.95}),
                ],
                **usage,
            },
            turn,
        )
    customer = done["helpdesk_customer"]
    if "ticket_file" not in done:
        category, priority = triage(
            given.get("subject", ""), given.get("text", ""), customer.get("plan", "free")
        )
        return scripted_turn(
            {
                "content": f"The email reads as {category}; priority {priority} "
                f"(plan: {customer.get('plan', 'free')}).",
                "calls": [
                    plan_update(1, "the customer is known"),
                    (
                        "ticket_file",
                        {
                            "sender": sender,
                            "subject": given.get("subject", "")[:200] or "(no subject)",
                            "category": category,
                            "priority": priority,
                            "_confidence": 0.9,
                        },
                    ),
                ],
                **usage,
            },
            turn,
        )
    filed = done["ticket_file"]
    if filed.get("simulated"):
        # Shadow mode: no ticket was made, so none has a number; the draft says T-0.
        category, priority = triage(
            given.get("subject", ""), given.get("text", ""), customer.get("plan", "free")
        )
        filed = {"ticket": "T-0", "category": category, "priority": priority}
    if "error" in filed:
        return scripted_turn(
            {"content": f"The ticket could not be filed: {filed['error']}", **usage}, turn
        )
    reply = done.get("reply_send")
    if reply is None:
        # A display name of spaces alone has no first word.
        first = next(
            iter((customer.get("name") or given.get("sender_name") or "").split()), "there"
        )
        body = (
            f"Hi {first},\n\n{DRAFTS[filed['category']]}\n\n"
            f"Your ticket number is {filed['ticket']}.\n\nBest regards,\nThe support team"
        )
        return scripted_turn(
            {
                "content": f"Filed {filed['ticket']}. Drafting the reply; sending it waits "
                "for a person, who may edit it.",
                "calls": [
                    plan_update(2, f"filed as {filed['ticket']}"),
                    ("reply_send", {"ticket": filed["ticket"], "body": body, "_confidence": 0.85}),
                ],
                **usage,
            },
            turn,
        )
    said = f"{filed['ticket']}: {filed['category']}, priority {filed['priority']}."
    if "error" in reply:
        outcome = f"{said} The reply was not sent ({reply['error']})."
    elif reply.get("simulated"):
        outcome = f"{said} Shadow mode: the ticket and the reply were simulated, not made."
    else:
        outcome = f"{said} The reply was sent to {reply['to']}."
    return scripted_turn({"content": outcome, **usage}, turn)
