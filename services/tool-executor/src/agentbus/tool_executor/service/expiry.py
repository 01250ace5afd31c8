"""Ending a pending approval without a decision: it expired, or the task of its call ended (a withdrawal).

Used by several use cases: the sweep (overdue approvals), a call or a decision that finds its approval
overdue, and a withdrawal. The approval resolves `expired` and its resolution is published as usual; the call
never runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    expired_result,
)
from agentbus.tool_executor.ports import Ledger, OutgoingMessage, Resolution
from agentbus.tool_executor.service.context import Executor
from agentbus.tool_executor.service.messages import ApprovalOutcome, resolved_messages, result_message

OVERDUE_REASON = "no decision before the approval expired"


@dataclass(frozen=True)
class Expired:
    """A committed expiry, and what to publish about it."""

    call: CallRecord
    approval: ApprovalRecord
    call_status: CallStatus
    at: datetime
    outbox: list[OutgoingMessage]


def expire_in(
    ledger: Ledger,
    approval: ApprovalRecord,
    now: datetime,
    *,
    reason: str = OVERDUE_REASON,
    result: ToolResult | None = None,
    call_status: CallStatus = CallStatus.EXPIRED,
) -> Expired | None:
    """Inside a unit of work: resolve a pending approval `expired`, with its call's result. None when it was no
    longer pending (or its call is unknown)."""
    call = ledger.call(approval.call_id)
    if call is None:
        return None
    ended = result if result is not None else expired_result(approval.tool, approval.expires_at)
    expired = ApprovalOutcome(approval.approval_id, ApprovalStatus.EXPIRED.value, None)
    outbox = [
        *resolved_messages(call, approval, ApprovalStatus.EXPIRED, None, now),
        result_message(call, ended, approval=expired),
    ]
    resolution = Resolution(
        approval_id=approval.approval_id,
        status=ApprovalStatus.EXPIRED,
        by=None,
        at=now,
        reason=reason,
        decision_seq=None,
        call_status=call_status,
        call_result=ended,
        outbox=outbox,
    )
    if not ledger.resolve_approval(resolution):
        return None
    return Expired(call, approval, call_status, now, outbox)


async def announce(executor: Executor, expired: Expired) -> None:
    """After the commit: count it, record the wait's span, publish the resolution and the result."""
    executor.resolved(expired.call, expired.approval, ApprovalStatus.EXPIRED, None, expired.at)
    executor.metrics.calls.labels(expired.approval.tool, expired.call_status.value).inc()
    await executor.publish(expired.outbox)


async def expire_overdue(executor: Executor, approval: ApprovalRecord) -> None:
    """Expire one approval found overdue (by a call or a decision that arrived after its expiry)."""
    now = executor.clock()
    expired = await executor.store.transact(lambda ledger: _expire_if_pending(ledger, approval.approval_id, now))
    if expired is not None:
        await announce(executor, expired)


def _expire_if_pending(ledger: Ledger, approval_id: str, now: datetime) -> Expired | None:
    approval = ledger.approval(approval_id)
    if approval is None or approval.status is not ApprovalStatus.PENDING or now < approval.expires_at:
        return None
    return expire_in(ledger, approval, now)
