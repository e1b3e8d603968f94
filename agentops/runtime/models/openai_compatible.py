from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai

from agentops.runtime.models.base import (
    ModelError,
    ModelTurn,
    ToolCallRequest,
    retry_after_seconds,
)

TRANSIENT_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
# The answers whose Retry-After says when the server will take the call again (RFC 9110).
RETRY_AFTER_STATUSES = {429, 503}


class OpenAICompatibleClient:
    """Chat Completions with tool calling, through the openai package.

    The client does not retry by itself (``max_retries=0``): the engine owns retries, so
    every attempt is visible in the run's record.
    """

    def __init__(self, *, model: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.model = model
        self.label = model
        # Local servers (Ollama, vLLM) ignore the key, but the package insists on one.
        self.api_key = api_key or "not-needed"
        self.base_url = base_url
        self.timeout = timeout

    def complete(self, **request: Any) -> ModelTurn:
        """One turn, blocking (the inline mode)."""
        client = openai.OpenAI(
            api_key=self.api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )
        try:
            with self._errors_read():
                response = client.chat.completions.create(**self.request(**request))
        finally:
            client.close()
        return self.response_read(response)

    async def acomplete(self, **request: Any) -> ModelTurn:
        """One turn, awaited on the async worker's loop: the connection pool is shared by
        every run the worker has waiting on this server (``async_client``)."""
        client = async_client(self.api_key, self.base_url, self.timeout)
        with self._errors_read():
            response = await client.chat.completions.create(**self.request(**request))
        return self.response_read(response)

    def request(
        self,
        *,
        messages: list[dict],
        tools: list[dict],
        tool_choice: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> dict:
        request: dict = {"model": self.model, "messages": messages}
        if tools:
            request["tools"] = tools
        if tool_choice:
            request["tool_choice"] = {"type": "function", "function": {"name": tool_choice}}
        if max_tokens:
            # max_tokens, not max_completion_tokens: every compatible server knows it.
            request["max_tokens"] = max_tokens
        if timeout:
            request["timeout"] = timeout
        return request

    @contextmanager
    def _errors_read(self) -> Iterator[None]:
        """The package's errors as ``ModelError``: transient or not, with Retry-After."""
        try:
            yield
        except openai.APITimeoutError as error:
            raise ModelError(f"the model server timed out: {error}", transient=True) from error
        except openai.APIConnectionError as error:
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

    def response_read(self, response: Any) -> ModelTurn:
        if not getattr(response, "choices", None):
            raise ModelError("the model server returned no choices", transient=True)
        try:
            return self.turn_read(response)
        except (AttributeError, TypeError, IndexError) as error:
            # The package builds its objects without validating them: a server's answer
            # of the wrong shape fails here, as the server's error, not the engine's.
            raise ModelError(
                f"the model server's answer is malformed ({type(error).__name__}: {error})",
                transient=False,
            ) from error

    def turn_read(self, response: Any) -> ModelTurn:
        """The turn as the server sent it. Values of the wrong type or that no database
        stores are kept as sent here; the engine's ``turn_storable`` makes them storable
        and notes each change."""
        choice = response.choices[0]
        message = choice.message
        calls = [
            ToolCallRequest(
                id=call.id or "",
                name=call.function.name,
                arguments=call.function.arguments or "{}",
            )
            for call in (message.tool_calls or [])
            if getattr(call, "function", None) is not None
        ]
        usage = response.usage
        return ModelTurn(
            content=message.content or "",
            tool_calls=calls,
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            model=response.model or self.model,
            finish_reason=choice.finish_reason or "",
        )


def _error_text(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return error.message


def _retry_after(error: openai.APIStatusError) -> float | None:
    """The wait the server asked for with a 429 or 503, in seconds, if it said."""
    if error.status_code not in RETRY_AFTER_STATUSES:
        return None
    response = getattr(error, "response", None)
    return retry_after_seconds(response.headers) if response is not None else None


# The async worker's clients, one per event loop and server: a client's connection pool is
# bound to the loop it first ran on. A worker process has one loop, so this holds a client
# for each server its runs call.
_async_clients: dict[tuple[int, str, str | None, float], openai.AsyncOpenAI] = {}


def async_client(api_key: str, base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    key = (id(asyncio.get_running_loop()), api_key, base_url, timeout)
    client = _async_clients.get(key)
    if client is None:
        client = _async_clients[key] = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0
        )
    return client
