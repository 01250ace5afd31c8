"""Whether an approver's decision may be applied, or why it is refused.

Identities are the ones nats-server enforces, never what a body says: the approver is the token of the
subject the decision arrived on (bound to the approver's user by permissions), and the submitter is the
call's `submitted_by`, which the runner took from the submit subject. A submitter the executor does not
know never counts as "someone else": where a policy forbids self-approval, an unknown submitter is a
reason to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from agentbus.tool_executor.domain import ApprovalRecord, ApprovalStatus


class Refusal(StrEnum):
    """Why a decision was refused. The approval stays as it was (except a late one, which expires it)."""

    MALFORMED = "malformed"
    APPROVER_MISMATCH = "approver_mismatch"
    UNKNOWN_APPROVAL = "unknown_approval"
    ALREADY_RESOLVED = "already_resolved"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    SELF_APPROVAL = "self_approval"
    SUBMITTER_UNKNOWN = "submitter_unknown"
    ARGUMENTS_MISMATCH = "arguments_mismatch"


@dataclass(frozen=True)
class DecisionFacts:
    """Everything a decision is checked against."""

    subject_tenant: str
    subject_approver: str
    """The approver token of the subject: the identity nats-server let publish there."""
    approver: str
    """The approver the body names; it must be the subject's."""
    decision: str
    arguments_sha256: str
    approval: ApprovalRecord | None
    approver_allowed: bool
    allow_self_approval: bool
    submitted_by: str | None
    now: datetime


def check_decision(facts: DecisionFacts) -> tuple[Refusal, str] | None:
    """The first reason to refuse this decision, with a message, or None when it may be applied."""
    approver = facts.subject_approver
    if facts.approver != approver:
        return Refusal.APPROVER_MISMATCH, (
            f"the decision names approver {facts.approver!r} but was sent on {approver!r}'s subject"
        )
    approval = facts.approval
    if approval is None or approval.tenant != facts.subject_tenant:
        return Refusal.UNKNOWN_APPROVAL, "no such approval for this tenant"
    if approval.status is not ApprovalStatus.PENDING:
        return Refusal.ALREADY_RESOLVED, f"the approval is already {approval.status.value}"
    if facts.now >= approval.expires_at:
        return Refusal.EXPIRED, f"the approval expired at {approval.expires_at.isoformat()}"
    if not facts.approver_allowed:
        return Refusal.NOT_ALLOWED, f"{approver!r} may not decide on {approval.tool!r} for {approval.tenant!r}"
    if facts.decision == "approve" and not facts.allow_self_approval:
        if facts.submitted_by is None:
            return Refusal.SUBMITTER_UNKNOWN, (
                f"{approval.tool!r} may not be approved by its own submitter, and this task's submitter is "
                "unknown, so no approver can be told apart from it"
            )
        if facts.submitted_by == approver:
            return Refusal.SELF_APPROVAL, f"{approver!r} submitted this task and may not approve its own calls"
    if facts.arguments_sha256 != approval.arguments_sha256:
        return Refusal.ARGUMENTS_MISMATCH, "the arguments hash differs from the pending call's arguments"
    return None
