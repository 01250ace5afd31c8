"""Internal tool messages: calls from the agent-runner to the tool-executor, and what comes back."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier, utc_now
from agentbus.contracts.rag import RetrievedChunk
from pydantic import BaseModel, ConfigDict, Field

CALL_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,160}$"

GUARDRAIL_REVIEW_TOOL = "guardrail_review"
"""The tool through which the runner holds a task's input or output for an approver (a guardrail's
`require_approval`): approving it releases the text, denying it (or letting it expire) fails the task."""


class ToolCallGuardrail(BaseModel):
    """What the agent's guardrails decided about a call's arguments (already masked where they redact)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    action: Literal["block", "require_approval"] = Field(
        description="`block`: the call is not run and returns an error the model reads; `require_approval`: "
        "it waits in the approval inbox whatever its tool's own policy says."
    )
    reason: str = Field(
        max_length=2000, description="The findings, without the matched text: the error or the approver's reason."
    )


class ToolCallRequested(BusMessage):
    """Execute one tool call of a task. `call_id` is the execution ledger's idempotency key."""

    call_id: str = Field(
        pattern=CALL_ID_PATTERN, description="Unique per tool call across all tasks: `<task_id>.<step>.<index>`."
    )
    tool_call_id: str = Field(min_length=1, max_length=200, description="The model's id for the call.")
    task_id: Identifier
    tenant: Identifier
    agent: Identifier
    tool: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Any] = Field(default_factory=dict)
    step: int = Field(ge=1, description="LLM step that asked for the call.")
    submitted_by: Identifier | None = Field(default=None, description="Task submitter, for self-approval rules.")
    requested_at: datetime = Field(default_factory=utc_now)
    guardrail: ToolCallGuardrail | None = Field(
        default=None, description="The agent's guardrails found something in the arguments that holds the call."
    )


class ToolCallUpdate(BusMessage):
    """Progress of a tool call, back to the agent-runner: approval pending, approval resolved, or the result.

    The runner turns the approval updates into the task's `approval_pending`/`approval_resolved` events, so
    the task's event stream keeps one writer and gap-free `seq`.
    """

    kind: Literal["approval_pending", "approval_resolved", "result"]
    call_id: str = Field(pattern=CALL_ID_PATTERN)
    tool_call_id: str = Field(min_length=1, max_length=200)
    task_id: Identifier
    tenant: Identifier
    tool: str
    approval_id: Identifier | None = Field(default=None, description="Approval updates: the approval.")
    expires_at: datetime | None = Field(default=None, description="approval_pending: when it expires.")
    outcome: Literal["approved", "denied", "expired"] | None = Field(
        default=None, description="approval_resolved: how it ended."
    )
    by: Identifier | None = Field(default=None, description="approval_resolved: who decided.")
    ok: bool = Field(default=True, description="result: whether the tool succeeded.")
    content: str = Field(default="", description="result: the text the model reads (output or error).")
    error: ErrorInfo | None = Field(default=None, description="result: why it failed, when it did.")
    citations: list[RetrievedChunk] = Field(default_factory=list, description="result: retrieved sources.")
    usage_ids: list[str] = Field(
        default_factory=list,
        description="result: the usage records this call caused (its own, a search's), published before the "
        "result, so the task's cost can wait for them.",
    )
    at: datetime = Field(default_factory=utc_now)


class ToolCallWithdrawn(BusMessage):
    """The task of a call ended (cancelled, deadline, failed): never run it, and expire a pending approval."""

    call_id: str = Field(pattern=CALL_ID_PATTERN)
    task_id: Identifier
    tenant: Identifier
    reason: str = Field(max_length=1000, description="Why, for the approvals' audit trail.")
    at: datetime = Field(default_factory=utc_now)
