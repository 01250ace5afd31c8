"""Decide on an approval: check an approver's decision, apply it (and run an approved call) or refuse it.

The whole check runs in one unit of work with the resolution it leads to: what the decision was checked
against is what it changes. Every decision is audited, under its message's stream sequence, and gets a
verdict on the approver's verdict subject (accepted, or refused with the audited reason). A redelivered
decision finds its audit entry: it gets the same verdict again and only finishes what its first delivery
started; it never decides twice.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from datetime import datetime

from agentbus.contracts.approvals import ApprovalDecision
from agentbus.contracts.tools import GUARDRAIL_REVIEW_TOOL
from agentbus.runtime.logging import get_logger
from agentbus.runtime.tool_registry import ApprovalPolicy
from agentbus.tool_executor.domain import ApprovalRecord, ApprovalStatus, CallRecord, CallStatus, denied_result
from agentbus.tool_executor.policy import DecisionFacts, Refusal, check_decision
from agentbus.tool_executor.ports import AuditEntry, DecisionAuditedError, Ledger, OutgoingMessage, Resolution
from agentbus.tool_executor.service.context import Executor
from agentbus.tool_executor.service.execute import ExecuteCall
from agentbus.tool_executor.service.expiry import Expired, announce, expire_in
from agentbus.tool_executor.service.messages import (
    ACCEPTED,
    REFUSED,
    ApprovalOutcome,
    resolved_messages,
    result_message,
)
from pydantic import ValidationError

_log = get_logger(__name__)


class DecisionOutcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    MALFORMED = "malformed"
    REPLAYED = "replayed"
    """Delivered again: its verdict is repeated and what it started is finished."""


@dataclass(frozen=True)
class DecisionReport:
    outcome: DecisionOutcome
    entry: AuditEntry
    """The audit entry the verdict was made from."""

    @property
    def detail(self) -> str:
        return self.entry.detail or ""

    @property
    def refusal(self) -> Refusal | None:
        return Refusal(self.entry.reason_code) if self.entry.reason_code else None


@dataclass(frozen=True)
class _Decided:
    outcome: DecisionOutcome
    entry: AuditEntry
    approval: ApprovalRecord | None = None
    call: CallRecord | None = None
    status: ApprovalStatus | None = None
    outbox: tuple[OutgoingMessage, ...] = ()
    expired: Expired | None = None
    replayed: bool = False


class Decide:
    def __init__(self, executor: Executor, execute: ExecuteCall) -> None:
        self._x = executor
        self._execute = execute

    async def __call__(self, tenant: str, subject_approver: str, payload: bytes, message_seq: int) -> DecisionReport:
        x = self._x
        now = x.clock()
        received = AuditEntry(
            message_seq=message_seq,
            tenant=tenant,
            subject_approver=subject_approver,
            outcome=REFUSED,
            received_at=now,
            payload=payload.decode("utf-8", errors="replace"),
        )
        try:
            decision = ApprovalDecision.model_validate_json(payload)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
            malformed = replace(
                received,
                approval_id=_approval_id_in(payload),
                reason_code=Refusal.MALFORMED.value,
                detail=detail,
            )
            decided = await x.store.transact(lambda ledger: _audit_malformed(ledger, malformed))
        else:
            decided = await x.store.transact(
                lambda ledger: self._decide(ledger, decision, received, now),
                decision=(message_seq, decision.approval_id),
            )
        return await self._after(decided)

    def _deciders(self, policy: ApprovalPolicy) -> ApprovalPolicy:
        """Whose decision counts: the tool's approvers; for a tool that names none (whose calls wait only when an
        agent's guardrail holds them), the approvers of the `guardrail_review` tool."""
        review = self._x.tools.get(GUARDRAIL_REVIEW_TOOL)
        if not any(policy.approvers.values()) and review is not None:
            return review.definition.approval
        return policy

    def _decide(self, ledger: Ledger, decision: ApprovalDecision, received: AuditEntry, now: datetime) -> _Decided:
        """The unit of work: check the decision against the approval as it is now, and resolve it or refuse."""
        audited, approval, call = ledger.decision_context(received.message_seq, decision.approval_id)
        if audited is not None:
            return _replayed(ledger, audited)
        tenant, approver = received.tenant, received.subject_approver
        if approval is not None and approval.tenant != tenant:
            approval, call = None, None
        tool = self._x.tools.get(approval.tool) if approval is not None else None
        policy = self._deciders(tool.definition.approval) if tool is not None else None
        entry = replace(
            received,
            approver=decision.approver,
            approval_id=decision.approval_id,
            decision=decision.decision,
        )
        refusal = check_decision(
            DecisionFacts(
                subject_tenant=tenant,
                subject_approver=approver,
                approver=decision.approver,
                decision=decision.decision,
                arguments_sha256=decision.arguments_sha256,
                approval=approval,
                # The identity checked is the subject's (enforced by nats-server), never the body's.
                approver_allowed=policy is not None and self._x.approvers.may_approve(policy, tenant, approver),
                allow_self_approval=policy is not None and policy.allow_self_approval,
                submitted_by=call.submitted_by if call is not None else None,
                now=now,
            )
        )
        if refusal is not None:
            reason, detail = refusal
            expired = None
            if reason is Refusal.EXPIRED and approval is not None:
                expired = expire_in(ledger, approval, now)
            return _refused(ledger, replace(entry, reason_code=reason.value, detail=detail), approval, expired)
        assert approval is not None
        assert call is not None
        approved = decision.decision == "approve"
        status = ApprovalStatus.APPROVED if approved else ApprovalStatus.DENIED
        outbox = resolved_messages(call, approval, status, approver, now)
        result = None
        if not approved:
            result = denied_result(approval.tool, approver, decision.reason)
            denied = ApprovalOutcome(approval.approval_id, status.value, approver)
            outbox.append(result_message(call, result, approval=denied))
        resolution = Resolution(
            approval_id=approval.approval_id,
            status=status,
            by=approver,
            at=now,
            reason=decision.reason,
            decision_seq=received.message_seq,
            call_status=CallStatus.READY if approved else CallStatus.DENIED,
            call_result=result,
            outbox=outbox,
        )
        accepted = replace(entry, outcome=ACCEPTED, detail=f"the approval is {status.value}")
        if not ledger.resolve_with_audit(resolution, accepted):
            lost = replace(
                entry,
                reason_code=Refusal.ALREADY_RESOLVED.value,
                detail="another decision resolved this approval first",
            )
            return _refused(ledger, lost, approval, None)
        return _Decided(DecisionOutcome.ACCEPTED, accepted, approval, call, status, tuple(outbox))

    async def _after(self, decided: _Decided) -> DecisionReport:
        """What follows the commit: count, publish the resolution and the verdict, run an approved call."""
        x = self._x
        entry = decided.entry
        report = DecisionReport(decided.outcome, entry)
        if decided.replayed:
            await x.publish_verdict(entry)
            if decided.approval is not None:
                await x.flush(decided.approval.call_id)
                if decided.approval.status is ApprovalStatus.APPROVED:
                    await self._execute.drive(decided.approval.call_id, tool=decided.approval.tool)
            return report
        if decided.outcome is not DecisionOutcome.ACCEPTED:
            x.metrics.decisions_refused.labels(entry.reason_code or "unknown").inc()
            _log.warning(
                "approval_decision_refused",
                reason=entry.reason_code,
                detail=entry.detail,
                approval_id=entry.approval_id,
                approver=entry.subject_approver,
                tenant=entry.tenant,
            )
            if decided.expired is not None:
                await announce(x, decided.expired)
            await x.publish_verdict(entry)
            return report
        approval, call, status = decided.approval, decided.call, decided.status
        assert approval is not None
        assert call is not None
        assert status is not None
        x.resolved(call, approval, status, entry.subject_approver, entry.received_at)
        if status is ApprovalStatus.DENIED:
            x.metrics.calls.labels(approval.tool, "denied").inc()
        await x.faults.reach("decision_committed")
        if status is ApprovalStatus.APPROVED:
            # The resolution for approvers and the update for the runner: on two streams, in no particular order.
            await x.publish_together(list(decided.outbox))
        else:
            # Denied: the result follows the resolution on the runner's stream.
            await x.publish(list(decided.outbox))
        await x.publish_verdict(entry)
        if status is ApprovalStatus.APPROVED:
            await self._execute.drive(approval.call_id, tool=approval.tool)
        await x.faults.reach("decision_before_ack")
        return report


