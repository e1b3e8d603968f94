"""The OpenAI-compatible client over real HTTP, against the local test server, and the
model settings that decide which client a run gets."""

from __future__ import annotations

import json
import socket

import pytest

from agentops.runtime.engine import Outcome
from agentops.runtime.models.base import (
    ModelError,
    ModelNotConfigured,
    ModelTurn,
    ToolCallRequest,
    client_for,
    model_label_for,
)
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from agentops.runtime.models.scripted import SCRIPTS, ScriptedClient
from tasks.models import RunStatus, Step
from tasks.services import run_start
from tests.agent_tools import EFFECTS
from tests.conftest import run_until_rest
from tests.peers.openai_server import OpenAICompatibleServer, completion

MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Say hello."},
]
ECHO_SPEC = {
    "type": "function",
    "function": {
        "name": "test_echo",
        "description": "Return the text.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
}


def client_of(server: OpenAICompatibleServer, *, api_key: str = "test") -> OpenAICompatibleClient:
    return OpenAICompatibleClient(
        model="test-model", api_key=api_key, base_url=server.base_url, timeout=5
    )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound, read, released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Replies -----------------------------------------------------------------------------


def test_a_text_reply_carries_content_usage_and_model():
    with OpenAICompatibleServer() as server:
        server.reply(completion("Hello there.", prompt_tokens=21, completion_tokens=4))
        turn = client_of(server).complete(messages=MESSAGES, tools=[])

    assert turn.content == "Hello there."
    assert turn.tool_calls == []
    assert (turn.tokens_in, turn.tokens_out) == (21, 4)
    assert turn.model == "test-model"
    assert turn.finish_reason == "stop"


def test_a_tool_call_reply_keeps_ids_names_and_raw_json_arguments():
    with OpenAICompatibleServer() as server:
        server.reply(
            completion(
                None,
                [
                    ("call_a", "test_echo", {"text": "hi"}),
                    ("call_b", "test_note", {"text": "ünïcode", "n": [1, 2]}),
                ],
            )
        )
        turn = client_of(server).complete(messages=MESSAGES, tools=[ECHO_SPEC])

    assert turn.content == ""  # the server sent null content beside the calls
    assert turn.finish_reason == "tool_calls"
    assert turn.tool_calls == [
        ToolCallRequest(id="call_a", name="test_echo", arguments=json.dumps({"text": "hi"})),
        ToolCallRequest(
            id="call_b", name="test_note", arguments=json.dumps({"text": "ünïcode", "n": [1, 2]})
        ),
    ]
    # The arguments stay the server's text, untouched: the engine parses and judges them.
    assert all(isinstance(call.arguments, str) for call in turn.tool_calls)


def test_the_request_carries_the_model_the_messages_and_the_tools():
    with OpenAICompatibleServer() as server:
        server.reply(completion("ok"))
        client_of(server, api_key="sk-test-123").complete(messages=MESSAGES, tools=[ECHO_SPEC])

    assert len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "test-model"
    assert request["body"]["messages"] == MESSAGES
    assert request["body"]["tools"] == [ECHO_SPEC]
    headers = {name.lower(): value for name, value in server.headers[0].items()}
    assert headers["authorization"] == "Bearer sk-test-123"


def test_a_request_without_tools_sends_no_tools_list():
    with OpenAICompatibleServer() as server:
        server.reply(completion("ok"))
        client_of(server).complete(messages=MESSAGES, tools=[])

    assert "tools" not in server.requests[0]["body"]


def test_a_local_server_without_a_key_still_gets_a_request():
    with OpenAICompatibleServer() as server:
        server.reply(completion("ok"))
        turn = client_of(server, api_key="").complete(messages=MESSAGES, tools=[])

    assert turn.content == "ok"
    assert len(server.requests) == 1


def test_a_reply_with_no_choices_is_a_transient_error():
    body = completion("unused")
    body["choices"] = []
    with OpenAICompatibleServer() as server:
        server.reply(body)
        with pytest.raises(ModelError) as caught:
            client_of(server).complete(messages=MESSAGES, tools=[])

    assert caught.value.transient is True
    assert "no choices" in str(caught.value)


# Errors ------------------------------------------------------------------------------


def test_a_server_error_is_transient_and_the_client_does_not_retry_it():
    with OpenAICompatibleServer() as server:
        server.reply({"error": {"message": "the GPU caught fire"}}, status=500)
        server.reply(completion("a retry would have got this"))
        with pytest.raises(ModelError) as caught:
            client_of(server).complete(messages=MESSAGES, tools=[])

    # The engine owns retries, so each attempt shows in the run's record.
    assert len(server.requests) == 1
    assert caught.value.transient is True
    assert caught.value.status == 500
    assert "500" in str(caught.value)
    assert "the GPU caught fire" in str(caught.value)


def test_rate_limited_is_transient():
    with OpenAICompatibleServer() as server:
        server.reply({"error": {"message": "slow down"}}, status=429)
        with pytest.raises(ModelError) as caught:
            client_of(server).complete(messages=MESSAGES, tools=[])

    assert len(server.requests) == 1
    assert caught.value.transient is True
    assert caught.value.status == 429
    assert "slow down" in str(caught.value)


def test_a_bad_request_is_not_transient_and_says_why():
    with OpenAICompatibleServer() as server:
        server.reply({"error": {"message": "the model 'test-model' does not exist"}}, status=400)
        with pytest.raises(ModelError) as caught:
            client_of(server).complete(messages=MESSAGES, tools=[])

    assert caught.value.transient is False
    assert caught.value.status == 400
    assert "the model 'test-model' does not exist" in str(caught.value)


def test_a_refused_connection_is_transient():
    client = OpenAICompatibleClient(
        model="test-model",
        api_key="test",
        base_url=f"http://127.0.0.1:{closed_port()}/v1",
        timeout=5,
    )
    with pytest.raises(ModelError) as caught:
        client.complete(messages=MESSAGES, tools=[])

    assert caught.value.transient is True
    assert caught.value.status is None
    assert "could not reach the model server" in str(caught.value)


def test_a_server_that_never_answers_times_out_as_transient():
    # A listening socket that never accepts: the kernel completes the handshake and the
    # request then waits for an answer that never comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        client = OpenAICompatibleClient(
            model="test-model",
            api_key="test",
            base_url=f"http://127.0.0.1:{port}/v1",
            timeout=0.5,
        )
        with pytest.raises(ModelError) as caught:
            client.complete(messages=MESSAGES, tools=[])

    assert caught.value.transient is True
    assert "timed out" in str(caught.value)


