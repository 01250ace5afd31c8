"""Withdraw a call whose task ended (cancelled, past its deadline, failed, over budget): nothing is given up
silently, and nothing starts for a task that is over.

- awaiting approval: the approval resolves `expired` ("task ended: ..."), published as usual; the call never runs;
- not seen yet: the withdrawal is recorded under the call's id, so the call message, arriving later, runs nothing;
- ready: it never starts;
- running: it cannot be stopped; it finishes and its result is published as usual;
- finished: nothing changes.

Withdrawn calls that did not run get a `call_withdrawn` result, like any other call that ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agentbus.contracts.tools import ToolCallWithdrawn
from agentbus.runtime.logging import get_logger
from agentbus.tool_executor.domain import (
    ApprovalStatus,
    CallRecord,
    CallStatus,
    Withdrawal,
    withdrawn_result,
)
from agentbus.tool_executor.ports import Ledger, OutgoingMessage
from agentbus.tool_executor.service.context import Executor
from agentbus.tool_executor.service.expiry import Expired, announce, expire_in
from agentbus.tool_executor.service.messages import ApprovalOutcome, result_message

_log = get_logger(__name__)


class Found(enum.StrEnum):
    """What a withdrawal found of its call."""

    UNSEEN = "unseen"
    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"
    RUNNING = "running"
    FINISHED = "finished"
    ALREADY_WITHDRAWN = "already_withdrawn"
    OTHER_TENANT = "other_tenant"


@dataclass(frozen=True)
class _Withdrawn:
    found: Found
    call: CallRecord | None = None
    expired: Expired | None = None
    outbox: tuple[OutgoingMessage, ...] = ()


class WithdrawCall:
    def __init__(self, executor: Executor) -> None:
        self._x = executor

    async def __call__(self, message: ToolCallWithdrawn) -> Found:
        x = self._x
        withdrawal = Withdrawal(message.call_id, message.tenant, message.task_id, message.reason, x.clock())
        done = await x.store.transact(lambda ledger: _withdraw(ledger, withdrawal))
        if done.found is Found.OTHER_TENANT:
            _log.warning("withdrawal_for_another_tenant", call_id=message.call_id, tenant=message.tenant)
            return done.found
        if done.found is not Found.ALREADY_WITHDRAWN:
            x.metrics.withdrawals.labels(done.found.value).inc()
        if done.expired is not None:
            await announce(x, done.expired)
        elif done.outbox:
            assert done.call is not None
            x.metrics.calls.labels(done.call.tool, CallStatus.WITHDRAWN.value).inc()
            await x.publish(list(done.outbox))
        if done.found is Found.RUNNING:
            _log.info("withdrawn_call_still_running", call_id=message.call_id, reason=message.reason)
        return done.found


def _withdraw(ledger: Ledger, withdrawal: Withdrawal) -> _Withdrawn:
    if ledger.insert_withdrawal(withdrawal):
        return _Withdrawn(Found.UNSEEN)
    call = ledger.call(withdrawal.call_id)
    if call is None:
        return _Withdrawn(Found.ALREADY_WITHDRAWN)
    if call.tenant != withdrawal.tenant:
        return _Withdrawn(Found.OTHER_TENANT)
    if call.withdrawn is not None:
        return _Withdrawn(Found.ALREADY_WITHDRAWN, call)
    ledger.mark_withdrawn(withdrawal)
    result = withdrawn_result(call.tool, withdrawal)
    if call.status is CallStatus.AWAITING_APPROVAL and call.approval_id is not None:
        approval = ledger.approval(call.approval_id)
        if approval is not None and approval.status is ApprovalStatus.PENDING:
            expired = expire_in(
                ledger,
                approval,
                withdrawal.at,
                reason=withdrawal.resolution_reason,
                result=result,
                call_status=CallStatus.WITHDRAWN,
            )
            if expired is not None:
                return _Withdrawn(Found.AWAITING_APPROVAL, call, expired)
    if call.status is CallStatus.READY:
        approved = ledger.approval(call.approval_id) if call.approval_id is not None else None
        decided = (
            ApprovalOutcome(approved.approval_id, approved.status.value, approved.decided_by) if approved else None
        )
        outbox = [result_message(call, result, approval=decided)]
        if ledger.withdraw_call(call.call_id, CallStatus.READY, result, outbox):
            return _Withdrawn(Found.READY, call, outbox=tuple(outbox))
        # Claimed meanwhile (by another executor): it runs.
        return _Withdrawn(Found.RUNNING, call)
    if call.status is CallStatus.RUNNING:
        return _Withdrawn(Found.RUNNING, call)
    return _Withdrawn(Found.FINISHED, call)
