"""OpenTelemetry traces of runs, named by the GenAI semantic conventions
(docs/observability.md has the spans and their attributes).

A run is one trace, whatever works it: its trace id is the run's UUID (128 bits, as a
trace id is), so every slice, in any worker process on any machine, days apart across
an approval, lands in the same trace without anything stored to carry it. Each slice is
a root span ``invoke_agent {task name}`` in that trace (there is no span for the whole
run: it would have to be open for days, and a process that ends cannot end another's
span); its children are ``chat {model}`` for each model request and ``execute_tool
{tool name}`` for each tool call attempt. Gates and approvals are the slice span's events.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` empty nothing is set up: no provider, no exporter,
no thread, and every hook returns after one settings read. With it, spans go over
OTLP/HTTP (protobuf) through a ``BatchSpanProcessor``, flushed when the async worker
stops (``flush``) and at the process's exit (the provider's own atexit hook).

No secret and no argument, result or prompt goes into a span: names, ids, counts,
statuses and the engine's own short reasons (clipped), nothing the agent or a tool sent.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db import transaction
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from agentops.runtime.engine.context import Context
    from agentops.runtime.engine.doors import Doors
    from agentops.runtime.models.base import ModelTurn
    from agentops.runtime.tools.base import ToolResult
    from approvals.models import Approval
    from tasks.models import Run, Step, Tool

logger = logging.getLogger("agentops.telemetry")

T = TypeVar("T")

TRACER_NAME = "agentops"
# Attribute values the engine writes from its own text (a gate's reason, a model's
# finish reason) are clipped: a span is not the record, the trail is.
TEXT_CHARS = 300
# How long a process's exit waits for its last spans: a collector that hangs must not
# hold a worker's stop for long.
EXIT_FLUSH_MILLIS = 2000
# The GenAI conventions' tool types, by the kind of tool: a python tool is a function
# the agent's host runs; http, email and mcp reach an outside service; sql a data store.
TOOL_TYPES = {"python": "function", "sql": "datastore"}
SCRIPTED_PROVIDER = "agentops.scripted"

_lock = threading.Lock()
_provider: TracerProvider | None = None
_endpoint = ""
# The trace id the next root span takes (the run's), read by the id generator.
_run_trace: ContextVar[int | None] = ContextVar("agentops_run_trace", default=None)


def clipped(text: Any) -> str:
    text = str(text or "")
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces address under a base endpoint, as the OTLP exporter
    specification derives it from ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    return endpoint.rstrip("/") + "/v1/traces"


def run_trace_id(run_id: uuid.UUID) -> int:
    """The trace id of a run: its UUID's 128 bits (never zero for a UUID4)."""
    return run_id.int


def provider() -> TracerProvider | None:
    """This process's tracer provider, None while nothing is set up."""
    return _provider


def tracer() -> trace.Tracer | None:
    """The tracer, set up on first use when an endpoint is configured; None when none
    is (then nothing is ever set up). A changed endpoint (tests) gets a new provider."""
    global _provider, _endpoint
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT
    if not endpoint:
        return None
    if endpoint != _endpoint:
        with _lock:
            if endpoint != _endpoint:
                old, _endpoint = _provider, endpoint
                try:
                    _provider = provider_make(endpoint)
                except Exception:
                    # Tracing must never stop a run: no traces (said once), the run goes on.
                    logger.exception(
                        "tracing: cannot send spans to %s; tracing is off", endpoint_shown(endpoint)
                    )
                    _provider = None
                if old is not None:
                    old.shutdown()
    return _provider.get_tracer(TRACER_NAME) if _provider is not None else None


def endpoint_shown(endpoint: str) -> str:
    """The endpoint for a log line: without the credentials a URL may carry."""
    parts = urlsplit(endpoint)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return urlunsplit((parts.scheme, f"{parts.hostname or ''}{port}", parts.path, "", ""))


def provider_make(endpoint: str) -> TracerProvider:
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT: {endpoint_shown(endpoint)!r} is not an http(s) URL"
        )
    # Imported here: a process with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RunTraceIds(RandomIdGenerator):
        """A slice's span takes its run's trace id; anything else a random one."""

        def generate_trace_id(self) -> int:
            return _run_trace.get() or super().generate_trace_id()

    made = TracerProvider(
        resource=Resource.create({SERVICE_NAME: settings.OTEL_SERVICE_NAME}),
        id_generator=RunTraceIds(),
        # Its own atexit shutdown would wait on a collector that hangs (seconds a
        # process); the exit flush below is bounded instead.
        shutdown_on_exit=False,
    )
    # OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION and the certificate variables
    # are read by the exporter itself.
    made.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    # The provider flushes at the interpreter's exit (atexit); a queue's worker process
    # (multiprocessing) ends with os._exit, which skips atexit but still runs threading's
    # exit hooks: the async worker drains there too (runner.runner). Billiard's children
    # (Celery prefork) skip both: agentops.celery flushes when they shut down.
    threading._register_atexit(lambda: made.force_flush(EXIT_FLUSH_MILLIS))
    atexit.register(lambda: made.force_flush(EXIT_FLUSH_MILLIS))
    logger.info("tracing: spans go to %s", endpoint_shown(traces_url(endpoint)))
    return made


def flush(timeout_millis: int = 5000) -> bool:
    """Send the spans still batched (a worker about to stop), waiting at most
    ``timeout_millis``. False if that was not enough; an export the collector refused
    is logged by the exporter, not reported here."""
    if _provider is None:
        return True
    return _provider.force_flush(timeout_millis)


def shutdown() -> None:
    """Flush and drop the provider (tests; a process's exit does it by itself)."""
    global _provider, _endpoint
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _provider, _endpoint = None, ""


def provider_name(model_label: str) -> str:
    from agentops.runtime.models.base import SCRIPTED_PREFIX

    # Every real model is reached through the OpenAI-compatible client.
    return SCRIPTED_PROVIDER if model_label.startswith(SCRIPTED_PREFIX) else "openai"


def recording() -> trace.Span | None:
    """The span of the slice being worked (or a child of it), if one records. With
    tracing off, none: a host's own instrumented span (a request's) gets no events."""
    if _provider is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def error_mark(span: trace.Span, error: BaseException) -> None:
    # The type only: an error's message may carry what a far side echoed.
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


@contextlib.contextmanager
def child_span(name: str, kind: SpanKind, attributes: dict[str, Any]) -> Iterator[trace.Span]:
    """A span within the slice's, current while the block runs; an exception out of the
    block marks it by its type alone (``error_mark``) and goes on."""
    with tracer().start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as error:
            error_mark(span, error)
            raise


# -- The hooks the engine calls ------------------------------------------------------


@contextlib.contextmanager
def run_slice(ctx: Context) -> Iterator[None]:
    """A slice of the run, as the span ``invoke_agent {task name}`` in the run's trace
    (``loop.advance``). Its usage is the slice's; its status the run's as it ends."""
    traced = tracer()
    if traced is None:
        yield
        return
    run, definition = ctx.run, ctx.definition
    name = str(definition.get("name") or definition.get("slug") or run.task_id)
    tokens = (run.tokens_in, run.tokens_out)
    marker = _run_trace.set(run_trace_id(run.pk))
    try:
        # An empty context: no parent, so the id generator gives the run's trace id.
        span = traced.start_span(
            f"invoke_agent {name}",
            context=otel_context.Context(),
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": name,
                "gen_ai.agent.id": str(definition.get("slug") or run.task_id),
                "gen_ai.agent.version": str(run.task_version.number),
                "gen_ai.conversation.id": str(run.pk),
                "gen_ai.request.model": run.model_label,
                "gen_ai.provider.name": provider_name(run.model_label),
                "agentops.run.id": str(run.pk),
                "agentops.run.trigger_kind": run.trigger_kind,
                "agentops.worker": ctx.owner,
            },
        )
    finally:
        _run_trace.reset(marker)
    # set_status_on_exception off: OpenTelemetry would write "{Type}: {message}" over
    # error_mark's type, and a message may carry what a far side echoed.
    with trace.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ):
        try:
            yield
        except BaseException as error:
            error_mark(span, error)
            raise
        finally:
            run = ctx.run  # a reload replaces it
            span.set_attribute("agentops.run.status", run.status)
            span.set_attribute("gen_ai.usage.input_tokens", max(0, run.tokens_in - tokens[0]))
            span.set_attribute("gen_ai.usage.output_tokens", max(0, run.tokens_out - tokens[1]))
            span.set_attribute("agentops.run.steps_used", run.steps_used)