# Which model, which client -----------------------------------------------------------


def test_a_scripted_model_label_passes_through(settings):
    settings.AGENTOPS_MODEL = ""
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    assert model_label_for("scripted:x") == "scripted:x"


def test_no_model_anywhere_names_agentops_model(settings):
    settings.AGENTOPS_MODEL = ""
    settings.OPENAI_BASE_URL = "http://127.0.0.1:1/v1"
    with pytest.raises(ModelNotConfigured, match="AGENTOPS_MODEL"):
        model_label_for("")


def test_the_deployment_model_fills_in_for_a_task_without_one(settings):
    settings.AGENTOPS_MODEL = "deployment-model"
    settings.OPENAI_BASE_URL = "http://127.0.0.1:1/v1"
    assert model_label_for("") == "deployment-model"


def test_a_model_without_a_server_names_both_settings(settings):
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    with pytest.raises(ModelNotConfigured) as caught:
        model_label_for("gpt-test")

    message = str(caught.value)
    assert "OPENAI_API_KEY" in message and "OPENAI_BASE_URL" in message
    assert "gpt-test" in message


def test_a_model_with_a_base_url_is_its_own_label(settings):
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = "http://127.0.0.1:1/v1"
    assert model_label_for("test-model") == "test-model"


def test_a_model_with_only_an_api_key_is_its_own_label(settings):
    settings.OPENAI_API_KEY = "sk-test"
    settings.OPENAI_BASE_URL = ""
    assert model_label_for("test-model") == "test-model"


def test_client_for_a_model_name_talks_to_the_configured_server(settings):
    with OpenAICompatibleServer() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.OPENAI_API_KEY = "test"
        server.reply(completion("from the server"))
        client = client_for("test-model")
        turn = client.complete(messages=MESSAGES, tools=[])

    assert isinstance(client, OpenAICompatibleClient)
    assert client.label == "test-model"
    assert turn.content == "from the server"
    assert server.requests[0]["body"]["model"] == "test-model"


