"""Decode tool calls, withdrawals, approval decisions and approvals-list requests, and hand each to one use case."""

from __future__ import annotations

from agentbus.contracts.approvals import ApprovalsListReply, ApprovalsListRequest
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import APPROVAL_DECISION, APPROVALS_LIST, TOOL_CALL, TOOL_WITHDRAW, SubjectSpec
from agentbus.contracts.tools import ToolCallRequested, ToolCallWithdrawn
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.replies import Request
from agentbus.tool_executor.ports import StoreUnavailableError
from agentbus.tool_executor.service import AcceptCall, Decide, DecisionOutcome, ListApprovals, WithdrawCall
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
TENANT_MISMATCH = "tenant_mismatch"
MALFORMED_DECISION = "malformed_decision"
BAD_SUBJECT = "bad_subject"
STORE_UNAVAILABLE = "store_unavailable"


class ExecutorHandlers:
    def __init__(
        self, accept: AcceptCall, decide: Decide, withdraw: WithdrawCall, list_approvals: ListApprovals
    ) -> None:
        self._accept = accept
        self._decide = decide
        self._withdraw = withdraw
        self._list_approvals = list_approvals

    async def on_tool_call(self, delivery: Delivery) -> None:
        try:
            call = ToolCallRequested.model_validate_json(delivery.data)
        except ValidationError as exc:
            # Without a valid call id and tenant there is no one to answer: keep it as a dead letter.
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        _same_tenant(call.tenant, TOOL_CALL, delivery.subject)
        await self._accept(call, delivery.trace)

    async def on_tool_call_withdrawn(self, delivery: Delivery) -> None:
        try:
            withdrawal = ToolCallWithdrawn.model_validate_json(delivery.data)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        _same_tenant(withdrawal.tenant, TOOL_WITHDRAW, delivery.subject)
        await self._withdraw(withdrawal)

    async def on_approval_decision(self, delivery: Delivery) -> None:
        tokens = _tokens(APPROVAL_DECISION, delivery.subject)
        report = await self._decide(tokens["tenant"], tokens["approver"], delivery.data, delivery.stream_seq)
        if report.outcome is DecisionOutcome.MALFORMED:
            # Audited and answered already; the dead letter keeps the exact bytes for whoever sent them.
            raise TerminalError(MALFORMED_DECISION, report.detail)

    async def on_approvals_list(self, request: Request) -> ApprovalsListReply:
        try:
            tenant = APPROVALS_LIST.parse(request.subject)["tenant"]
            query = ApprovalsListRequest.model_validate_json(request.data)
        except (ValueError, ValidationError) as exc:
            return ApprovalsListReply(error=ErrorInfo(code=SCHEMA_VIOLATION, message=str(exc)))
        try:
            return await self._list_approvals(tenant, query)
        except StoreUnavailableError as exc:
            return ApprovalsListReply(error=ErrorInfo(code=STORE_UNAVAILABLE, message=str(exc)))


def _same_tenant(tenant: str, spec: SubjectSpec, subject: str) -> None:
    if tenant != _tokens(spec, subject)["tenant"]:
        raise TerminalError(TENANT_MISMATCH, f"message for tenant {tenant!r} sent on {subject!r}")


def _tokens(spec: SubjectSpec, subject: str) -> dict[str, str]:
    try:
        return spec.parse(subject)
    except ValueError as exc:
        raise TerminalError(BAD_SUBJECT, str(exc)) from exc
