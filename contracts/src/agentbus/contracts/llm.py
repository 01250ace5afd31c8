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
    requested_model: Identifier | None = Field(
        default=None, description="The agent's model before routing picked `model` (a deployment or a fallback)."
    )
    stream: bool = Field(default=False, description="Publish `token` events on the task's stream while generating.")
    output_checked: bool = Field(
        default=False,
        description="The task's guardrails check the generated text and tool calls before they go further: the "
        "worker streams no tokens and keeps the output out of its generation span (token counts only).",
    )
    event_seq: int | None = Field(
        default=None, ge=1, description="The task's last event seq when the step was requested; token events carry it."
    )
    purpose: Literal["step", "summary", "guardrail"] = Field(
        default="step",
        description="step: a step of the agent's loop. summary: a summary of a session's oldest turns, which "
        "replaces them in its history. guardrail: a classifier model judging a task's input or answer for a "
        "`model` guardrail check. Summaries and classifications are costed and budgeted with their task.",
    )


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
    queue_ms: float = Field(default=0.0, ge=0, description="Time the request waited before a worker took it.")
    ttft_ms: float | None = Field(default=None, ge=0, description="Time to first token, when streamed.")
    gpu_seconds: float = Field(default=0.0, ge=0, description="Accelerator time the request held, for the ledger.")
    node_class: str | None = Field(default=None, description="Worker node class, for GPU pricing.")
    usage_id: str | None = Field(
        default=None,
        max_length=200,
        description="The usage record of this request, published before the result; None when nothing billable.",
    )


class LlmAbort(BusMessage):
    """Stop generating a request (its task was cancelled). Best effort, on core NATS."""

    request_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,160}$")
    task_id: Identifier
