"""The executor's ports: its store, what publishes its messages, and what runs each kind of tool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.tool_executor.domain import ApprovalRecord, ApprovalStatus, CallRecord, CallStatus, ToolResult
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to publish once the state change that produced it is committed (an outbox row)."""

    subject: str
    msg_id: str
    payload: str
    traceparent: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    id: int
    call_id: str
    message: OutgoingMessage


@dataclass(frozen=True)
class AuditEntry:
    """One decision as received, accepted or refused. Append-only; one row per decision message."""

    message_seq: int
    tenant: str
    subject_approver: str
    outcome: str
    received_at: datetime
    approver: str | None = None
    approval_id: str | None = None
    decision: str | None = None
    reason_code: str | None = None
    detail: str | None = None
    payload: str | None = None


@dataclass(frozen=True)
class Resolution:
    """How a pending approval ends, and what the call's ledger row becomes with it."""

    approval_id: str
    status: ApprovalStatus
    by: str | None
    at: datetime
    reason: str | None
    decision_seq: int | None
    call_status: CallStatus
    call_result: ToolResult | None
    outbox: list[OutgoingMessage]
    audit: AuditEntry | None = None


@dataclass(frozen=True)
class Completion:
    """How an execution ends, and what to publish about it."""

    status: CallStatus
    result: ToolResult
    outbox: list[OutgoingMessage] = field(default_factory=list)


class ApprovalStore(Protocol):
    """Read access to approvals, for the executor and for tools that list or show them (the CLI)."""

    async def list_pending(self, tenant: str | None = None) -> list[ApprovalRecord]:
        """Pending approvals, oldest first; of one tenant, or of all."""
        ...

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        """One approval in any state, or None."""
        ...


class ExecutorStore(ApprovalStore, Protocol):
    """The approvals, the execution ledger, the decision audit and the outbox, changed transactionally."""

    async def get_call(self, call_id: str) -> CallRecord | None: ...

    async def get_with_call(self, approval_id: str) -> tuple[ApprovalRecord | None, CallRecord | None]: ...

    async def insert_call(
        self, call: CallRecord, approval: ApprovalRecord | None, outbox: list[OutgoingMessage]
    ) -> bool:
        """Insert a new call (with its approval and messages) in one transaction; False if it exists."""
        ...

    async def resolve_approval(self, resolution: Resolution) -> bool:
        """Compare-and-set a pending approval to its outcome, with the call's row, the audit entry and the
        messages, in one transaction. False (and nothing changed) when it was no longer pending."""
        ...

    async def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        """Take a READY call, or a RUNNING one whose lease lapsed, as RUNNING under `owner`. Returns the row as
        it was before the claim (its status says which case it was), or None when it cannot be taken."""
        ...

    async def renew_lease(self, call_id: str, owner: str, lease_until: datetime) -> bool: ...

    async def complete(
        self,
        call_id: str,
        owner: str,
        work: Callable[[AsyncConnection], Awaitable[Completion]],
    ) -> Completion | None:
        """Run `work` inside a transaction, then record its completion if `owner` still holds the call.

        Effects `work` writes through the connection commit together with the ledger row, or not at all.
        None (and everything rolled back) when the call is no longer this owner's."""
        ...

    async def unpublished(self, call_id: str | None = None, limit: int = 500) -> list[StoredMessage]: ...

    async def mark_published(self, msg_ids: list[str]) -> None: ...

    async def audit(self, entry: AuditEntry) -> None:
        """Append a decision to the audit table; a redelivered decision adds nothing."""
        ...

    async def due_for_expiry(self, now: datetime, limit: int = 500) -> list[ApprovalRecord]: ...

    async def calls_to_resume(self, now: datetime, limit: int = 500) -> list[CallRecord]:
        """READY calls, and RUNNING ones whose lease lapsed."""
        ...

    async def count_pending(self) -> int: ...


class Publisher(Protocol):
    async def publish(self, message: OutgoingMessage) -> None:
        """Publish and wait for the stream's ack. The msg_id makes a repeat a no-op within the dedupe window."""
        ...


@dataclass(frozen=True)
class ToolInvocation:
    """One execution of a call, as a tool runner sees it."""

    call_id: str
    tenant: str
    task_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    submitted_by: str | None
    traceparent: str | None = None


@dataclass(frozen=True)
class ToolOutput:
    """What a tool produced."""

    ok: bool
    content: str
    error_code: str | None = None
    error_message: str | None = None
    citations: tuple[dict[str, Any], ...] = ()

    @staticmethod
    def failure(code: str, message: str, content: str | None = None) -> ToolOutput:
        return ToolOutput(False, content if content is not None else f"{code}: {message}", code, message)

    def to_result(self) -> ToolResult:
        return ToolResult(self.ok, self.content, self.error_code, self.error_message, self.citations)


class TransientToolError(Exception):
    """The tool could not run this time (a timeout, a peer down, HTTP 5xx): another attempt may succeed.

    Retried up to the tool's `retries` only when a re-run is safe; otherwise it becomes the call's error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ToolRunner(Protocol):
    """Runs one kind of tool."""

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: AsyncConnection | None
    ) -> ToolOutput:
        """Run the call. `connection` is the open ledger transaction, for transactional python tools only."""
        ...
