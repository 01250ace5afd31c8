"""Decode a message, call one use case, answer. No accounting rules here."""

from __future__ import annotations

import json

from agentbus.contracts.budget import (
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import BUDGET_RELEASE, BUDGET_RESERVE, TASK_COST, USAGE_RECORDED, SubjectSpec
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.adapters.nats_bus import Request
from agentbus.cost_accountant.service import AccountantService
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import RetryableError, TerminalError
from agentbus.runtime.logging import bind_message_context
from agentbus.runtime.spans import NullSpanEmitter, SpanEmitter
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
MISSING_TENANT = "missing_tenant"
NEGATIVE_QUANTITY = "negative_quantity"
TENANT_MISMATCH = "tenant_mismatch"
_QUANTITIES = frozenset({"prompt_tokens", "completion_tokens", "gpu_seconds"})
_STORE_RETRY_FIRST_SECONDS = 5.0
_STORE_RETRY_MAX_SECONDS = 300.0


def _usage_error(exc: ValidationError) -> TerminalError:
    """The most specific reason a usage record is invalid."""
    for error in exc.errors():
        field = error["loc"][0] if error["loc"] else None
        if field == "tenant" and error["type"] == "missing":
            return TerminalError(MISSING_TENANT, "usage record without a tenant cannot be charged to anyone")
        if field in _QUANTITIES and error["type"] in ("greater_than_equal", "greater_than"):
            return TerminalError(NEGATIVE_QUANTITY, f"{field} is negative: {error['input']!r}")
    return TerminalError(SCHEMA_VIOLATION, str(exc))


def _subject_tenant(spec: SubjectSpec, subject: str) -> str | None:
    try:
        return spec.parse(subject).get("tenant")
    except ValueError:
        return None


def _schema_error(exc: ValidationError) -> ErrorInfo:
    return ErrorInfo(code=SCHEMA_VIOLATION, message=str(exc))


def _tenant_error(subject_tenant: str | None, tenant: str) -> ErrorInfo | None:
    if subject_tenant != tenant:
        return ErrorInfo(
            code=TENANT_MISMATCH, message=f"tenant {tenant!r} does not match the subject's {subject_tenant!r}"
        )
    return None


def _field(data: bytes, name: str) -> str:
    """A field of a request that failed validation, to address the error reply (empty when unreadable)."""
    try:
        value = json.loads(data).get(name)
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


RESERVE_SPAN_NAME = "budget.reserve"
ALLOWED_ATTRIBUTE = "agentbus.budget.allowed"
RESERVED_USD_ATTRIBUTE = "agentbus.budget.reserved_usd"
BUDGET_ATTRIBUTE = "agentbus.budget.name"


class AccountantHandlers:
    def __init__(self, service: AccountantService, spans: SpanEmitter | None = None) -> None:
        self._service = service
        self._spans = spans or NullSpanEmitter()

    async def on_usage_recorded(self, delivery: Delivery) -> None:
        try:
            usage = UsageRecorded.model_validate_json(delivery.data)
        except ValidationError as exc:
            raise _usage_error(exc) from exc
        bind_message_context(tenant=usage.tenant, task_id=usage.task_id, usage_id=usage.usage_id)
        if (error := _tenant_error(_subject_tenant(USAGE_RECORDED, delivery.subject), usage.tenant)) is not None:
            raise TerminalError(error.code, error.message)
        priced = self._service.price(usage)
        try:
            await self._service.record(priced)
        except Exception as exc:
            # The ledger is the record of truth: ride out a database outage of minutes before a record is
            # given up on (and even then it is kept, replayable, in the dead-letter stream).
            delay = min(_STORE_RETRY_MAX_SECONDS, _STORE_RETRY_FIRST_SECONDS * 3 ** (delivery.deliveries - 1))
            raise RetryableError(f"the ledger could not be written: {exc!r}", delay_seconds=delay) from exc

    async def on_budget_reserve(self, message: Request) -> BudgetReserveReply:
        try:
            request = BudgetReserveRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return BudgetReserveReply(
                reservation_id=_field(message.data, "reservation_id"), allowed=False, error=_schema_error(exc)
            )
        if (error := _tenant_error(_subject_tenant(BUDGET_RESERVE, message.subject), request.tenant)) is not None:
            return BudgetReserveReply(reservation_id=request.reservation_id, allowed=False, error=error)
        bind_message_context(tenant=request.tenant, task_id=request.task_id)
        if message.trace is None:
            return await self._service.reserve(request)
        # The budget check shows in the task's trace, as a step of the run that asked for it.
        with self._spans.span(
            RESERVE_SPAN_NAME,
            "agent_step",
            message.trace.child(),
            parent_span_id=message.trace.span_id,
            task_id=request.task_id,
            tenant=request.tenant,
        ) as span:
            reply = await self._service.reserve(request)
            span.update({ALLOWED_ATTRIBUTE: reply.allowed, RESERVED_USD_ATTRIBUTE: reply.reserved_usd})
            if reply.error is not None:
                span.fail(f"{reply.error.code}: {reply.error.message}")
            elif not reply.allowed:
                span.set(BUDGET_ATTRIBUTE, reply.budget)
                span.fail(f"denied by budget {reply.budget}")
        return reply

    async def on_budget_release(self, message: Request) -> BudgetReserveReply:
        try:
            request = BudgetReleaseRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return BudgetReserveReply(
                reservation_id=_field(message.data, "task_id"), allowed=False, error=_schema_error(exc)
            )
        if (error := _tenant_error(_subject_tenant(BUDGET_RELEASE, message.subject), request.tenant)) is not None:
            return BudgetReserveReply(reservation_id=request.task_id, allowed=False, error=error)
        return await self._service.release(request)

    async def on_task_cost(self, message: Request) -> TaskCostReply:
        try:
            request = TaskCostRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return TaskCostReply(task_id=_field(message.data, "task_id"), cost_usd=0.0, error=_schema_error(exc))
        if (error := _tenant_error(_subject_tenant(TASK_COST, message.subject), request.tenant)) is not None:
            return TaskCostReply(task_id=request.task_id, cost_usd=0.0, error=error)
        return await self._service.task_cost(request)

    async def on_cost_report(self, message: Request) -> CostReportReply:
        try:
            request = CostReportRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return CostReportReply(by=_field(message.data, "by"), error=_schema_error(exc))
        return await self._service.report(request)
