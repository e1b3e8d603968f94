"""The tools every agent has, which the engine answers itself: ``plan_update`` (the
agent's ordered plan, drafted before acting and revised when a result contradicts it)
and ``report_check`` (the self-check before finishing)."""

from __future__ import annotations

from typing import Any

from agentops.runtime.tools import arguments_errors

PLAN_TOOL = "plan_update"
CHECK_TOOL = "report_check"
ASK_TOOL = "ask_person"

ASK_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string", "minLength": 1, "maxLength": 2000}},
    "required": ["question"],
    "additionalProperties": False,
}

PLAN_SCHEMA = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "maxItems": 30,
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "minLength": 1, "maxLength": 300},
                    "status": {"type": "string", "enum": ["todo", "doing", "done", "dropped"]},
                },
                "required": ["title"],
                "additionalProperties": False,
            },
        },
        "reason": {"type": "string", "maxLength": 2000},
    },
    "required": ["steps"],
    "additionalProperties": False,
}

CHECK_SCHEMA = {
    "type": "object",
    "properties": {
        "objective_met": {"type": "boolean"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "evidence": {"type": "string", "minLength": 1, "maxLength": 4000},
    },
    "required": ["objective_met", "confidence", "evidence"],
    "additionalProperties": False,
}

PLANNING_NOTE = (
    f"Before you act, draft your plan with {PLAN_TOOL}: an ordered list of steps. Call it "
    "again to revise the plan when a result contradicts it, and to mark steps done."
)

CHECK_PROMPT = (
    "Before this run ends, check your final answer against the objective. Call "
    f"{CHECK_TOOL} with: objective_met (true or false), confidence (0 to 1, how sure you "
    "are the outcome is right and complete), and evidence (what in the tool results "
    "supports it, and what you could not verify)."
)


def builtin_spec(name: str) -> dict:
    schema, description = {
        PLAN_TOOL: (PLAN_SCHEMA, "Record or revise your ordered plan."),
        CHECK_TOOL: (CHECK_SCHEMA, "Report your self-check of the final answer."),
        ASK_TOOL: (
            ASK_SCHEMA,
            "Ask a person a question when you cannot go on without their answer. The run "
            "waits for it.",
        ),
    }[name]
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": schema},
    }


def plan_errors(arguments: Any) -> list[str]:
    return arguments_errors(PLAN_SCHEMA, arguments)


def check_read(arguments: Any) -> tuple[dict[str, Any], str]:
    """The check report, or a failed one (confidence 0) saying what was wrong with it."""
    if arguments is None:
        problem = "the model did not report its self-check"
        return {"objective_met": False, "confidence": 0.0, "evidence": problem}, problem
    errors = arguments_errors(CHECK_SCHEMA, arguments)
    if errors:
        problem = "the self-check report was malformed: " + "; ".join(errors)
        return {"objective_met": False, "confidence": 0.0, "evidence": problem}, problem
    return {
        "objective_met": arguments["objective_met"],
        "confidence": float(arguments["confidence"]),
        "evidence": arguments["evidence"],
    }, ""
