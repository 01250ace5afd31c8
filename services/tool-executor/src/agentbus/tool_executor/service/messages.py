"""The messages the executor publishes, built from its records: tool updates for the runner, approval requests
and resolutions for approvers, usage for the accountant, verdicts for the approver who decided."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentbus.contracts.approvals import (
    ApprovalDecisionVerdict,
    ApprovalEntry,
    ApprovalRequested,
    ApprovalResolved,
)
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.registry import (
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    TOOL_UPDATE,
    USAGE_RECORDED,
    budget_subject,
)
from agentbus.contracts.tools import ToolCallUpdate
from agentbus.contracts.usage import UsageRecorded
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.runtime.tracing import TraceContext
from agentbus.tool_executor.domain import (
    EXECUTION_INTERRUPTED,
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
)
from agentbus.tool_executor.ports import AuditEntry, Completion, OutgoingMessage, ToolOutput

ACCEPTED = "accepted"
REFUSED = "refused"


def trace_of(record: CallRecord) -> tuple[TraceContext, str | None]:
    """A new span of the call's trace, and its parent: the runner's span that asked for the call."""
    incoming = TraceContext.parse(record.traceparent)
    if incoming is None:
        return TraceContext.new(), None
    return incoming.child(), incoming.span_id


def update_message(record: CallRecord, kind: str, **fields: Any) -> OutgoingMessage:
    update = ToolCallUpdate(
        kind=kind,  # type: ignore[arg-type]
        call_id=record.call_id,
        tool_call_id=record.tool_call_id,
        task_id=record.task_id,
        tenant=record.tenant,
        tool=record.tool,
        **fields,
    )
    trace, _ = trace_of(record)
    return OutgoingMessage(
        TOOL_UPDATE.format(tenant=record.tenant),
        f"tool:{record.call_id}:{kind}",
        update.model_dump_json(),
        trace.traceparent,
    )


@dataclass(frozen=True)
class ApprovalOutcome:
    """How the approval a call waited for ended, repeated on its result: updates of one call may reach the
    runner out of order, and a result that arrives first still tells it the approval's outcome."""

    approval_id: str
    outcome: str
    by: str | None


def approval_of_executed(record: CallRecord) -> ApprovalOutcome | None:
    """A call that ran (or was claimed) after waiting for approval was approved."""
    if record.approval_id is None:
        return None
    return ApprovalOutcome(record.approval_id, ApprovalStatus.APPROVED.value, record.approved_by)


def result_message(
    record: CallRecord,
    result: ToolResult,
    usage_ids: list[str] | None = None,
    *,
    approval: ApprovalOutcome | None = None,
) -> OutgoingMessage:
    error = (
        ErrorInfo(code=result.error_code, message=result.error_message or result.error_code)
        if result.error_code
        else None
    )
    return update_message(
        record,
        "result",
        ok=result.ok,
        content=result.content,
        error=error,
        citations=[RetrievedChunk.model_validate(c) for c in result.citations],
        usage_ids=usage_ids or [],
        **(
            {"approval_id": approval.approval_id, "outcome": approval.outcome, "by": approval.by}
            if approval is not None
            else {}
        ),
    )


def approval_requested(approval: ApprovalRecord) -> ApprovalRequested:
    return ApprovalRequested(
        approval_id=approval.approval_id,
        task_id=approval.task_id,
        tenant=approval.tenant,
        agent=approval.agent,
        tool=approval.tool,
        arguments=approval.arguments,
        arguments_sha256=approval.arguments_sha256,
        risk=approval.risk,
        reason=approval.reason,
        requested_by=approval.requested_by,
        requested_at=approval.requested_at,
        expires_at=approval.expires_at,
    )


def approval_resolved(
    approval: ApprovalRecord, status: ApprovalStatus, by: str | None, at: datetime
) -> ApprovalResolved:
    return ApprovalResolved(
        approval_id=approval.approval_id,
        task_id=approval.task_id,
        tenant=approval.tenant,
        outcome=status.value,  # type: ignore[arg-type]
        by=by,
        at=at,
    )


