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

# Imported here, with the engine, not at a run's first model call: the openai package
# takes most of a second to import, and that would count as the run's seconds of work.
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from agentops.runtime.models.scripted import SCRIPTS, ScriptedClient, script

__all__ = [
    "SCRIPTS",
    "ModelClient",
    "ModelError",
    "ModelNotConfigured",
    "ModelTurn",
    "OpenAICompatibleClient",
    "ScriptedClient",
    "ToolCallRequest",
    "client_for",
    "model_label_for",
    "script",
]