def _audit_malformed(ledger: Ledger, entry: AuditEntry) -> _Decided:
    if (audited := ledger.audit_entry(entry.message_seq)) is not None:
        return _Decided(DecisionOutcome.MALFORMED, audited, replayed=True)
    if not ledger.add_audit(entry):
        raise DecisionAuditedError(f"decision {entry.message_seq} was audited by another delivery")
    return _Decided(DecisionOutcome.MALFORMED, entry)


def _replayed(ledger: Ledger, audited: AuditEntry) -> _Decided:
    approval = ledger.approval(audited.approval_id) if audited.approval_id else None
    if approval is not None and approval.tenant != audited.tenant:
        approval = None
    return _Decided(DecisionOutcome.REPLAYED, audited, approval, replayed=True)


def _refused(ledger: Ledger, entry: AuditEntry, approval: ApprovalRecord | None, expired: Expired | None) -> _Decided:
    if not ledger.add_audit(entry):
        raise DecisionAuditedError(f"decision {entry.message_seq} was audited by another delivery")
    return _Decided(DecisionOutcome.REFUSED, entry, approval, expired=expired)


def _approval_id_in(payload: bytes) -> str | None:
    """The approval a malformed decision names, if it names one readably: its verdict says which it was about."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    approval_id = body.get("approval_id") if isinstance(body, dict) else None
    return approval_id[:64] if isinstance(approval_id, str) else None
