from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import httpx2
import openai
from django.conf import settings

from agentops.runtime.models.base import (
    ModelError,
    ModelTurn,
    ToolCallRequest,
    retry_after_seconds,
)
from agentops.strict_json import nesting_check

# The package's own path for Chat Completions, under its base_url.
CHAT_PATH = "/chat/completions"
TRANSIENT_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
# The answers whose Retry-After says when the server will take the call again (RFC 9110).
RETRY_AFTER_STATUSES = {429, 503}


T = TypeVar("T")


class OpenAICompatibleClient:
    """Chat Completions with tool calling, through the openai package.

    The client does not retry by itself (``max_retries=0``): the engine owns retries, so
    every attempt is visible in the run's record.

    The request goes out through the package's ``AsyncOpenAI.post`` (its base_url, key,
    headers, timeouts and status errors) as the dict the engine built, and the answer
    comes back as its JSON, read here: ``chat.completions.create`` would walk the request
    through its ``TypedDict`` transform and build the answer's pydantic models, which
    cost a worker more CPU than everything else the call does (docs/benchmarks.md,
    bench_concurrency), for a request the engine already makes in the API's own shape
    and an answer of which it reads six fields.

    A call ends at its deadline and an answer at AGENTOPS_MODEL_MAX_ANSWER_BYTES, both
    transient errors: httpx's timeouts bound each read, not the call, so a server that
    trickles its answer a byte at a time, or sends hundreds of MB, would otherwise hold
    the worker as long as it liked and fill its memory.
    """

    def __init__(self, *, model: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self.label = model
        # Local servers (Ollama, vLLM) ignore the key, but the package insists on one.
        self.api_key = api_key or "not-needed"
        self.base_url = base_url
        self.timeout = timeout

    def complete(self, **request: Any) -> ModelTurn:
        """One turn, blocking (the inline mode). It is ``acomplete``'s call, on an event
        loop and with a client of its own: the blocking httpx client can bound each read
        but not the whole call, while a task on a loop is cancelled at its deadline
        wherever it waits (connecting, in the headers, in the body)."""
        return coroutine_run(self._complete_alone(request))

    async def _complete_alone(self, request: dict[str, Any]) -> ModelTurn:
        client = openai.AsyncOpenAI(
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=0,
            http_client=http_client_capped(),
        )
        async with client:
            return await self.turn_ask(client, request)

    async def acomplete(self, **request: Any) -> ModelTurn:
        """One turn, awaited on the async worker's loop: the connection pool is shared by
        every run the worker has waiting on this server (``async_client``)."""
        client = async_client(self.api_key, self.base_url, self.timeout)
        return await self.turn_ask(client, request)

    async def turn_ask(self, client: openai.AsyncOpenAI, request: dict[str, Any]) -> ModelTurn:
        """One turn from ``client``, ended at the call's deadline: its ``timeout`` (the
        engine's, less when the run's time budget is nearly spent), else the client's."""
        deadline = request.get("timeout") or self.timeout
        with self._errors_read(deadline):
            async with asyncio.timeout(deadline):
                response = await client.post(
                    CHAT_PATH,
                    body=self.request(**request),
                    cast_to=httpx2.Response,
                    options=self.request_options(request.get("timeout")),
                )
        return self.response_read(answer_json(response))

    def request(
        self,
        *,
        messages: list[dict],
        tools: list[dict],
        tool_choice: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> dict:
        """The request's body, as Chat Completions takes it. ``timeout`` is no part of
        it: it goes to the package as the call's own (``request_options``)."""
        request: dict = {"model": self.model, "messages": messages}
        if tools:
            request["tools"] = tools
        if tool_choice:
            request["tool_choice"] = {"type": "function", "function": {"name": tool_choice}}
        if max_tokens:
            # max_tokens, not max_completion_tokens: every compatible server knows it.
            request["max_tokens"] = max_tokens
        return request

    @staticmethod
    def request_options(timeout: float | None) -> dict:
        """The package's options for one call, as ``chat.completions.create`` sets them:
        the API key as a bearer token, and the call's timeout (each read's, connect's
        and write's) where it gives one, else the client's."""
        options: dict = {"security": {"bearer_auth": True}}
        if timeout:
            options["timeout"] = timeout
        return options

    @contextmanager
    def _errors_read(self, deadline: float) -> Iterator[None]:
        """The package's errors as ``ModelError``: transient or not, with Retry-After.
        A call past its deadline, or an answer over the cap, is transient: the server may
        answer the next attempt within bounds, and the engine's attempts are counted."""
        try:
            yield
        except TimeoutError as error:  # asyncio.timeout's: the deadline, not one read's
            raise ModelError(
                f"the model server timed out: no whole answer within {deadline:g} s, the "
                "call's deadline (AGENTOPS_MODEL_TIMEOUT, or what the run's time budget "
                "left); the call was ended there",
                transient=True,
            ) from error
        except AnswerTooLarge as error:
            raise error.model_error() from error
        except openai.APITimeoutError as error:
            raise ModelError(f"the model server timed out: {error}", transient=True) from error
        except openai.APIConnectionError as error:
            if isinstance(error.__cause__, AnswerTooLarge):
                # Older openai versions wrap any failure of a send in this error.
                raise error.__cause__.model_error() from error
            raise ModelError(
                f"could not reach the model server: {error}", transient=True
            ) from error
        except openai.APIStatusError as error:
            raise ModelError(
                f"the model server answered {error.status_code}: {_error_text(error)}",
                transient=error.status_code in TRANSIENT_STATUSES,
                status=error.status_code,
                retry_after=_retry_after(error),
            ) from error

    def response_read(self, answer: Any) -> ModelTurn:
        """The turn in ``answer``, the server's JSON. No choices is a transient error (a
        server's hiccup); choices of the wrong shape are the server's error, not the
        engine's, and not transient: the server would answer the same again."""
        if not isinstance(answer, dict) or not answer.get("choices"):
            raise ModelError("the model server returned no choices", transient=True)
        try:
            return self.turn_read(answer)
        except (KeyError, AttributeError, TypeError, IndexError) as error:
            raise ModelError(
                f"the model server's answer is malformed ({type(error).__name__}: {error})",
                transient=False,
            ) from error

    def turn_read(self, answer: dict) -> ModelTurn:
        """The turn as the server sent it. Values of the wrong type or that no database
        stores are kept as sent here; the engine's ``turn_storable`` makes them storable
        and notes each change. It reads as the package's models read an answer they
        build without validating it: a missing field is None, an item of ``tool_calls``
        without a function is no call, and a part that is not an object where one must
        be (a choice, its message, a call's function, the usage) fails the read."""
        choice = answer["choices"][0]
        message = choice.get("message")
        calls = [
            ToolCallRequest(
                id=call.get("id") or "",
                name=call["function"].get("name"),
                arguments=call["function"].get("arguments") or "{}",
            )
            for call in (message.get("tool_calls") or [])
            if isinstance(call, dict) and call.get("function") is not None
        ]
        usage = answer.get("usage")
        if isinstance(usage, dict):
            # A count it does not give is None, not 0: the provider's window then keeps
            # what the call reserved (``waits.turn_tokens``).
            tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        elif usage:
            raise TypeError(f"usage is a {type(usage).__name__}, not an object")
        else:
            tokens_in = tokens_out = 0  # many local servers report no usage
        return ModelTurn(
            content=message.get("content") or "",
            tool_calls=calls,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            model=answer.get("model") or self.model,
            finish_reason=choice.get("finish_reason") or "",
        )


def answer_json(response: httpx2.Response) -> Any:
    """The answer's body as JSON (NaN and Infinity read, as the package reads them);
    a body that is not JSON is a transient error: a proxy's page, an answer cut short.
    Nesting deeper than ``strict_json.MAX_DEPTH`` is refused before it is parsed: the
    engine walks what it stores, and a deep enough answer would exhaust its stack."""
    try:
        body = response.content
        # As json.loads reads bytes: UTF-8, or UTF-16/32 by their first bytes.
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        nesting_check(text)
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ModelError(
            f"the model server's answer is not JSON ({type(error).__name__}: {error})",
            transient=True,
        ) from error


# How much of a server's error message is kept: it goes into every retry's event and
# the run's reason, and a hostile server may send one as long as the answer cap.
ERROR_TEXT_CHARS = 1000


def _error_text(error: openai.APIStatusError) -> str:
    body = error.body
    text = error.message
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            text = str(inner["message"])
    if len(text) > ERROR_TEXT_CHARS:
        text = f"{text[:ERROR_TEXT_CHARS]}… ({len(text)} characters in all)"
    return text


def _retry_after(error: openai.APIStatusError) -> float | None:
    response = getattr(error, "response", None)
    return retry_after_of(error.status_code, response.headers) if response is not None else None


def retry_after_of(status: int, headers: Any) -> float | None:
    """The wait the server asked for with a 429 or 503, in seconds, if it said."""
    return retry_after_seconds(headers) if status in RETRY_AFTER_STATUSES else None


# The async worker's clients, one per event loop and server: a client's connection pool is
# bound to the loop it first ran on. A worker process has one loop, so this holds a client
# for each server its runs call.
_async_clients: dict[tuple[int, str, str | None, float], openai.AsyncOpenAI] = {}


def async_client(api_key: str, base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    key = (id(asyncio.get_running_loop()), api_key, base_url, timeout)
    client = _async_clients.get(key)
    if client is None:
        client = _async_clients[key] = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            http_client=http_client_capped(),
        )
    return client


def coroutine_run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``coroutine`` run to its end from blocking code, on an event loop of its own. The
    inline worker calls in without a loop; where this thread already runs one (which
    ``asyncio.run`` will not nest in), it runs on a thread of its own (as MCP's
    ``run_sync`` does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-call") as pool:
        return pool.submit(asyncio.run, coroutine).result()


class AnswerTooLarge(Exception):
    """A model server's answer went past AGENTOPS_MODEL_MAX_ANSWER_BYTES as it was read,
    with the answer's status and, for a 429 or 503, the wait its Retry-After asked for:
    an error answer too large to read still says when to come back."""

    def __init__(self, limit: int, *, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        answered = f"answered {status} with" if status >= 400 else "'s answer was"
        super().__init__(
            f"the model server{answered} more than {limit} bytes "
            "(AGENTOPS_MODEL_MAX_ANSWER_BYTES); it was cut off there, unread"
        )

    def model_error(self) -> ModelError:
        """Transient, as any answer cut off (the next may be within bounds), unless its
        status says the server would refuse the same request again."""
        refused = self.status >= 400 and self.status not in TRANSIENT_STATUSES
        return ModelError(
            str(self),
            transient=not refused,
            status=self.status if self.status >= 400 else None,
            retry_after=self.retry_after,
        )


def http_client_capped() -> httpx2.AsyncClient:
    """The httpx client under openai's, with every answer read through ``answer_cap``,
    on the process's TLS context (``tls_context``)."""
    return openai.DefaultAsyncHttpxClient(
        verify=tls_context(), event_hooks={"response": [answer_cap]}
    )


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (the system's CA certificates, or SSL_CERT_FILE /
    SSL_CERT_DIR), made once a process and shared by its clients, as an SSLContext may
    be: reading the certificates costs about 20 ms of CPU, which the blocking call, with
    a client of its own each time, would otherwise pay at every call."""
    return httpx2.create_ssl_context()


async def answer_cap(response: httpx2.Response) -> None:
    """httpx's response hook, run before the body is read: the body is then read through
    ``CappedStream`` twice over, on the wire and decoded. Decoded, since a few hundred KB
    of gzip can inflate to GBs; on the wire, since bytes sent past a compressed body's
    end are never decoded (zlib keeps them aside, in memory). A scratch response over
    the counted wire decodes it with httpx's own decoders, as the response would have."""
    limit = settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES
    status = response.status_code
    said = {"status": status, "retry_after": retry_after_of(status, response.headers)}
    wire = CappedStream(response.stream, limit, said=said)
    scratch = httpx2.Response(status, headers=response.headers, stream=wire)
    response.stream = CappedStream(scratch.aiter_bytes(), limit, wire=wire, said=said)
    # The stream now yields the decoded bytes, which must not be decoded again.
    if "content-encoding" in response.headers:
        del response.headers["content-encoding"]


class CappedStream(httpx2.AsyncByteStream):
    """The bytes of ``source``, counted as they are read: past ``limit`` the read raises
    ``AnswerTooLarge`` and httpx closes the connection, so no more than ``limit`` and one
    chunk (httpx decodes at most a MiB at a time) is ever held. Closing it closes
    ``source`` and ``wire``, the stream ``source`` reads from, which may not have begun."""

    def __init__(
        self,
        source: httpx2.AsyncByteStream | AsyncGenerator[bytes, None],
        limit: int,
        *,
        said: dict[str, Any],
        wire: httpx2.AsyncByteStream | None = None,
    ) -> None:
        self.source = source
        self.limit = limit
        self.said = said  # the answer's status and Retry-After, for AnswerTooLarge
        self.wire = wire

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.source:
            read += len(chunk)
            if read > self.limit:
                raise AnswerTooLarge(self.limit, **self.said)
            yield chunk

    async def aclose(self) -> None:
        await self.source.aclose()
        if self.wire is not None:
            await self.wire.aclose()

    @property
    def elapsed(self) -> timedelta | None:
        """The connection's, which httpx's ``response.elapsed`` reads from its stream."""
        return getattr(self.wire or self.source, "elapsed", None)
