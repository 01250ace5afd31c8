"""Decode tool calls and approval decisions, and hand each to one use case."""

from __future__ import annotations

from agentbus.contracts.registry import APPROVAL_DECISION, TOOL_CALL, SubjectSpec
from agentbus.contracts.tools import ToolCallRequested
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.tool_executor.service import DecisionOutcome, ToolExecutorService
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
TENANT_MISMATCH = "tenant_mismatch"
MALFORMED_DECISION = "malformed_decision"
BAD_SUBJECT = "bad_subject"


class ExecutorHandlers:
    def __init__(self, service: ToolExecutorService) -> None:
        self._service = service

    async def on_tool_call(self, delivery: Delivery) -> None:
        try:
            call = ToolCallRequested.model_validate_json(delivery.data)
        except ValidationError as exc:
            # Without a valid call id and tenant there is no one to answer: keep it as a dead letter.
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        tenant = _tokens(TOOL_CALL, delivery.subject)["tenant"]
        if call.tenant != tenant:
            raise TerminalError(TENANT_MISMATCH, f"call for tenant {call.tenant!r} sent on {delivery.subject!r}")
        await self._service.handle_call(call, delivery.trace)

    async def on_approval_decision(self, delivery: Delivery) -> None:
        tokens = _tokens(APPROVAL_DECISION, delivery.subject)
        report = await self._service.handle_decision(
            tokens["tenant"], tokens["approver"], delivery.data, delivery.stream_seq
        )
        if report.outcome is DecisionOutcome.MALFORMED:
            # Audited already; the dead letter keeps the exact bytes for whoever sent them.
            raise TerminalError(MALFORMED_DECISION, report.detail)


def _tokens(spec: SubjectSpec, subject: str) -> dict[str, str]:
    try:
        return spec.parse(subject)
    except ValueError as exc:
        raise TerminalError(BAD_SUBJECT, str(exc)) from exc
