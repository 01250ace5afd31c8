"""Internal usage records: every service reports what it consumed, once per usage id."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from agentbus.contracts.common import BusMessage, Identifier, utc_now
from pydantic import Field


class UsageRecorded(BusMessage):
    """Something billable happened. `usage_id` is the idempotency key of the ledger."""

    usage_id: str = Field(min_length=1, max_length=200, description="Unique per billable effect.")
    kind: Literal["llm", "gpu", "tool", "retrieval"]
    tenant: Identifier
    task_id: Identifier | None = None
    agent: Identifier | None = None
    model: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    gpu_seconds: float = Field(default=0.0, ge=0)
    node_class: str | None = Field(default=None, description="gpu: the worker node class priced per GPU-hour.")
    tool: str | None = Field(default=None, description="tool/retrieval: the tool, priced per call.")
    reservation_id: str | None = Field(default=None, description="The budget reservation this settles.")
    at: datetime = Field(default_factory=utc_now)
