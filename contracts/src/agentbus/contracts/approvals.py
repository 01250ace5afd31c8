"""The public approval contract: risky tool calls wait for a human decision."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, HumanInput, Identifier, utc_now
from pydantic import BaseModel, ConfigDict, Field


def arguments_sha256(arguments: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of the canonical JSON of a call's arguments: what an approver's decision must quote.

    Canonical JSON: keys sorted, separators `,` and `:` with no spaces, non-ASCII characters kept as UTF-8
    (`json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`). Clients in other
    languages must produce the same bytes; integers and strings round-trip exactly, so prefer them to floats.
    """
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


class ApprovalDecisionVerdict(BusMessage):
    """What the tool-executor made of one decision, on `agentbus.approvals.verdicts.<tenant>.<approver>`.

    `decision_seq` is the decision's sequence in its stream (the PubAck of the publish), so the approver who
    sent it can tell its own decision's verdict from any other.
    """

    approval_id: str
    decision_seq: int = Field(ge=1)
    approver: str
    outcome: Literal["accepted", "refused"]
    reason_code: str | None = Field(default=None, description="refused: why, as audited.")
    detail: str | None = None
    at: datetime = Field(default_factory=utc_now)


class ApprovalsListRequest(BusMessage):
    """List a tenant's approvals (request/reply on `agentbus.approvals.list.<tenant>`)."""

    include_resolved: bool = Field(default=False, description="Also approvals that ended.")
    approval_id: Identifier | None = Field(default=None, description="Only this approval.")
    limit: int = Field(default=500, ge=1, le=5000)


class ApprovalEntry(BaseModel):
    """One approval and, once it ended, how."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request: ApprovalRequested
    resolution: ApprovalResolved | None = None


class ApprovalsListReply(BusMessage):
    """A tenant's approvals, oldest first."""

    approvals: list[ApprovalEntry] = Field(default_factory=list)
    error: ErrorInfo | None = None