def test_client_for_a_scripted_label_plays_the_script():
    SCRIPTS["test-client-for"] = lambda messages: ModelTurn(content="scripted")
    try:
        client = client_for("scripted:test-client-for")
    finally:
        del SCRIPTS["test-client-for"]
    assert isinstance(client, ScriptedClient)
    assert client.label == "scripted:test-client-for"


def test_client_for_an_unknown_script_says_which_are_installed():
    with pytest.raises(ModelNotConfigured, match="no scripted model named 'no-such-script'"):
        client_for("scripted:no-such-script")


# The engine, on the real client ------------------------------------------------------


@pytest.mark.django_db
def test_a_run_on_a_served_model_plans_calls_a_tool_checks_and_finishes(
    make_task, operator, settings
):
    plan = {"steps": [{"title": "echo hi"}, {"title": "report"}]}
    with OpenAICompatibleServer() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.OPENAI_API_KEY = "test"
        server.reply(
            completion(
                None,
                [
                    ("call_p", "plan_update", plan),
                    ("call_1", "test_echo", {"text": "hi", "_confidence": 0.8}),
                ],
                prompt_tokens=30,
                completion_tokens=5,
            )
        )
        server.reply(completion("The echo said hi.", prompt_tokens=50, completion_tokens=8))
        check = {"objective_met": True, "confidence": 0.9, "evidence": "the echo tool said hi"}
        server.reply(
            completion(
                None, [("call_c", "report_check", check)], prompt_tokens=60, completion_tokens=9
            )
        )
        task = make_task([], tools=["test_echo"])
        task.model = "test-model"
        task.save()

        run = run_start(task=task, run_input={}, user=operator)
        outcome = run_until_rest(run)

    assert outcome is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED, run.reason
    assert run.model_label == "test-model"
    assert run.outcome == "The echo said hi."
    assert (run.tokens_in, run.tokens_out) == (140, 22)
    assert run.confidence == 0.9
    assert run.plan == plan["steps"]
    assert EFFECTS == {"echo:hi": 1}

    assert len(server.requests) == 3
    first, second, third = (request["body"] for request in server.requests)
    assert first["model"] == "test-model"
    assert [tool["function"]["name"] for tool in first["tools"]] == [
        "plan_update",
        "ask_person",
        "test_echo",
    ]
    # The tool asks the model for its confidence in the call, which the tool never sees.
    assert first["tools"][2]["function"]["parameters"]["required"] == ["text", "_confidence"]
    assert "_confidence" in first["messages"][0]["content"]
    echo = Step.objects.get(run=run, tool_name="test_echo")
    assert echo.arguments == {"text": "hi"} and echo.confidence == 0.8
    # The first turn must draft the plan; every answer is capped.
    assert first["tool_choice"] == {"type": "function", "function": {"name": "plan_update"}}
    assert first["max_tokens"] == 4096
    assert "tool_choice" not in second

    *_, assistant, plan_answer, echo_answer = second["messages"]
    assert assistant["role"] == "assistant"
    assert [call["function"]["name"] for call in assistant["tool_calls"]] == [
        "plan_update",
        "test_echo",
    ]
    assert json.loads(plan_answer["content"]) == {"recorded": True, "version": 1}
    assert echo_answer["role"] == "tool" and echo_answer["tool_call_id"] == "call_1"
    assert json.loads(echo_answer["content"]) == {"echo": "hi"}

    # The self-check: the conversation, then the check prompt, with only report_check.
    assert third["tool_choice"] == {"type": "function", "function": {"name": "report_check"}}
    assert [tool["function"]["name"] for tool in third["tools"]] == ["report_check"]
    assert third["messages"][-1]["role"] == "user"
    assert "check your final answer" in third["messages"][-1]["content"]


@pytest.mark.django_db
def test_a_refused_model_call_fails_the_run_with_the_servers_words(make_task, operator, settings):
    with OpenAICompatibleServer() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.OPENAI_API_KEY = "test"
        server.reply({"error": {"message": "context length exceeded"}}, status=400)
        task = make_task([], tools=["test_echo"])
        task.model = "test-model"
        task.save()

        run = run_start(task=task, run_input={}, user=operator)
        outcome = run_until_rest(run)

    assert outcome is Outcome.FINISHED
    assert run.status == RunStatus.FAILED
    assert "context length exceeded" in run.reason
    assert "400" in run.reason
    assert len(server.requests) == 1
    assert run.steps.count() == 0
    assert (run.tokens_in, run.tokens_out) == (0, 0)
