"""Accept a tool call: register it once, ask for approval or run it, and publish what follows.

A call is registered under its id in one unit of work: a redelivered call finds its row and only re-publishes
what is not published yet (and finishes what is ready); a call whose withdrawal arrived first is registered as
withdrawn and runs nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from agentbus.contracts.approvals import arguments_sha256
from agentbus.contracts.tools import GUARDRAIL_REVIEW_TOOL, ToolCallRequested
from agentbus.runtime.tracing import TraceContext
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    approval_id_for,
    argument_errors,
    guardrail_blocked_result,
    invalid_arguments_result,
    unknown_tool_result,
    withdrawn_result,
)
from agentbus.tool_executor.policy import ApprovalNeed, approval_need
from agentbus.tool_executor.ports import Ledger, OutgoingMessage
from agentbus.tool_executor.service.context import Executor
from agentbus.tool_executor.service.execute import ExecuteCall
from agentbus.tool_executor.service.expiry import expire_overdue
from agentbus.tool_executor.service.messages import pending_messages, result_message

UNKNOWN_TOOL_LABEL = "(unknown)"


class _Registration(enum.Enum):
    NEW = "new"
    WITHDRAWN_FIRST = "withdrawn_first"
    EXISTING = "existing"


@dataclass(frozen=True)
class _Plan:
    """A new call as it will be stored: its row, its approval if it needs one, its first messages."""

    record: CallRecord
    approval: ApprovalRecord | None
    outbox: list[OutgoingMessage]
    result: ToolResult | None


@dataclass(frozen=True)
class _Registered:
    kind: _Registration
    record: CallRecord
    outbox: list[OutgoingMessage]
    approval: ApprovalRecord | None = None


class AcceptCall:
    def __init__(self, executor: Executor, execute: ExecuteCall) -> None:
        self._x = executor
        self._execute = execute

    async def __call__(self, call: ToolCallRequested, trace: TraceContext | None) -> None:
        x = self._x
        plan = self._plan(call, trace, x.clock())
        registered = await x.store.transact(lambda ledger: _register(ledger, plan))
        record = registered.record
        tool_label = call.tool if call.tool in x.tools else UNKNOWN_TOOL_LABEL
        if registered.kind is _Registration.EXISTING:
            await x.flush(call.call_id)
        else:
            if registered.kind is _Registration.WITHDRAWN_FIRST:
                x.metrics.calls.labels(tool_label, CallStatus.WITHDRAWN.value).inc()
                await x.publish(registered.outbox)
            elif plan.result is not None:
                x.metrics.calls.labels(tool_label, plan.result.error_code or "failed").inc()
                await x.publish(registered.outbox)
            elif plan.approval is not None:
                x.metrics.approvals_requested.labels(call.tool).inc()
                # The request to approvers and the update to the runner: on two streams, in no particular order.
                await x.publish_together(registered.outbox)
            else:
                await x.publish(registered.outbox)
        await x.faults.reach("call_published")
        approval = registered.approval
        if record.status is CallStatus.AWAITING_APPROVAL and approval is not None:
            if approval.status is ApprovalStatus.PENDING and x.clock() >= approval.expires_at:
                await expire_overdue(x, approval)
        elif record.status in (CallStatus.READY, CallStatus.RUNNING):
            await self._execute.drive(call.call_id, tool=call.tool)
        await x.faults.reach("call_before_ack")

    def _plan(self, call: ToolCallRequested, trace: TraceContext | None, now: datetime) -> _Plan:
        record = CallRecord(
            call_id=call.call_id,
            tool_call_id=call.tool_call_id,
            tenant=call.tenant,
            task_id=call.task_id,
            agent=call.agent,
            tool=call.tool,
            step=call.step,
            arguments=dict(call.arguments),
            submitted_by=call.submitted_by,
            status=CallStatus.READY,
            approval_id=None,
            traceparent=trace.traceparent if trace else None,
            created_at=now,
        )
        tool = self._x.tools.get(call.tool)
        result: ToolResult | None = None
        if call.guardrail is not None and call.guardrail.action == "block":
            result = guardrail_blocked_result(call.tool, call.guardrail.reason)
        elif tool is None:
            result = unknown_tool_result(call.tool, list(self._x.tools))
        elif errors := argument_errors(tool.arguments, call.arguments):
            result = invalid_arguments_result(call.tool, errors)
        if result is not None:
            record = replace(record, status=CallStatus.FAILED, result=result)
            return _Plan(record, None, [result_message(record, result)], result)
        assert tool is not None
        need = approval_need(tool.policy, tool.definition.risk, call.arguments)
        if call.guardrail is not None and call.guardrail.action == "require_approval":
            # Held by the agent's guardrails, whatever the tool's own policy says; its own reason, if any, too.
            own = [need.reason] if need is not None and call.tool != GUARDRAIL_REVIEW_TOOL else []
            reasons = [call.guardrail.reason, *own]
            need = ApprovalNeed(need.risk if need is not None else tool.definition.risk, "; ".join(reasons))
        if need is None:
            return _Plan(record, None, [], None)
        approval = ApprovalRecord(
            approval_id=approval_id_for(call.call_id),
            call_id=call.call_id,
            tenant=call.tenant,
            task_id=call.task_id,
            agent=call.agent,
            tool=call.tool,
            arguments=dict(call.arguments),
            arguments_sha256=arguments_sha256(call.arguments),
            risk=need.risk,
            reason=need.reason,
            requested_by=call.submitted_by,
            requested_at=now,
            expires_at=now + timedelta(seconds=tool.definition.approval.expires_after_seconds),
        )
        record = replace(record, status=CallStatus.AWAITING_APPROVAL, approval_id=approval.approval_id)
        return _Plan(record, approval, pending_messages(record, approval), None)


def _register(ledger: Ledger, plan: _Plan) -> _Registered:
    """The unit of work: store a new call, or find it (or its withdrawal) stored already."""
    if ledger.insert_call(plan.record, plan.approval, plan.outbox):
        return _Registered(_Registration.NEW, plan.record, plan.outbox, plan.approval)
    call_id = plan.record.call_id
    existing = ledger.call(call_id)
    if existing is not None:
        approval = ledger.approval(existing.approval_id) if existing.approval_id is not None else None
        return _Registered(_Registration.EXISTING, existing, [], approval)
    withdrawal = ledger.withdrawal(call_id)
    if withdrawal is None:
        raise RuntimeError(f"call {call_id!r} is neither new, stored nor withdrawn")
    result = withdrawn_result(plan.record.tool, withdrawal)
    record = replace(plan.record, status=CallStatus.WITHDRAWN, approval_id=None, result=result, withdrawn=withdrawal)
    outbox = [result_message(record, result)]
    if not ledger.register_withdrawn(record, outbox):
        raise RuntimeError(f"call {call_id!r} changed while it was registered as withdrawn")
    return _Registered(_Registration.WITHDRAWN_FIRST, record, outbox)
