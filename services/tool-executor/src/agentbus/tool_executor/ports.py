"""The executor's ports: its store (units of work over the ledger), what publishes its messages, and what runs
each kind of tool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from agentbus.runtime.errors import DependencyUnavailableError
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    Withdrawal,
)

T = TypeVar("T")


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
    """One decision as received, accepted or refused. Append-only; one row per decision message, so a
    redelivered decision finds its entry and gets the same verdict again."""

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


@dataclass(frozen=True)
class Claim:
    """An execution of a call held by one executor: the owner and the attempt it claimed. A later claim of the
    same call (a takeover after the lease lapsed) has another attempt, so a stale holder cannot record."""

    call_id: str
    owner: str
    attempt: int


@dataclass(frozen=True)
class ClaimRequest:
    """A request to take a call: READY, or RUNNING with its lease lapsed by `now`, for `owner` until `lease_until`."""

    call_id: str
    owner: str
    now: datetime
    lease_until: datetime


@dataclass(frozen=True)
class Completion:
    """How an execution ends, and what to publish about it."""

    status: CallStatus
    result: ToolResult
    outbox: list[OutgoingMessage] = field(default_factory=list)


class DecisionAuditedError(Exception):
    """The decision's message was audited by another delivery of it first: the unit of work is rolled back, and
    the next delivery replays the decision."""


class StoreUnavailableError(DependencyUnavailableError):
    """The executor's database cannot be reached (down, refusing connections, locked beyond its timeout).

    Never a reason to give up on a call or a decision: the message waits for the database."""


class Ledger(Protocol):
    """The executor's records, inside one transaction of the store.

    A unit of work (a function of a Ledger) runs inside the store's writer and commits with the other units
    of its batch. It may be run a second time (when its batch has to be retried unit by unit), so it does
    nothing but read and write through this interface and compute from what it read: metrics, logs and
    publishing happen after the commit, from what it returned. Compare-and-set methods return False (and
    change nothing) when the row was not in the expected state.
    """

    def call(self, call_id: str) -> CallRecord | None:
        """A registered call, or None (never seen, or only its withdrawal was: see `withdrawal`)."""
        ...

    def withdrawal(self, call_id: str) -> Withdrawal | None: ...

    def approval(self, approval_id: str) -> ApprovalRecord | None: ...

    def audit_entry(self, message_seq: int) -> AuditEntry | None: ...

    def decision_context(
        self, message_seq: int, approval_id: str
    ) -> tuple[AuditEntry | None, ApprovalRecord | None, CallRecord | None]:
        """What a decision is checked against, read together: its message's audit entry if it has one (it was
        delivered before), the approval it names, and that approval's call."""
        ...

    def insert_call(self, call: CallRecord, approval: ApprovalRecord | None, outbox: list[OutgoingMessage]) -> bool:
        """Register a new call with its approval and messages; False when its id is taken (by the call itself,
        or by its withdrawal that arrived first)."""
        ...

    def register_withdrawn(self, call: CallRecord, outbox: list[OutgoingMessage]) -> bool:
        """Fill in a call whose withdrawal arrived before it (status WITHDRAWN); False if not in that state."""
        ...

    def insert_withdrawal(self, withdrawal: Withdrawal) -> bool:
        """Record the withdrawal of a call never seen; False when the call (or its withdrawal) exists."""
        ...

    def mark_withdrawn(self, withdrawal: Withdrawal) -> None:
        """Note a registered call's withdrawal (once); its status is left as it is."""
        ...

    def withdraw_call(
        self, call_id: str, expected: CallStatus, result: ToolResult, outbox: list[OutgoingMessage]
    ) -> bool:
        """Compare-and-set a call that has not started to WITHDRAWN, with its result and messages."""
        ...

    def resolve_approval(self, resolution: Resolution) -> bool:
        """Compare-and-set a pending approval to its outcome, with the call's row and the messages."""
        ...

    def resolve_with_audit(self, resolution: Resolution, entry: AuditEntry) -> bool:
        """Resolve a pending approval and audit the decision that resolved it, together. False (nothing written)
        when the approval was no longer pending; DecisionAuditedError when the decision's message was audited
        meanwhile."""
        ...

    def add_audit(self, entry: AuditEntry) -> bool:
        """Append a decision to the audit; False when its message is audited already."""
        ...

    def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        """Take a READY call, or a RUNNING one whose lease lapsed, as RUNNING under `owner`. Returns the row as it
        is after the claim (`attempts` > 1 means a takeover), or None when it cannot be taken."""
        ...

    def renew_lease(self, claim: Claim, lease_until: datetime) -> bool: ...

    def finish(self, claim: Claim, completion: Completion) -> bool:
        """Record how a claimed execution ended, with its messages, if the claim still holds."""
        ...

    def unpublished(
        self, call_id: str | None = None, *, created_before: datetime | None = None, limit: int = 500
    ) -> list[StoredMessage]: ...

    def mark_published(self, msg_ids: list[str], at: datetime) -> None: ...

    def due_for_expiry(self, now: datetime, limit: int = 500) -> list[ApprovalRecord]: ...

    def calls_to_resume(self, now: datetime, *, ready_before: datetime, limit: int = 500) -> list[CallRecord]:
        """Calls READY since before `ready_before`, and RUNNING ones whose lease lapsed."""
        ...

    def count_pending(self) -> int: ...

    def approvals(
        self, tenant: str, *, include_resolved: bool, approval_id: str | None = None, limit: int = 500
    ) -> list[ApprovalRecord]:
        """A tenant's approvals, oldest first: pending ones, or all; or the one with this id."""
        ...

    def audit_entries(self, approval_id: str | None = None) -> list[AuditEntry]: ...


