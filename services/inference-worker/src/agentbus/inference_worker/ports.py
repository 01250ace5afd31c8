"""The engine port: anything that turns an LLM request into an assistant message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest

TextSink = Callable[[str], None]
"""Receives generated text as it comes (deltas, in order). Must not block: it only buffers."""


@dataclass(frozen=True)
class Generation:
    message: ChatMessage
    usage: TokenUsage
    finish_reason: Literal["stop", "tool_calls", "length"]
    first_token_seconds: float | None = None
    """Seconds from the start of generate() to the first generated token, when the engine saw it."""


class EngineError(Exception):
    """The engine could not generate. Retryable errors (overload, timeouts) are tried again."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class LLMEngine(Protocol):
    """Generates one step. Cancelling `generate` must stop the generation (and free its engine slot).

    `on_text`, when given, receives the generated text as it comes, for streaming.
    """

    def healthy(self) -> bool: ...

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation: ...


@runtime_checkable
class ManagedEngine(Protocol):
    """An engine that holds resources (a loaded model, a connection pool): started before the first
    request and closed after the last. Engines without resources need not implement it."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
