"""Lead enrichment and routing: a lead arrives by a signed webhook (the website's form);
the agent looks the company up in the directory, scores the lead, finds its owner in
the routing table and saves it to the CRM. A lead scored at or above
``APPROVAL_SCORE`` waits for a person before it is saved (a CEL rule on the grant).

The tools are written for small models too: one action each, short descriptions with
an example, and every choice an enumerated value."""

from __future__ import annotations

import functools

from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import check_turn, script, scripted_turn
from agentops.runtime.tools import ToolContext, ToolError, tool
from demo.crm import (
    INDUSTRIES,
    INDUSTRY_POINTS,
    OWNERS,
    REGIONS,
    SEGMENTS,
    SIZE_POINTS,
    crm_path,
    score_for,
    segment_of,
)
from demo.store import store_query, write_once
from demo.transcript import plan_steps, run_input, tool_results

DOMAIN = {"type": "string", "pattern": "^[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", "maxLength": 253}


@tool(
    schema={
        "type": "object",
        "properties": {"domain": {**DOMAIN, "description": "the company's web domain"}},
        "required": ["domain"],
        "additionalProperties": False,
    },
    side_effect="read",
    idempotent=True,
)
def company_lookup(ctx: ToolContext, *, domain: str) -> dict:
    """Find a company in the directory by its web domain. Returns its name, industry,
    employees and region. Example: {"domain": "contoso.example"}."""
    rows = store_query(
        crm_path(),
        "SELECT domain, name, industry, employees, country, region FROM company "
        "WHERE domain = ? COLLATE NOCASE",
        (domain,),
    )
    if not rows:
        return {
            "found": False,
            "domain": domain,
            "industry": "other",
            "employees": 0,
            "region": "unknown",
        }
    return {"found": True, **rows[0]}


@tool(
    schema={
        "type": "object",
        "properties": {
            "employees": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
            "industry": {"type": "string", "enum": list(INDUSTRIES)},
        },
        "required": ["employees", "industry"],
        "additionalProperties": False,
    },
    side_effect="read",
    idempotent=True,
)
def lead_score(ctx: ToolContext, *, employees: int, industry: str) -> dict:
    """Score a lead from 0 to 100 by its company's size and industry. Returns the score
    and the segment (enterprise, midmarket or smb). Example: {"employees": 4000,
    "industry": "software"}."""
    segment = segment_of(employees)
    size, fit = SIZE_POINTS[segment], INDUSTRY_POINTS[industry]
    return {
        "score": score_for(industry, employees),
        "segment": segment,
        "why": f"{segment} ({employees} employees): {size} points; {industry}: {fit} points",
    }


@tool(
    schema={
        "type": "object",
        "properties": {
            "region": {"type": "string", "enum": list(REGIONS)},
            "segment": {"type": "string", "enum": list(SEGMENTS)},
        },
        "required": ["region", "segment"],
        "additionalProperties": False,
    },
    side_effect="read",
    idempotent=True,
)
def owner_route(ctx: ToolContext, *, region: str, segment: str) -> dict:
    """Find the salesperson who owns leads of a region and a segment. Example:
    {"region": "emea", "segment": "enterprise"}."""
    rows = store_query(
        crm_path(),
        "SELECT owner FROM route WHERE region = ? AND segment = ?",
        (region, segment),
    )
    return {"region": region, "segment": segment, "owner": rows[0]["owner"]}


@tool(
    schema={
        "type": "object",
        "properties": {
            "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$", "maxLength": 254},
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "company": {"type": "string", "minLength": 1, "maxLength": 200},
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "owner": {"type": "string", "enum": list(OWNERS)},
        },
        "required": ["email", "name", "company", "score", "owner"],
        "additionalProperties": False,
    },
    side_effect="reversible",
    idempotent=True,
)
def crm_lead_save(
    ctx: ToolContext, *, email: str, name: str, company: str, score: int, owner: str
) -> dict:
    """Save the lead to the CRM with its score and owner (a lead saved again is
    updated). Example: {"email": "ines@contoso.example", "name": "Ines Ortega",
    "company": "Contoso", "score": 80, "owner": "mara.jensen@sales.example"}."""

    def write(db) -> dict:
        # The score decides whether a person sees the save (the grant's rule reads it):
        # one below what the directory gives the lead's company would slip past them.
        domain = email.rsplit("@", 1)[1]
        company_row = db.execute(
            "SELECT industry, employees FROM company WHERE domain = ? COLLATE NOCASE", (domain,)
        ).fetchone()
        industry, employees = (
            (company_row["industry"], company_row["employees"]) if company_row else ("other", 0)
        )
        if score < (expected := score_for(industry, employees)):
            raise ToolError(
                f"the score {score} is below the lead's own, {expected}: score it with lead_score"
            )
        # A lead another run saved is a person's to change, not a later lead's.
        existed = db.execute("SELECT run_id FROM lead WHERE email = ?", (email,)).fetchone()
        if existed is not None and existed["run_id"] != str(ctx.run_id):
            raise ToolError(f"{email} is already in the CRM: a person updates an existing lead")
        db.execute(
            "INSERT INTO lead (email, name, company, score, owner, run_id) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (email) DO UPDATE SET name = excluded.name, "
            "company = excluded.company, score = excluded.score, owner = excluded.owner, "
            "run_id = excluded.run_id, saved_at = datetime('now')",
            (email, name, company, score, owner, str(ctx.run_id)),
        )
        return {"saved": True, "email": email, "owner": owner, "updated": existed is not None}

    return write_once(crm_path(), key=ctx.idempotency_key, tool="crm_lead_save", write=write)