@dataclass(frozen=True)
class EffectResult:
    rowcount: int
    rows: list[sa.Row[Any]]


class EffectConnection(Protocol):
    """The open ledger transaction, as a `transactional` python tool sees it: what it writes commits together
    with the call's outcome, or not at all."""

    async def execute(self, statement: sa.Executable) -> EffectResult: ...

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """Writes inside are undone if the block raises; the transaction goes on."""
        ...


class ExecutorStore(Protocol):
    """Units of work over the ledger, group-committed by one writer."""

    async def transact(self, work: Callable[[Ledger], T], *, decision: tuple[int, str] | None = None) -> T:
        """Run `work` in a transaction (shared with other units) and return its result once committed.

        `decision` (message seq, approval id): `work` asks for this decision's context; the store may read the
        contexts of the decisions it runs together in one go."""
        ...

    async def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        """`Ledger.claim` as a unit of its own; claims queued together are taken together."""
        ...

    async def finish(self, claim: Claim, completion: Completion) -> bool:
        """`Ledger.finish` as a unit of its own; completions queued together are recorded together."""
        ...

    async def complete_with_effects(
        self, claim: Claim, work: Callable[[EffectConnection], Awaitable[Completion]]
    ) -> Completion | None:
        """Run `work` in a transaction of its own, then record its completion if the claim still holds; its
        effects commit with the ledger row, or not at all. None (everything rolled back) when the claim is lost."""
        ...


class Publisher(Protocol):
    async def publish(self, message: OutgoingMessage) -> None:
        """Publish to a stream and wait for its ack. The msg_id makes a repeat a no-op within the dedupe window."""
        ...

    async def notify(self, subject: str, payload: str) -> None:
        """Publish a notice on a core subject (no stream keeps it): those listening now hear it."""
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
    """What a tool produced, and the usage records it caused elsewhere (a search billed by the retriever)."""

    ok: bool
    content: str
    error_code: str | None = None
    error_message: str | None = None
    citations: tuple[dict[str, Any], ...] = ()
    usage_ids: tuple[str, ...] = ()

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


class ToolUnavailableError(TransientToolError):
    """What the tool needs does not answer at all (no retriever serving, none answering in time).

    A tool that is safe to run again waits for it, however long it takes, rather than failing the call."""

    def __init__(self, code: str, message: str, *, waiting_for: str) -> None:
        super().__init__(code, message)
        self.waiting_for = waiting_for


class ToolNotStartedError(ToolUnavailableError):
    """What the tool needs was not there when the call was about to start: nothing was sent, so any tool, safe
    to run twice or not, waits for it and then runs."""


class ToolInterruptedError(ToolUnavailableError):
    """What the tool needs went away while the call ran: its outcome is unknown. A tool that is safe to run
    again waits for it and runs again; any other call ends `execution_interrupted`."""


class DependencyGate(Protocol):
    """What a kind of tool needs before a call of it may start (an MCP server's connection). A call whose tool
    finds it unavailable is not claimed: it stays ready, and waits."""

    def unavailable(self, definition: ToolDefinition) -> str | None:
        """What the tool waits for, when that is not available now."""
        ...

    async def wait(self, definition: ToolDefinition, timeout: float) -> bool:
        """Wait at most `timeout` seconds for it; whether it is available now."""
        ...


class ToolRunner(Protocol):
    """Runs one kind of tool."""

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        """Run the call. `connection` is the open ledger transaction, for transactional python tools only."""
        ...
