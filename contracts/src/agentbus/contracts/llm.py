"""Internal LLM messages: OpenAI-style chat messages, tool schemas and tool calls."""

from __future__ import annotations

from typing import Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier, TokenUsage
from pydantic import BaseModel, ConfigDict, Field


class ToolCall(BaseModel):
    """A call the model asks for, as in OpenAI's chat API (arguments already decoded)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(description="Unique within the task; results refer to it.")
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ChatMessage(BaseModel):
    """One message of a chat conversation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list, description="Assistant messages only.")
    tool_call_id: str | None = Field(default=None, description="Tool messages only: the call answered.")
    name: str | None = Field(default=None, description="Tool messages only: the tool's name.")


class ToolSpec(BaseModel):
    """A tool offered to the model: its name, what it does and its JSON-Schema parameters."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    description: str
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments object.")


class LlmRequest(BusMessage):
    """Generate one step for a task. Published on the model's own subject."""

    request_id: str = Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,160}$", description="Unique per step of a task; the idempotency key."
    )
    task_id: Identifier
    tenant: Identifier
    agent: Identifier
    model: Identifier
    step: int = Field(ge=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] = Field(default_factory=list)
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)


class LlmResult(BusMessage):
    """The outcome of an LlmRequest: either a message (text and/or tool calls) or an error."""

    request_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,160}$")
    task_id: Identifier
    tenant: Identifier
    model: Identifier
    step: int = Field(ge=1)
    message: ChatMessage | None = Field(default=None, description="The assistant message, on success.")
    finish_reason: Literal["stop", "tool_calls", "length", "error"] = "stop"
    usage: TokenUsage = Field(default_factory=TokenUsage)
    error: ErrorInfo | None = None
    latency_ms: float = Field(default=0.0, ge=0, description="Engine time for this request.")
