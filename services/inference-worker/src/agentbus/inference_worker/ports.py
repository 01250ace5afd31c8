"""The engine port: anything that turns an LLM request into an assistant message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest


@dataclass(frozen=True)
class Generation:
    message: ChatMessage
    usage: TokenUsage
    finish_reason: Literal["stop", "tool_calls", "length"]


class EngineError(Exception):
    """The engine could not generate. Retryable errors (overload, timeouts) are tried again."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class LLMEngine(Protocol):
    def healthy(self) -> bool: ...

    async def generate(self, request: LlmRequest) -> Generation: ...
