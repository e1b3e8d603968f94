"""Model clients: one interface, two implementations.

``OpenAICompatibleClient`` speaks Chat Completions with tool calling through the openai
package (OpenAI, Azure OpenAI, vLLM, Ollama, LM Studio...). ``ScriptedClient`` replays a
registered script: the offline demo and the tests use it, and every page that shows a
run made with it says so.
"""

from __future__ import annotations

from agentops.runtime.models.base import (
    ModelClient,
    ModelError,
    ModelNotConfigured,
    ModelTurn,
    ToolCallRequest,
    client_for,
    model_label_for,
)
from agentops.runtime.models.scripted import SCRIPTS, ScriptedClient, script

__all__ = [
    "SCRIPTS",
    "ModelClient",
    "ModelError",
    "ModelNotConfigured",
    "ModelTurn",
    "ScriptedClient",
    "ToolCallRequest",
    "client_for",
    "model_label_for",
    "script",
]
