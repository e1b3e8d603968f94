"""agentops.latency_server: the slow model of ``manage.py bench_concurrency``, driven
through the real openai package and through raw sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import openai
import pytest

from agentops.latency_server import LatencyServer
from tests.conftest import run_coroutine

TOOL = "bench_lookup"
TOOLS = [{"type": "function", "function": {"name": TOOL, "parameters": {"type": "object"}}}]
PLAN_CHOICE = {"type": "function", "function": {"name": "plan_update"}}


def client_for(server: LatencyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="test", base_url=server.base_url, max_retries=0)


def conversation(assistant_turns: int) -> list[dict]:
    """A transcript with this many assistant messages already in it."""
    messages = [{"role": "user", "content": "Objective: look numbers up."}]
    for turn in range(1, assistant_turns + 1):
        messages.append({"role": "assistant", "content": f"turn {turn}"})
    return messages


def raw_exchange(server: LatencyServer, requests: bytes) -> bytes:
    """Send ``requests`` on one connection; everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(requests)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_concurrent_calls_wait_out_their_latency_together():
    with LatencyServer(latency=0.3, turns=3, tool=TOOL) as server:

        async def twenty_calls() -> list:
            async with client_for(server) as client:
                return await asyncio.gather(
                    *(
                        client.chat.completions.create(
                            model="bench-latency", messages=conversation(1), tools=TOOLS
                        )
                        for _ in range(20)
                    )
                )

        started = time.perf_counter()
        answers = run_coroutine(twenty_calls())
        elapsed = time.perf_counter() - started
        figures = server.figures()

    # One after another they would take 6 s; together, about one latency.
    assert 0.3 <= elapsed < 2.0
    assert figures.in_flight_peak == 20
    assert figures.in_flight == 0
    assert figures.completions == 20
    assert figures.errors == 0
    for answer in answers:
        [call] = answer.choices[0].message.tool_calls
        assert call.function.name == TOOL
        assert json.loads(call.function.arguments) == {"n": 2, "_confidence": 0.99}
        assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0


def test_the_script_plans_when_asked_then_calls_the_tool_then_answers():
    with LatencyServer(latency=0.0, turns=3, tool=TOOL) as server:

        async def three_turns() -> list:
            async with client_for(server) as client:
                create = client.chat.completions.create
                return [
                    await create(
                        model="m", messages=conversation(0), tools=TOOLS, tool_choice=PLAN_CHOICE
                    ),
                    await create(model="m", messages=conversation(1), tools=TOOLS),
                    await create(model="m", messages=conversation(2), tools=TOOLS),
                ]

        plan, call, final = (answer.choices[0] for answer in run_coroutine(three_turns()))

    [plan_call] = plan.message.tool_calls
    assert plan_call.function.name == "plan_update"
    assert json.loads(plan_call.function.arguments)["steps"][0]["title"]
    assert plan.finish_reason == "tool_calls"
    [tool_call] = call.message.tool_calls
    assert tool_call.function.name == TOOL
    assert tool_call.id != plan_call.id
    assert final.message.tool_calls is None
    assert final.message.content
    assert final.finish_reason == "stop"


def test_a_request_the_script_cannot_answer_is_refused_and_counted():
    with LatencyServer(latency=0.0, turns=3, tool=TOOL) as server:

        async def refused() -> list[openai.BadRequestError]:
            errors = []
            async with client_for(server) as client:
                for request in (
                    # forced to a tool the script does not call
                    {
                        "tools": TOOLS,
                        "tool_choice": {"type": "function", "function": {"name": "x"}},
                    },
                    # the script's tool is not offered
                    {"tools": []},
                ):
                    with pytest.raises(openai.BadRequestError) as refusal:
                        await client.chat.completions.create(
                            model="m", messages=conversation(1), **request
                        )
                    errors.append(refusal.value)
            return errors

        forced, unoffered = run_coroutine(refused())
        figures = server.figures()

    assert "tool_choice names 'x'" in forced.message
    assert f"offers no tool named {TOOL!r}" in unoffered.message
    assert figures.errors == 2
    assert figures.completions == 0


def test_a_connection_is_kept_alive_until_the_client_closes_it():
    with LatencyServer(latency=0.0, turns=3, tool=TOOL) as server:
        lookup = "GET /v1/bench/lookup?n={n} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n"
        received = raw_exchange(
            server,
            (
                lookup.format(n=1, extra="")
                + lookup.format(n=2, extra="Connection: close\r\n")
                + lookup.format(n=3, extra="")  # after the close: never answered
            ).encode(),
        )
        figures = server.figures()

    answers = received.split(b"HTTP/1.1 ")[1:]
    assert [a.split(b"\r\n\r\n", 1)[1] for a in answers] == [b'{"n": 1}', b'{"n": 2}']
    assert b"Connection: close" not in answers[0]
    assert b"Connection: close" in answers[1]
    assert figures.lookups == 2
    assert figures.connections_peak == 1


def test_what_is_not_http_gets_a_400_and_the_connection_ends():
    with LatencyServer(latency=0.0, turns=3, tool=TOOL) as server:
        received = raw_exchange(server, b"HELLO\r\n\r\n")
        missing = raw_exchange(
            server, b"GET /v2/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        figures = server.figures()

    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in received
    assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert figures.errors == 2


def test_stopping_with_connections_kept_alive_ends_them_quietly(caplog):
    server = LatencyServer(latency=0.0, turns=3, tool=TOOL).start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as kept:
        kept.sendall(b"GET /v1/bench/lookup?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        assert server.figures().connections == 1
        with caplog.at_level("DEBUG", logger="asyncio"):
            started = time.perf_counter()
            server.stop()
            stopped = time.perf_counter() - started
        # The server closed the connection it kept: the client reads its end.
        assert kept.recv(65536) == b""

    assert stopped < 5
    assert server.figures().connections == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_figures_reset_counts_afresh_from_now():
    with LatencyServer(latency=0.0, turns=3, tool=TOOL) as server:
        raw_exchange(server, b"GET /v1/bench/lookup?n=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
        raw_exchange(server, b"BAD\r\n\r\n")
        before = server.figures()
        server.figures_reset()
        after = server.figures()

    assert (before.lookups, before.errors, before.connections_peak) == (1, 1, 1)
    assert (after.lookups, after.errors, after.completions) == (0, 0, 0)
    assert (after.in_flight_peak, after.connections_peak) == (0, 0)
