"""Traces of runs (agentops.telemetry), as a real OTLP/HTTP receiver gets them."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from agentops import telemetry
from agentops.runtime.engine import Outcome
from agentops.runtime.engine.runner import Runner
from approvals.models import Approval
from approvals.services import approval_decide
from tasks.models import Run, RunStatus
from tasks.services import run_start
from tests.conftest import run_until_rest


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.requests: list[dict[str, str]] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                received.requests.append(dict(self.headers))
                for resource_spans in request.resource_spans:
                    service = {
                        kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
                    }
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            received.spans.append((service, span))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def of_trace(self, trace_id: bytes) -> list:
        return [span for _, span in self.spans if span.trace_id == trace_id]


@pytest.fixture
def receiver(settings) -> Iterator[Receiver]:
    found = Receiver()
    found.thread.start()
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = found.url
    settings.OTEL_SERVICE_NAME = "agentops-test"
    yield found
    telemetry.shutdown()
    found.server.shutdown()
    found.server.server_close()


def attributes(span) -> dict:
    values = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[kv.key] = [item.string_value for item in value.array_value.values]
        else:
            values[kv.key] = getattr(value, kind)
    return values


def events(span) -> dict[str, dict]:
    return {event.name: attributes(event) for event in span.events}


def named(spans: list, prefix: str) -> list:
    return sorted(
        (span for span in spans if span.name.startswith(prefix)),
        key=lambda span: span.start_time_unix_nano,
    )


# Transactional: the approval's event is added when the step's transaction commits.
@pytest.mark.django_db(transaction=True)
def test_a_run_is_one_trace_of_slices_with_model_and_tool_spans_and_its_approval(
    make_task, operator, receiver
):
    task = make_task(
        [
            {
                "calls": [("test_send", {"text": "secret-ish body"})],
                "tokens_in": 120,
                "tokens_out": 30,
            },
            {"content": "sent", "tokens_in": 200, "tokens_out": 5},
        ],
        tools=["test_send"],
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.WAITING
    approval_decide(approval=Approval.objects.get(run=run), user=operator, approve=True)
    assert run_until_rest(run) is Outcome.FINISHED
    assert run.status == RunStatus.SUCCEEDED
    assert telemetry.flush()

    spans = receiver.of_trace(run.pk.bytes)  # the run's UUID is its trace id
    assert {service["service.name"] for service, _ in receiver.spans} == {"agentops-test"}
    slices = named(spans, "invoke_agent ")
    chats = named(spans, "chat ")
    tools = named(spans, "execute_tool ")
    assert len(slices) == 2, [span.name for span in spans]  # before and after the approval
    assert len(spans) == len(slices) + len(chats) + len(tools)
    assert {span.name for span in slices} == {f"invoke_agent {task.name}"}
    assert {span.name for span in chats} == {f"chat {task.model}"}
    assert [span.name for span in tools] == ["execute_tool test_send"]

    # Each slice is a root of the run's trace; the calls are children of their slice.
    first, second = slices
    assert first.parent_span_id == b"" and second.parent_span_id == b""
    # The turn that asked for the call; after the approval, the call and the last turn.
    assert [chat.parent_span_id for chat in chats] == [first.span_id] + [second.span_id] * (
        len(chats) - 1
    )
    assert len(chats) >= 2
    assert tools[0].parent_span_id == second.span_id
    assert chats[0].end_time_unix_nano <= tools[0].start_time_unix_nano

    agent = attributes(first)
    assert agent["gen_ai.operation.name"] == "invoke_agent"
    assert agent["gen_ai.agent.name"] == task.name
    assert agent["gen_ai.agent.id"] == task.slug
    assert agent["gen_ai.conversation.id"] == str(run.pk)
    assert agent["gen_ai.request.model"] == task.model
    assert agent["gen_ai.provider.name"] == "agentops.scripted"
    assert agent["agentops.run.status"] == RunStatus.WAITING
    assert attributes(second)["agentops.run.status"] == RunStatus.SUCCEEDED

    chat = attributes(chats[0])
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.request.model"] == task.model
    assert chat["gen_ai.provider.name"] == "agentops.scripted"
    first_turn = run.steps.filter(kind="model").order_by("number").first()
    assert (first_turn.tokens_in, first_turn.tokens_out) == (120, 30)
    assert chat["gen_ai.usage.input_tokens"] == 120
    assert chat["gen_ai.usage.output_tokens"] == 30
    assert (agent["gen_ai.usage.input_tokens"], agent["gen_ai.usage.output_tokens"]) == (120, 30)
    # The second slice's usage is its own turns', not the run's whole.
    assert attributes(second)["gen_ai.usage.input_tokens"] == run.tokens_in - 120 > 0
    assert chats[0].kind == chats[0].SPAN_KIND_CLIENT

    tool = attributes(tools[0])
    step = run.steps.get(kind="tool")
    assert tool["gen_ai.operation.name"] == "execute_tool"
    assert tool["gen_ai.tool.name"] == "test_send"
    assert tool["gen_ai.tool.call.id"] == step.tool_call_id
    assert "error.type" not in tool

    # The gate that held the call and the approval, as the slices' events.
    said = events(first)
    assert said["agentops.gate"]["agentops.gate.verdict"] == "hold"
    assert said["agentops.gate"]["gen_ai.tool.name"] == "test_send"
    assert said["agentops.approval.requested"]["agentops.approval.reason"] == "approve test_send"
    decided = events(second)["agentops.approval.decided"]
    assert decided["agentops.approval.status"] == "approved"
    assert decided["agentops.approval.kind"] == "action"

    # No argument, result or prompt went anywhere in the trace.
    for span in spans:
        assert b"secret-ish" not in span.SerializeToString()


@pytest.mark.django_db(transaction=True)
def test_the_async_worker_traces_its_runs_and_flushes_when_it_stops(
    make_task, operator, receiver, settings
):
    settings.AGENTOPS_WORKER_CONCURRENCY = 4
    task = make_task(
        [{"calls": [("test_echo", {"text": "hi"})]}, {"content": "ok"}],
        tools=["test_echo"],
        self_check=False,
    )
    run = run_start(task=task, run_input={}, user=operator)
    worker = Runner(4).start()
    try:
        assert worker.submit(run.pk)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            run.refresh_from_db()
            if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
                break
            time.sleep(0.05)
    finally:
        assert worker.drain(10)  # drain flushes the batched spans
    assert run.status == RunStatus.SUCCEEDED
    spans = receiver.of_trace(run.pk.bytes)
    slices = named(spans, "invoke_agent ")
    assert len(slices) == 1
    children = {span.name: span for span in spans if span is not slices[0]}
    assert set(children) == {f"chat {task.model}", "execute_tool test_echo"}
    assert {span.parent_span_id for span in children.values()} == {slices[0].span_id}
    assert attributes(slices[0])["agentops.run.status"] == RunStatus.SUCCEEDED


@pytest.mark.django_db
def test_nothing_is_set_up_without_an_endpoint(make_task, operator, settings):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""
    telemetry.shutdown()
    task = make_task(
        [{"calls": [("test_echo", {"text": "hi"})]}, {"content": "ok"}], tools=["test_echo"]
    )
    run = run_start(task=task, run_input={}, user=operator)
    assert run_until_rest(run) is Outcome.FINISHED
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
    assert telemetry.tracer() is None
    assert telemetry.provider() is None
    assert not [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]
    assert telemetry.flush()  # nothing to send, nothing waited on


@pytest.mark.django_db
def test_a_collector_that_is_down_loses_spans_never_a_run(
    make_task, operator, settings, monkeypatch
):
    import socket

    with socket.socket() as taken:  # a loopback port nothing listens on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{port}"
    try:
        task = make_task(
            [{"calls": [("test_echo", {"text": "hi"})]}, {"content": "ok"}], tools=["test_echo"]
        )
        run = run_start(task=task, run_input={}, user=operator)
        assert run_until_rest(run) is Outcome.FINISHED
        assert run.status == RunStatus.SUCCEEDED
        assert telemetry.provider() is not None
        started = time.monotonic()
        telemetry.flush(3000)  # the export fails (logged); the flush is bounded
        assert time.monotonic() - started < 5
    finally:
        telemetry.shutdown()


@pytest.mark.django_db
def test_a_failing_call_is_marked_by_its_type_never_its_message(make_task, operator, receiver):
    """OpenTelemetry would write "{Type}: {message}" as a failed span's status; a
    message may carry what a far side echoed (a key, a prompt), so only the type goes."""
    from types import SimpleNamespace

    from tasks.services import task_version_current

    task = make_task([{"content": "ok"}])
    run = run_start(task=task, run_input={}, user=operator)
    context = SimpleNamespace(
        run=run, definition=task_version_current(task=task).definition, owner="test"
    )

    def leaks() -> None:
        raise RuntimeError("Incorrect API key provided: sk-live-SECRET123")

    with pytest.raises(RuntimeError), telemetry.run_slice(context):
        telemetry.chat_traced(run, max_tokens=None, call=leaks)
    assert telemetry.flush()

    spans = receiver.of_trace(run.pk.bytes)
    assert {span.name.split()[0] for span in spans} == {"invoke_agent", "chat"}
    for span in spans:
        assert span.status.message == "RuntimeError"
        assert attributes(span)["error.type"] == "RuntimeError"
    assert b"sk-live" not in b"".join(span.SerializeToString() for span in spans)


@pytest.mark.django_db(transaction=True)
def test_a_refused_call_is_said_without_what_the_model_wrote(make_task, operator, receiver):
    """The gate's event names the verdict, never the refusal's text: a schema's
    complaint quotes the argument's value, whatever the model put there."""
    task = make_task(
        [{"calls": [("test_echo", {"text": ["Alice Smith, SSN 078-05-1120"]})]}, {"content": "ok"}],
        tools=["test_echo"],
    )
    run = run_start(task=task, run_input={}, user=operator)
    run_until_rest(run)
    assert telemetry.flush()

    spans = receiver.of_trace(run.pk.bytes)
    gates = [events(span)["agentops.gate"] for span in spans if "agentops.gate" in events(span)]
    assert gates and gates[0]["agentops.gate.verdict"] == "refused"
    assert gates[0]["agentops.gate.reason"] == "arguments or rules refused"
    assert b"078-05-1120" not in b"".join(span.SerializeToString() for span in spans)


def test_with_tracing_off_a_hosts_own_span_gets_no_events(settings):
    from opentelemetry.sdk.trace import TracerProvider

    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""
    telemetry.shutdown()
    host = TracerProvider().get_tracer("the host's own instrumentation")
    with host.start_as_current_span("POST /runs/start") as span:
        assert span.is_recording()
        assert telemetry.recording() is None


def test_an_endpoint_that_is_not_http_turns_tracing_off_and_no_password_is_logged(settings, caplog):
    try:
        settings.OTEL_EXPORTER_OTLP_ENDPOINT = "file:///etc/passwd"
        assert telemetry.tracer() is None
        assert "is not an http(s) URL" in caplog.text
        settings.OTEL_EXPORTER_OTLP_ENDPOINT = "http://agent:hunter2@127.0.0.1:9/"
        assert telemetry.tracer() is not None
        assert "hunter2" not in caplog.text and "127.0.0.1:9" in caplog.text
    finally:
        telemetry.shutdown()
