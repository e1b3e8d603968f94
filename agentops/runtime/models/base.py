from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from django.conf import settings

SCRIPTED_PREFIX = "scripted:"


@dataclass(frozen=True)
class ToolCallRequest:
    """One tool call as the model asked for it; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class ModelTurn:
    content: str
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""
    finish_reason: str = ""


class ModelError(Exception):
    """A model call that failed. Transient ones (timeouts, 429, 5xx, refused
    connections) may be retried; others end the attempt."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class ModelNotConfigured(Exception):
    """The task names a model this deployment cannot reach; said before a run starts."""


class ModelClient(Protocol):
    label: str

    def complete(
        self,
        *,
        messages: list[dict],
        tools: list[dict],
        tool_choice: str | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> ModelTurn:
        """One turn. ``tool_choice`` names a tool the model must call; ``max_tokens``
        bounds the answer; ``timeout`` the seconds to wait."""


def model_label_for(model: str) -> str:
    """What a run records and shows as its model: ``scripted:NAME`` or the model name."""
    if model.startswith(SCRIPTED_PREFIX):
        return model
    name = model or settings.AGENTOPS_MODEL
    if not name:
        raise ModelNotConfigured(
            "No model is configured: set AGENTOPS_MODEL (and OPENAI_API_KEY / "
            "OPENAI_BASE_URL for your server), or name a model on the task."
        )
    if not (settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL):
        raise ModelNotConfigured(
            f"The model {name!r} needs an OpenAI-compatible server: set OPENAI_API_KEY "
            "(OpenAI) or OPENAI_BASE_URL (a local server such as vLLM or Ollama)."
        )
    return name


def client_for(model_label: str) -> ModelClient:
    from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
    from agentops.runtime.models.scripted import ScriptedClient

    if model_label.startswith(SCRIPTED_PREFIX):
        return ScriptedClient.named(model_label[len(SCRIPTED_PREFIX) :])
    return OpenAICompatibleClient(
        model=model_label,
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL or None,
        timeout=settings.AGENTOPS_MODEL_TIMEOUT,
    )