def approval_entry(approval: ApprovalRecord) -> ApprovalEntry:
    """An approval as the approvals list shows it: the request, and how it ended if it did."""
    resolution = None
    if approval.status is not ApprovalStatus.PENDING:
        resolution = approval_resolved(
            approval, approval.status, approval.decided_by, approval.decided_at or approval.requested_at
        )
    return ApprovalEntry(request=approval_requested(approval), resolution=resolution)


def pending_messages(record: CallRecord, approval: ApprovalRecord) -> list[OutgoingMessage]:
    trace, _ = trace_of(record)
    return [
        OutgoingMessage(
            APPROVAL_PENDING.format(tenant=approval.tenant),
            f"approval:{approval.approval_id}:requested",
            approval_requested(approval).model_dump_json(),
            trace.traceparent,
        ),
        update_message(record, "approval_pending", approval_id=approval.approval_id, expires_at=approval.expires_at),
    ]


def resolved_messages(
    record: CallRecord, approval: ApprovalRecord, status: ApprovalStatus, by: str | None, at: datetime
) -> list[OutgoingMessage]:
    trace, _ = trace_of(record)
    return [
        OutgoingMessage(
            APPROVAL_RESOLVED.format(tenant=approval.tenant),
            f"approval:{approval.approval_id}:resolved",
            approval_resolved(approval, status, by, at).model_dump_json(),
            trace.traceparent,
        ),
        update_message(record, "approval_resolved", approval_id=approval.approval_id, outcome=status.value, by=by),
    ]


def completion_of(record: CallRecord, definition: ToolDefinition, output: ToolOutput) -> Completion:
    """How an execution ends: its usage record, then the result that names it (and any usage the tool caused)."""
    result = output.to_result()
    usage = UsageRecorded(
        usage_id=f"tool:{record.call_id}",
        kind="retrieval" if definition.kind == "retrieval" else "tool",
        tenant=record.tenant,
        task_id=record.task_id,
        agent=record.agent,
        tool=record.tool,
        reservation_id=f"tool:{record.call_id}",
    )
    trace, _ = trace_of(record)
    # The usage record goes first and the result names it: the task's cost waits for exactly those records.
    outbox = [
        OutgoingMessage(
            budget_subject(USAGE_RECORDED, record.tenant),
            usage.usage_id,
            usage.model_dump_json(),
            trace.traceparent,
        ),
        result_message(
            record, result, usage_ids=[usage.usage_id, *output.usage_ids], approval=approval_of_executed(record)
        ),
    ]
    if result.ok:
        status = CallStatus.SUCCEEDED
    else:
        status = CallStatus.INTERRUPTED if result.error_code == EXECUTION_INTERRUPTED else CallStatus.FAILED
    return Completion(status, result, outbox)


def failed_completion(record: CallRecord, status: CallStatus, result: ToolResult) -> Completion:
    """An execution that ends without the tool running (again): no usage."""
    return Completion(status, result, [result_message(record, result, approval=approval_of_executed(record))])


def verdict_of(entry: AuditEntry) -> tuple[str, str]:
    """The subject and payload of the verdict on one audited decision, for the approver who sent it. Built from
    the audit alone, so a redelivered decision gets exactly the same verdict."""
    verdict = ApprovalDecisionVerdict(
        approval_id=entry.approval_id or "",
        decision_seq=entry.message_seq,
        approver=entry.subject_approver,
        outcome="accepted" if entry.outcome == ACCEPTED else "refused",
        reason_code=entry.reason_code,
        detail=entry.detail,
        at=entry.received_at,
    )
    subject = APPROVAL_VERDICT.format(tenant=entry.tenant, approver=entry.subject_approver)
    return subject, verdict.model_dump_json()