def chat_traced(run: Run, *, max_tokens: int | None, call: Callable[[], ModelTurn]) -> ModelTurn:
    """``call()``, one model request, as the span ``chat {model}`` (``turns.model_call``)."""
    if recording() is None or tracer() is None:
        return call()
    from agentops.runtime.providers import token_count

    model = run.model_label
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        "gen_ai.provider.name": provider_name(model),
        "gen_ai.conversation.id": str(run.pk),
    }
    if max_tokens:
        attributes["gen_ai.request.max_tokens"] = int(max_tokens)
    with child_span(f"chat {model}", SpanKind.CLIENT, attributes) as span:
        turn = call()
        # As the server said them, before the turn is made storable: counts or nothing.
        for name, value in (
            ("gen_ai.usage.input_tokens", token_count(turn.tokens_in)),
            ("gen_ai.usage.output_tokens", token_count(turn.tokens_out)),
        ):
            if value is not None:
                span.set_attribute(name, value)
        if isinstance(turn.model, str) and turn.model:
            span.set_attribute("gen_ai.response.model", clipped(turn.model))
        if isinstance(turn.finish_reason, str) and turn.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [clipped(turn.finish_reason)])
        return turn


def tool_traced(step: Step, tool: Tool, call: Callable[[], ToolResult]) -> ToolResult:
    """``call()``, one attempt of a tool call, as the span ``execute_tool {tool name}``
    (``fire.call_attempts``). Neither its arguments nor its result go in."""
    if recording() is None or tracer() is None:
        return call()
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool.name,
        "gen_ai.tool.call.id": clipped(step.tool_call_id),
        "gen_ai.tool.type": TOOL_TYPES.get(tool.kind, "extension"),
        "agentops.tool.kind": tool.kind,
        "agentops.tool.side_effect": tool.side_effect,
        "agentops.step.number": step.number,
    }
    with child_span(f"execute_tool {tool.name}", SpanKind.INTERNAL, attributes) as span:
        result = call()
        if not result.ok:
            span.set_attribute("error.type", "tool_error")
            span.set_attribute("agentops.tool.transient", bool(result.transient))
            span.set_status(Status(StatusCode.ERROR, "the tool reported an error"))
        return result


def doors_said(call: dict, doors: Doors) -> None:
    """What the four doors said of a requested call, as the event ``agentops.gate`` on
    the slice's span (``calls.call_propose``)."""
    span = recording()
    if span is None:
        return
    # Nothing the model wrote: a refusal's text quotes the arguments (a schema's
    # complaint about a value), and an ungranted name is whatever the model made up.
    if doors.refusal:
        verdict = "refused"
        reason = "not granted" if doors.tool is None else "arguments or rules refused"
    else:
        verdict, reason = doors.decision.verdict.value, doors.decision.reason
    span.add_event(
        "agentops.gate",
        {
            "gen_ai.tool.name": doors.tool.name if doors.tool is not None else "",
            "agentops.gate.verdict": verdict,
            "agentops.gate.reason": clipped(reason),
        },
    )


def run_waits(why: str) -> None:
    """The run waits for a person (``stops.run_wait``, inside the step's transaction):
    the event ``agentops.approval.requested``, added once that transaction commits."""
    span = recording()
    if span is None:
        return
    transaction.on_commit(
        lambda: span.add_event(
            "agentops.approval.requested", {"agentops.approval.reason": clipped(why)}
        )
    )


def approval_acted_on(approval: Approval) -> None:
    """The engine takes up a decided approval (``calls.call_after_gate``): the event
    ``agentops.approval.decided``, with who decided left out (a person's name is not
    telemetry)."""
    span = recording()
    if span is None:
        return
    span.add_event(
        "agentops.approval.decided",
        {
            "agentops.approval.id": str(approval.pk),
            "agentops.approval.kind": approval.kind,
            "agentops.approval.status": approval.status,
            "gen_ai.tool.name": clipped(approval.tool_name),
        },
    )
