"""The demo's two other workflows as load_demo makes them: support-queue triage (from
an inbound email) and lead enrichment and routing (from a signed webhook). Each task is
made once, with its grants, its rules and its triggers; after that it is the operator's,
and loading the demo again leaves it as it is.

The instructions are written so a small (1-2B) model can follow them: numbered steps,
one tool call each, every choice spelled out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from demo.crm import APPROVAL_SCORE
from demo.helpdesk import SUPPORT_ADDRESS
from demo.triggers import lead_triggers_create, support_triggers_create
from tasks.models import GrantRule, Task, Tool, ToolGrant, Trigger

SUPPORT_SLUG = "triage-support"
LEADS_SLUG = "route-leads"


@dataclass(frozen=True)
class Workflow:
    slug: str
    fields: dict[str, Any]
    tools: tuple[str, ...]
    # (tool, CEL expression, effect, description)
    rules: tuple[tuple[str, str, str, str], ...]
    triggers: Callable[[Task], list[Trigger]]
    hint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SUPPORT = Workflow(
    slug=SUPPORT_SLUG,
    fields={
        "name": "Triage support email",
        "description": "Triage an email to the support inbox: look the customer up, file "
        "a ticket with a category and a priority, and reply once a person has read (and "
        "perhaps edited) the draft. Runs offline on a scripted model.",
        "objective_template": 'Triage the support email from {sender} with the subject "'
        '{subject}": file it as a ticket with one category and one priority, and send the '
        "customer a short, helpful reply.",
        "instructions": (
            "Do these steps in order, one tool call each.\n"
            "1. Call helpdesk_customer with the sender's email.\n"
            "2. Call ticket_file with the sender, the subject, one category and one "
            "priority.\n"
            "   Category: billing (charges, invoices, refunds); account (login, password, "
            "locked out); bug (an error, something broken); feature_request (an idea, a "
            "wish); how_to (a question on how to do something).\n"
            "   Priority: urgent if the customer was charged wrongly or cannot log in or "
            "work at all; else high if the plan is enterprise; else low for a "
            "feature_request; else normal.\n"
            "3. Call reply_send with the ticket number and your reply: greet the customer "
            "by first name, say what happens next, give the ticket number. A person reads "
            "it before it is sent.\n"
            "4. Answer in one line: the ticket, its category, its priority, and whether "
            "the reply was sent."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "sender": {"type": "string", "description": "the customer's email address"},
                "sender_name": {"type": "string"},
                "subject": {"type": "string"},
                "text": {"type": "string", "description": "the email's text"},
            },
            "required": ["sender", "subject", "text"],
            "additionalProperties": False,
        },
        "example_input": {
            "sender": "dana@example.com",
            "sender_name": "Dana Whitfield",
            "subject": "Charged twice for November",
            "text": "Our card was charged twice for the November invoice. Please refund "
            "the second charge.",
        },
        "model": "scripted:support-triage",
        "max_steps": 20,
        # Guarded: the lookup and the ticket (reversible) run on their own; the reply is
        # irreversible, and its grant's rule holds it for a person at every level.
        "autonomy_level": 2,
        "confidence_threshold": 0.7,
        "max_live_runs": 5,
    },
    tools=("helpdesk_customer", "ticket_file", "reply_send"),
    rules=(
        (
            "reply_send",
            "true",
            GrantRule.Effect.APPROVE,
            "a person reads every reply before it goes to a customer",
        ),
    ),
    triggers=lambda task: support_triggers_create(task, address=SUPPORT_ADDRESS),
    hint="Send a sample ticket to the inbox: .venv/bin/python manage.py demo_send_ticket "
    "billing-double-charge",
)

LEADS = Workflow(
    slug=LEADS_SLUG,
    fields={
        "name": "Enrich and route leads",
        "description": "Enrich a lead from the website's form: look its company up, score "
        "it, find its owner and save it to the CRM; a hot lead (score "
        f"{APPROVAL_SCORE} or more) waits for a person first. Runs offline on a scripted "
        "model.",
        "objective_template": "Enrich and route the lead {name} <{email}> of the company at "
        "{domain}: look the company up, score the lead, find its owner, and save it to the "
        "CRM.",
        "instructions": (
            "Do these steps in order, one tool call each.\n"
            "1. Call company_lookup with the domain.\n"
            "2. Call lead_score with the employees and the industry that company_lookup "
            "gave.\n"
            "3. Call owner_route with the region that company_lookup gave and the segment "
            "that lead_score gave.\n"
            "4. Call crm_lead_save with the lead's email and name, the company's name (or "
            "the domain if it was not found), the score, and the owner.\n"
            "5. Answer in one line: the lead, its score, its owner, and whether it was saved."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "domain": {"type": "string", "description": "the company's web domain"},
                "message": {"type": ["string", "null"]},
            },
            "required": ["name", "email", "domain"],
            "additionalProperties": False,
        },
        "example_input": {
            "name": "Ines Ortega",
            "email": "ines.ortega@contoso.example",
            "domain": "contoso.example",
            "message": "Can we talk this week?",
        },
        "model": "scripted:lead-route",
        "max_steps": 20,
        # Guarded: lookups run, and so does a CRM write (reversible) unless the rule
        # below holds it for a person.
        "autonomy_level": 2,
        "confidence_threshold": 0.7,
        "max_live_runs": 5,
    },
    tools=("company_lookup", "lead_score", "owner_route", "crm_lead_save"),
    rules=(
        (
            "crm_lead_save",
            f"args.score >= {APPROVAL_SCORE}",
            GrantRule.Effect.APPROVE,
            f"a hot lead (score {APPROVAL_SCORE} or more) is saved once a person has looked",
        ),
    ),
    triggers=lead_triggers_create,
    hint="Post a sample lead, signed: .venv/bin/python manage.py demo_post_lead hot-contoso "
    "--base-url {base_url}",
)

WORKFLOWS = (SUPPORT, LEADS)


@dataclass(frozen=True)
class Loaded:
    task: Task
    created: bool
    triggers_made: bool
    hint: str


def workflow_load(workflow: Workflow) -> Loaded:
    """Make the workflow's task with its grants and rules if there is none; give it its
    triggers if it has none. An existing task is left as it is."""
    task, created = Task.objects.get_or_create(slug=workflow.slug, defaults=workflow.fields)
    if created:
        grants = {
            name: ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=name))
            for name in workflow.tools
        }
        for position, (tool, expression, effect, description) in enumerate(workflow.rules):
            rule = GrantRule(
                grant=grants[tool],
                position=position,
                expression=expression,
                effect=effect,
                description=description,
            )
            rule.full_clean()
            rule.save()
    triggers_made = not task.triggers.exists()
    if triggers_made:
        workflow.triggers(task)
    return Loaded(task=task, created=created, triggers_made=triggers_made, hint=workflow.hint)
