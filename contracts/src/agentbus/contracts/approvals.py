"""The public approval contract: risky tool calls wait for a human decision."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from agentbus.contracts.common import BusMessage, HumanInput, Identifier, utc_now
from pydantic import Field


class ApprovalRequested(BusMessage):
    """A tool call waits for approval. Replayable, so an approver who connects late sees it."""

    approval_id: Identifier
    task_id: Identifier
    tenant: Identifier
    agent: Identifier
    tool: str
    arguments: dict[str, Any]
    arguments_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the canonical JSON of `arguments`."
    )
    risk: Literal["low", "medium", "high", "critical"]
    reason: str = Field(description="Why the policy asks for approval.")
    requested_by: Identifier | None = None
    requested_at: datetime = Field(default_factory=utc_now)
    expires_at: datetime


class ApprovalDecision(HumanInput):
    """An approver's answer. `approver` must equal the approver token of the subject."""

    approval_id: Identifier
    decision: Literal["approve", "deny"]
    approver: Identifier
    arguments_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="The hash the approver saw; must match the pending call."
    )
    reason: str | None = Field(default=None, max_length=2000)


class ApprovalResolved(BusMessage):
    """How an approval ended."""

    approval_id: Identifier
    task_id: Identifier
    tenant: Identifier
    outcome: Literal["approved", "denied", "expired"]
    by: Identifier | None = None
    at: datetime = Field(default_factory=utc_now)
