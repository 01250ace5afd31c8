"""Pure rules of the tool-executor: the records the ledger keeps, argument validation, and the texts the
model reads back. No I/O here. Approval policies and decision checks are in `policy/`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import jsonschema
from agentbus.runtime.tool_registry import Risk

MAX_SCHEMA_ERRORS = 10


def approval_id_for(call_id: str) -> str:
    """The approval of a call, derived from its id, so a redelivered call never creates a second approval."""
    return "apr_" + hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:40]


# --- ledger records --------------------------------------------------------------------------------


class CallStatus(StrEnum):
    """Where a tool call stands in the execution ledger."""

    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"
    """May run: approved, or needing no approval."""
    RUNNING = "running"
    """Claimed by an executor under a lease; its outcome is not recorded yet."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DENIED = "denied"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    """Started, not recorded as finished, and not safe to run again: the outcome is unknown."""
    WITHDRAWN = "withdrawn"
    """Its task ended before it ran: it never runs."""


TERMINAL_STATUSES = frozenset(
    {
        CallStatus.SUCCEEDED,
        CallStatus.FAILED,
        CallStatus.DENIED,
        CallStatus.EXPIRED,
        CallStatus.INTERRUPTED,
        CallStatus.WITHDRAWN,
    }
)


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


@dataclass(frozen=True)
class ApprovalRecord:
    """A stored approval: what waits (or waited) for a human, and how it ended."""

    approval_id: str
    call_id: str
    tenant: str
    task_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    arguments_sha256: str
    risk: Risk
    reason: str
    requested_by: str | None
    requested_at: datetime
    expires_at: datetime
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_by: str | None = None
    decided_at: datetime | None = None
    decision_reason: str | None = None
    decision_seq: int | None = None


@dataclass(frozen=True)
class ToolResult:
    """What the model reads back: success, text, an error and citations (as JSON-ready dicts)."""

    ok: bool
    content: str
    error_code: str | None = None
    error_message: str | None = None
    citations: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class CallRecord:
    """A tool call in the execution ledger, keyed by call_id."""

    call_id: str
    tool_call_id: str
    tenant: str
    task_id: str
    agent: str
    tool: str
    step: int
    arguments: dict[str, Any]
    submitted_by: str | None
    status: CallStatus
    approval_id: str | None
    traceparent: str | None
    created_at: datetime
    lease_owner: str | None = None
    lease_until: datetime | None = None
    attempts: int = 0
    result: ToolResult | None = None
    withdrawn: Withdrawal | None = None
    approved_by: str | None = None
    """Who approved it, when it waited for approval (read with a claim: its result names the approval)."""


@dataclass(frozen=True)
class Withdrawal:
    """The task of a call ended: the call must not start, and a pending approval expires."""

    call_id: str
    tenant: str
    task_id: str
    reason: str
    at: datetime

    @property
    def resolution_reason(self) -> str:
        """What the approval's record says when the withdrawal expired it."""
        return f"task ended: {self.reason}"


# --- validation and the texts the model reads ------------------------------------------------------


def argument_validator(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    """A tool's parameters schema, ready to check arguments (built once per tool: building it is the costly part)."""
    return jsonschema.Draft202012Validator(schema)


def argument_errors(validator: jsonschema.Draft202012Validator, arguments: Mapping[str, Any]) -> list[str]:
    """Schema violations of the arguments, readable by the model, at most MAX_SCHEMA_ERRORS."""
    errors = sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
    lines = []
    for error in errors[:MAX_SCHEMA_ERRORS]:
        where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
        lines.append(f"{where}: {error.message}")
    if len(errors) > MAX_SCHEMA_ERRORS:
        lines.append(f"... and {len(errors) - MAX_SCHEMA_ERRORS} more")
    return lines


def invalid_arguments_result(tool: str, errors: list[str]) -> ToolResult:
    content = (
        f"The call to {tool!r} was not run: its arguments do not match the tool's schema.\n"
        + "\n".join(f"- {line}" for line in errors)
        + "\nCorrect the arguments and call the tool again."
    )
    return ToolResult(False, content, "invalid_arguments", "; ".join(errors))


def unknown_tool_result(tool: str, known: list[str]) -> ToolResult:
    message = f"unknown tool {tool!r}; tools this executor runs: {sorted(known)}"
    return ToolResult(False, f"The call was not run: {message}.", "unknown_tool", message)


GUARDRAIL_BLOCKED = "guardrail_blocked"


def guardrail_blocked_result(tool: str, reason: str) -> ToolResult:
    content = (
        f"The call to {tool!r} was not run: the agent's guardrails block its arguments ({reason}). "
        "Do not send the same arguments again; leave out what the guardrail names, or ask the user."
    )
    return ToolResult(False, content, GUARDRAIL_BLOCKED, reason)


def denied_result(tool: str, by: str | None, reason: str | None) -> ToolResult:
    why = f" Reason: {reason}" if reason else " No reason was given."
    content = (
        f"The call to {tool!r} was denied by approver {by or 'unknown'} and did not run.{why} "
        "Do not repeat the same call; change the approach or ask the user."
    )
    return ToolResult(False, content, "approval_denied", f"denied by {by}: {reason or 'no reason given'}")


def expired_result(tool: str, expires_at: datetime) -> ToolResult:
    content = (
        f"The call to {tool!r} needed approval, but no approver decided before it expired at "
        f"{expires_at.isoformat()}. It did not run."
    )
    return ToolResult(False, content, "approval_expired", f"approval expired at {expires_at.isoformat()}")


EXECUTION_INTERRUPTED = "execution_interrupted"


def interrupted_result(tool: str, lost: str | None = None) -> ToolResult:
    """The call started and its outcome is unknown: the executor stopped while it ran, or (`lost`) what the
    tool ran on went away. The tool is not safe to run twice, so it was not run again."""
    what = (
        f"{tool!r} lost its connection while it ran ({lost})"
        if lost
        else (f"The executor stopped while {tool!r} was running, before its outcome was recorded")
    )
    content = (
        f"execution_interrupted: outcome unknown. {what}, and this tool is not safe to run twice, so it was not "
        "run again. Check whether its effect happened before calling it again."
    )
    detail = f"outcome unknown: {lost}" if lost else "outcome unknown: stopped during execution"
    return ToolResult(False, content, EXECUTION_INTERRUPTED, detail)


def withdrawn_result(tool: str, withdrawal: Withdrawal) -> ToolResult:
    content = f"The call to {tool!r} was not run: {withdrawal.resolution_reason}."
    return ToolResult(False, content, "call_withdrawn", withdrawal.resolution_reason)


def abandoned_wait_result(tool: str, withdrawal: Withdrawal, waited_for: str) -> ToolResult:
    content = (
        f"The call to {tool!r} did not complete: it was waiting for {waited_for}, which did not answer, when "
        f"its task ended ({withdrawal.reason})."
    )
    return ToolResult(False, content, "call_withdrawn", f"{waited_for} unavailable; {withdrawal.resolution_reason}")