# The scripted model ---------------------------------------------------------------------

PLAN = [
    "Look the company up in the directory",
    "Score the lead",
    "Find the lead's owner in the routing table",
    "Save the lead to the CRM (a person approves a hot lead first)",
    "Report the outcome",
]


plan_update = functools.partial(plan_steps, PLAN)


def leads_check(messages: list[dict]) -> ModelTurn:
    saved = tool_results(messages).get("crm_lead_save", {"error": "not asked for"})
    if saved.get("simulated"):
        return check_turn(0.9, "the CRM write was simulated (Shadow mode)")
    if "error" in saved:
        return check_turn(0.6, f"the lead was not saved: {saved['error']}", objective_met=False)
    return check_turn(0.95, f"{saved['email']} saved with owner {saved['owner']}")


@script("lead-route", check=leads_check)
def lead_route(messages: list[dict]) -> ModelTurn:
    """A deterministic stand-in for a model: it reads only the transcript."""
    given = run_input(messages)
    done = tool_results(messages)
    turn = sum(1 for m in messages if m["role"] == "assistant")
    usage = {"tokens_in": 300 + 100 * turn, "tokens_out": 40}
    if "company_lookup" not in done:
        return scripted_turn(
            {
                "content": f"A lead from {given.get('email')}: first, the company.",
                "calls": [
                    plan_update(0, "drafted from the objective"),
                    ("company_lookup", {"domain": given.get("domain", ""), "_confidence": 0.95}),
                ],
                **usage,
            },
            turn,
        )
    company = done["company_lookup"]
    if "lead_score" not in done:
        return scripted_turn(
            {
                "content": f"{company.get('name', 'The company is not in the directory')}: "
                f"{company.get('employees', 0)} employees, {company.get('industry', 'other')}.",
                "calls": [
                    plan_update(1, "the company is looked up"),
                    (
                        "lead_score",
                        {
                            "employees": company.get("employees", 0),
                            "industry": company.get("industry", "other"),
                            "_confidence": 0.95,
                        },
                    ),
                ],
                **usage,
            },
            turn,
        )
    scored = done["lead_score"]
    if "owner_route" not in done:
        return scripted_turn(
            {
                "content": f"Score {scored['score']} ({scored['segment']}). Next, the owner.",
                "calls": [
                    plan_update(2, f"scored {scored['score']}"),
                    (
                        "owner_route",
                        {
                            "region": company.get("region", "unknown"),
                            "segment": scored["segment"],
                            "_confidence": 0.95,
                        },
                    ),
                ],
                **usage,
            },
            turn,
        )
    owner = done["owner_route"]["owner"]
    saved = done.get("crm_lead_save")
    if saved is None:
        return scripted_turn(
            {
                "content": f"Owner: {owner}. Saving the lead to the CRM.",
                "calls": [
                    plan_update(3, f"routed to {owner}"),
                    (
                        "crm_lead_save",
                        {
                            "email": given.get("email", ""),
                            "name": given.get("name", "") or given.get("email", ""),
                            "company": company.get("name") or given.get("domain", ""),
                            "score": scored["score"],
                            "owner": owner,
                            "_confidence": 0.9,
                        },
                    ),
                ],
                **usage,
            },
            turn,
        )
    said = f"{given.get('email')}: score {scored['score']} ({scored['segment']}), owner {owner}."
    if "error" in saved:
        outcome = f"{said} Not saved to the CRM ({saved['error']})."
    elif saved.get("simulated"):
        outcome = f"{said} The CRM write was simulated (Shadow mode), not made."
    else:
        outcome = f"{said} Saved to the CRM."
    return scripted_turn({"content": outcome, **usage}, turn)
