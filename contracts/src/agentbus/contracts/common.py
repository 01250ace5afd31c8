"""Building blocks shared by every message of the wire contract."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION: Literal[1] = 1

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Identifier = Annotated[
    str,
    StringConstraints(pattern=ID_PATTERN),
    Field(description="An identifier: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'. Safe as a subject token."),
]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC: every timestamp on the bus is one."""
    return datetime.now(UTC)


class BusMessage(BaseModel):
    """A message machines exchange on the bus: unknown fields are ignored, so producers may add fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of the wire contract.")


class HumanInput(BaseModel):
    """A message typed by a person (an approval decision): unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of the wire contract.")


class ErrorInfo(BaseModel):
    """Why something was rejected or failed: a stable machine code and a message for people."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str = Field(description="Stable, machine-readable error code, e.g. 'unknown_agent'.")
    message: str = Field(description="Human-readable explanation.")


class TokenUsage(BaseModel):
    """Tokens consumed by one or more LLM calls."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt_tokens: int = Field(default=0, ge=0, description="Tokens in the prompts sent to the model.")
    completion_tokens: int = Field(default=0, ge=0, description="Tokens the model generated.")

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )
