"""The OpenAI-compatible client's lean path, over real HTTP: the engine's request goes
out as it built it, through the package's ``post`` (its key, headers and timeouts), and
the answer is read from its JSON as the package's unvalidated models read it, without
the package's request transform or response models. And the blocking call does not pay
for a TLS context of its own each time."""

from __future__ import annotations

import pytest

from agentops.runtime.models.base import ModelError
from agentops.runtime.models.openai_compatible import (
    OpenAICompatibleClient,
    http_client_capped,
    tls_context,
)
from tests.conftest import run_coroutine
from tests.peers.openai_server import OpenAICompatibleServer, completion
from tests.runtime.test_model_hostile import HostileServer, answer_plain, head
from tests.runtime.test_openai_client import ECHO_SPEC, MESSAGES


def client_of(base_url: str, *, timeout: float = 5) -> OpenAICompatibleClient:
    return OpenAICompatibleClient(
        model="test-model", api_key="sk-lean", base_url=base_url, timeout=timeout
    )


def call_sync(client: OpenAICompatibleClient, **request) -> object:
    return client.complete(**{"messages": MESSAGES, "tools": [], **request})


def call_async(client: OpenAICompatibleClient, **request) -> object:
    return run_coroutine(client.acomplete(**{"messages": MESSAGES, "tools": [], **request}))


PATHS = pytest.mark.parametrize("call", [call_sync, call_async], ids=["sync", "async"])


# The request -------------------------------------------------------------------------


@PATHS
def test_the_request_is_the_engines_body_and_nothing_else(call):
    with OpenAICompatibleServer() as server:
        server.reply(completion("ok"))
        call(
            client_of(server.base_url),
            tools=[ECHO_SPEC],
            tool_choice="test_echo",
            max_tokens=300,
            timeout=4,
        )

    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    # The call's timeout is the package's option, not a field of the body.
    assert request["body"] == {
        "model": "test-model",
        "messages": MESSAGES,
        "tools": [ECHO_SPEC],
        "tool_choice": {"type": "function", "function": {"name": "test_echo"}},
        "max_tokens": 300,
    }
    headers = {name.lower(): value for name, value in server.headers[0].items()}
    assert headers["authorization"] == "Bearer sk-lean"
    assert headers["content-type"] == "application/json"
    assert headers["x-stainless-retry-count"] == "0"


@PATHS
def test_the_calls_timeout_reaches_the_package_else_the_clients(call):
    """The package sends each read's timeout as x-stainless-read-timeout: the call's
    own where it gives one, else the client's, as ``chat.completions.create`` did."""
    with OpenAICompatibleServer() as server:
        server.reply(completion("ok"))
        server.reply(completion("ok"))
        client = client_of(server.base_url, timeout=7.5)
        call(client, timeout=2.5)
        call(client)

    read_timeouts = [headers["x-stainless-read-timeout"] for headers in server.headers]
    assert read_timeouts == ["2.5", "7.5"]


# The answer --------------------------------------------------------------------------


def answered(reply: dict) -> object:
    with OpenAICompatibleServer() as server:
        server.reply(reply)
        return call_sync(client_of(server.base_url))


def test_usage_that_gives_no_counts_reads_as_none_and_no_usage_as_zero():
    """None, not 0, where the usage is there but empty: the provider's window then
    keeps what the call reserved (``waits.turn_tokens``) rather than count 0 used."""
    empty = completion("hi")
    empty["usage"] = {}
    missing = completion("hi")
    del missing["usage"]

    assert (answered(empty).tokens_in, answered(empty).tokens_out) == (None, None)
    assert (answered(missing).tokens_in, answered(missing).tokens_out) == (0, 0)


def test_a_call_of_another_kind_is_no_tool_call_and_a_nameless_one_keeps_none():
    reply = completion(None, [("call_a", "test_echo", {"text": "hi"})])
    calls = reply["choices"][0]["message"]["tool_calls"]
    calls.append({"id": "call_custom", "type": "custom", "custom": {"name": "x", "input": ""}})
    calls.append({"id": "call_b", "type": "function", "function": {"arguments": "{}"}})
    calls.append("not a call")
    turn = answered(reply)

    assert [(call.id, call.name) for call in turn.tool_calls] == [
        ("call_a", "test_echo"),
        ("call_b", None),  # the engine's turn_storable makes it text, with a note
    ]


def test_missing_optional_fields_read_as_absent():
    reply = completion("hi")
    del reply["model"]
    del reply["choices"][0]["finish_reason"]
    turn = answered(reply)

    assert turn.content == "hi"
    assert turn.model == "test-model"  # the client's model, as the package's read gave
    assert turn.finish_reason == ""


