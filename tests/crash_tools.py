"""Tools and a scripted model for the crash tests (tests/runtime/test_crash.py).

They live at module level so a worker process started by a test has them too (the
suite is an installed app; tests/agent_tools.py imports this module).

The tools make their side effect at the sink (tests/peers/sink.py) over HTTP, sending
the step's idempotency key as ``Idempotency-Key``. To let a test kill the worker at an
exact point without hooks in the engine, a call can pause: it writes
``<markers>/<point>.reached`` and waits, bounded, for the test to create
``<markers>/<point>.release``. Every attempt is logged to ``<markers>/attempts`` with the
process id and the key, so a test can tell which worker tried what.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agentops.runtime.models import ModelTurn
from agentops.runtime.models.scripted import script, scripted_turn
from agentops.runtime.tools import ToolContext, ToolError, tool

BEFORE_EFFECT = "before_effect"  # the step is committed `started`; the sink not reached
AFTER_EFFECT = "after_effect"  # the sink made the effect; the outcome is not recorded
NO_PAUSE = "none"
PAUSE_SECONDS = 30.0
SINK_TIMEOUT_SECONDS = 10.0

CALL = {
    "type": "object",
    "properties": {
        "sink": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"},
        "markers": {"type": "string", "minLength": 1},
        "pause": {"enum": [BEFORE_EFFECT, AFTER_EFFECT, NO_PAUSE]},
        "text": {"type": "string", "maxLength": 100},
    },
    "required": ["sink", "markers", "pause", "text"],
    "additionalProperties": False,
}

# Never through a proxy from the environment: the sink is on 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def reached_marker(directory: str | Path, point: str) -> Path:
    return Path(directory) / f"{point}.reached"


def release_marker(directory: str | Path, point: str) -> Path:
    return Path(directory) / f"{point}.release"


def attempts(directory: str | Path) -> list[tuple[int, str]]:
    """Every attempt at a crash tool's call, in order: (process id, idempotency key)."""
    log = Path(directory) / "attempts"
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [(int(pid), key) for pid, key in (line.split(" ", 1) for line in lines)]


def pause_at(directory: str, point: str, pause: str) -> None:
    """If this call pauses at ``point``: say so, then wait until the test releases it."""
    if pause != point:
        return
    reached_marker(directory, point).write_text(str(os.getpid()))
    release = release_marker(directory, point)
    deadline = time.monotonic() + PAUSE_SECONDS
    while not release.exists():
        if time.monotonic() >= deadline:
            raise ToolError(f"the test did not release the pause at {point} in time")
        time.sleep(0.02)


def sink_call(
    ctx: ToolContext, *, path: str, sink: str, markers: str, pause: str, text: str
) -> dict:
    with (Path(markers) / "attempts").open("a") as log:
        log.write(f"{os.getpid()} {ctx.idempotency_key}\n")
    pause_at(markers, BEFORE_EFFECT, pause)
    request = urllib.request.Request(
        sink + path,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": ctx.idempotency_key},
        method="POST",
    )
    try:
        with _opener.open(request, timeout=SINK_TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ToolError(f"the sink answered {error.code}: {error.read().decode()}") from error
    except urllib.error.URLError as error:
        # Only a refused connection certainly made no effect; a timeout may have.
        refused = isinstance(error.reason, ConnectionRefusedError)
        raise ToolError(f"could not reach the sink: {error.reason}", transient=refused) from error
    pause_at(markers, AFTER_EFFECT, pause)
    return answer


@tool(schema=CALL, side_effect="irreversible", idempotent=True)
def crash_charge(ctx: ToolContext, *, sink: str, markers: str, pause: str, text: str) -> dict:
    """Charge at the sink's idempotent side, keyed by the idempotency key."""
    return sink_call(ctx, path="/effect", sink=sink, markers=markers, pause=pause, text=text)


@tool(schema=CALL, side_effect="irreversible")
def crash_send(ctx: ToolContext, *, sink: str, markers: str, pause: str, text: str) -> dict:
    """Send through the sink's side that repeats every request (not idempotent)."""
    return sink_call(ctx, path="/effect-unsafe", sink=sink, markers=markers, pause=pause, text=text)


def run_input_of(messages: list[dict]) -> dict[str, Any]:
    """The run's input, as the engine writes it into the first user message."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    _, _, text = user.partition("\n\nInput:\n")
    return json.loads(text) if text else {}


@script("crash-agent")
def crash_agent(messages: list[dict]) -> ModelTurn:
    """Make the one call the run's input names (``{"tool": ..., "arguments": ...}``),
    then finish with its answer. A function of the transcript only, so a recovering
    worker gets the same turns."""
    answers = [m for m in messages if m["role"] == "tool"]
    turn = sum(1 for m in messages if m["role"] == "assistant")
    if not answers:
        call = run_input_of(messages)
        return scripted_turn(
            {"content": f"calling {call['tool']}", "calls": [(call["tool"], call["arguments"])]},
            turn,
        )
    return scripted_turn({"content": f"done: {answers[-1]['content']}"}, turn)