@pytest.mark.parametrize(
    "spoil",
    [
        lambda reply: reply.update(choices={"0": reply["choices"][0]}),
        lambda reply: reply["choices"].__setitem__(0, "a choice"),
        lambda reply: reply["choices"][0].__setitem__("message", None),
        lambda reply: reply["choices"][0].pop("message"),
        lambda reply: reply.update(usage="many"),
        lambda reply: reply["choices"][0]["message"].update(
            tool_calls=[{"id": "c", "function": "test_echo"}]
        ),
    ],
    ids=["choices-object", "choice-text", "message-null", "message-missing", "usage-text", "fn"],
)
def test_an_answer_of_the_wrong_shape_is_the_servers_error_not_transient(spoil):
    reply = completion("hi")
    spoil(reply)
    with pytest.raises(ModelError) as caught:
        answered(reply)

    assert caught.value.transient is False
    assert "the model server's answer is malformed" in str(caught.value)


@pytest.mark.parametrize("body", [[], None, {"choices": []}, {"id": "x"}], ids=str)
def test_an_answer_without_choices_is_transient(body):
    with pytest.raises(ModelError) as caught:
        answered(body)

    assert caught.value.transient is True
    assert "returned no choices" in str(caught.value)


@PATHS
@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b'{"choices": [', b"\xff\xfe\xfd"],
    ids=["html", "cut-short", "not-text"],
)
def test_an_answer_that_is_not_json_is_a_transient_error_that_says_so(call, body):
    with HostileServer() as server:
        server.answers.append(answer_plain(body))
        with pytest.raises(ModelError) as caught:
            call(client_of(server.base_url))

    assert caught.value.transient is True
    assert "the model server's answer is not JSON" in str(caught.value)


def test_json_says_json_whatever_its_content_type():
    """The package read a JSON body sent as text/plain as JSON too."""
    body = b'{"model": "m", "choices": [{"message": {"content": "plain"}}]}'

    def answer(send, stopped) -> None:
        send(head(len(body)).replace(b"application/json", b"text/plain") + body)

    with HostileServer() as server:
        server.answers.append(answer)
        turn = call_sync(client_of(server.base_url))

    assert turn.content == "plain"


# The blocking call's cost ------------------------------------------------------------


def test_every_client_shares_the_processs_tls_context():
    """Each blocking call makes a client of its own: with a TLS context of its own, it
    read the system's CA certificates every time, about 20 ms of CPU a call
    (``bench_model_client`` prints the cost a call)."""
    first, second = http_client_capped(), http_client_capped()
    contexts = {id(client._transport._pool._ssl_context) for client in (first, second)}
    assert contexts == {id(tls_context())}


# What a hostile answer cannot make the engine carry ----------------------------------


@PATHS
def test_an_answer_nested_deeper_than_the_engine_reads_is_refused_before_it_is_parsed(call):
    """A few thousand brackets fit in any answer cap; parsed, the engine's walks over
    what it stores would run out of stack. Refused as an answer that is not JSON: a
    server's fault, tried again."""
    deep = b'{"choices": [{"message": {"content": "hi", "x": ' + b"[" * 3000 + b"]" * 3000
    body = deep + b"}}]}"
    with HostileServer() as server:
        server.answers.append(answer_plain(body))
        with pytest.raises(ModelError) as caught:
            call(client_of(server.base_url))

    assert caught.value.transient is True
    assert "nesting deeper than 100 levels is not accepted" in str(caught.value)


@PATHS
def test_an_answer_in_utf_16_is_read_as_json_reads_bytes(call):
    body = '{"model": "m", "choices": [{"message": {"content": "grüße"}}]}'.encode("utf-16")
    with HostileServer() as server:
        server.answers.append(answer_plain(body))
        turn = call(client_of(server.base_url))

    assert turn.content == "grüße"


@PATHS
def test_a_servers_long_error_message_is_clipped_where_the_run_would_carry_it(call):
    """The message goes into every retry's event and the run's reason."""
    with OpenAICompatibleServer() as server:
        server.reply({"error": {"message": "no " * 100_000}}, status=400)
        with pytest.raises(ModelError) as caught:
            call(client_of(server.base_url))

    said = str(caught.value)
    assert len(said) < 1_200
    assert "(300000 characters in all)" in said


def answer_over_the_cap(status_line: bytes, *headers: str):
    """An error answer whose body is twice the cap (the test lowers it to 64 KiB)."""
    body = b'{"error": {"message": "' + b"x" * 2**17 + b'"}}'

    def answer(send, stopped) -> None:
        send(head(len(body), *headers).replace(b"200 OK", status_line) + body)

    return answer


@PATHS
def test_a_429_too_large_to_read_still_says_when_to_come_back(call, settings):
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = 2**16
    with HostileServer() as server:
        server.answers.append(answer_over_the_cap(b"429 Too Many Requests", "Retry-After: 7"))
        with pytest.raises(ModelError) as caught:
            call(client_of(server.base_url))

    error = caught.value
    assert (error.transient, error.status, error.retry_after) == (True, 429, 7.0)
    assert f"answered 429 with more than {2**16} bytes" in str(error)


@PATHS
def test_a_refusal_too_large_to_read_is_still_a_refusal(call, settings):
    """A 400 would be answered the same again: not transient, however large."""
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = 2**16
    with HostileServer() as server:
        server.answers.append(answer_over_the_cap(b"400 Bad Request"))
        with pytest.raises(ModelError) as caught:
            call(client_of(server.base_url))

    assert (caught.value.transient, caught.value.status) == (False, 400)
