"""Decode a message, call one use case, answer. No accounting rules here.

A request handler returns None when the accountant must not answer (its partition is another replica's):
the requester times out or finds no responder, and asks again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from agentbus.contracts.budget import (
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    RateLimitsReply,
    RateLimitsRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import (
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    RATE_LIMITS,
    TASK_COST,
    USAGE_RECORDED,
    SubjectSpec,
    budget_partition,
)
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.committer import NotServing, StoreUnavailable
from agentbus.cost_accountant.ports import PricedUsage
from agentbus.cost_accountant.service import AccountantService
from agentbus.runtime.consumer import Delivery, Inbound
from agentbus.runtime.errors import DependencyUnavailableError, TerminalError
from agentbus.runtime.logging import bind_message_context
from agentbus.runtime.replies import Request
from agentbus.runtime.spans import NullSpanEmitter, SpanEmitter
from agentbus.runtime.tracing import TraceContext
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
MISSING_TENANT = "missing_tenant"
NEGATIVE_QUANTITY = "negative_quantity"
TENANT_MISMATCH = "tenant_mismatch"
PARTITION_MISMATCH = "partition_mismatch"
_QUANTITIES = frozenset({"prompt_tokens", "completion_tokens", "gpu_seconds"})


def _usage_error(exc: ValidationError) -> TerminalError:
    """The most specific reason a usage record is invalid."""
    for error in exc.errors():
        field = error["loc"][0] if error["loc"] else None
        if field == "tenant" and error["type"] == "missing":
            return TerminalError(MISSING_TENANT, "usage record without a tenant cannot be charged to anyone")
        if field in _QUANTITIES and error["type"] in ("greater_than_equal", "greater_than"):
            return TerminalError(NEGATIVE_QUANTITY, f"{field} is negative: {error['input']!r}")
    return TerminalError(SCHEMA_VIOLATION, str(exc))


class _PartitionedSubject:
    """`<prefix>.<partition>.<tenant>` subjects, read without a regular expression (they are on the hot path)."""

    def __init__(self, spec: SubjectSpec) -> None:
        self._prefix = spec.pattern.removesuffix(".{partition}.{tenant}")
        assert self._prefix != spec.pattern, f"{spec.pattern} is not a budget partition subject"

    def check(self, subject: str, tenant: str) -> ErrorInfo | None:
        """Why a message for `tenant` does not belong on `subject` (its tenant or its partition), or None."""
        prefix, _, rest = subject.rpartition(".")
        prefix, _, partition = prefix.rpartition(".")
        subject_tenant = rest if prefix == self._prefix else None
        if subject_tenant != tenant:
            return ErrorInfo(
                code=TENANT_MISMATCH, message=f"tenant {tenant!r} does not match the subject's {subject_tenant!r}"
            )
        if partition != budget_partition(tenant):
            return ErrorInfo(
                code=PARTITION_MISMATCH,
                message=f"tenant {tenant!r} belongs to budget partition {budget_partition(tenant)}, not {partition}",
            )
        return None


_RESERVE = _PartitionedSubject(BUDGET_RESERVE)
_RELEASE = _PartitionedSubject(BUDGET_RELEASE)
_COST = _PartitionedSubject(TASK_COST)
_LIMITS = _PartitionedSubject(RATE_LIMITS)
_USAGE = _PartitionedSubject(USAGE_RECORDED)


def _answered(reply: BudgetReserveReply) -> asyncio.Future[BudgetReserveReply | None]:
    future: asyncio.Future[BudgetReserveReply | None] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


def _schema_error(exc: ValidationError) -> ErrorInfo:
    return ErrorInfo(code=SCHEMA_VIOLATION, message=str(exc))


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
RATE_LIMIT_ATTRIBUTE = "agentbus.rate.limit"


class AccountantHandlers:
    def __init__(self, service: AccountantService, spans: SpanEmitter | None = None) -> None:
        self._service = service
        self._spans = spans or NullSpanEmitter()

    async def on_usage_recorded(self, delivery: Delivery) -> None:
        """One usage record (see `on_usage_batch`): raises what the consumer must do with it."""
        outcome = (await self.on_usage_batch([Inbound(delivery.subject, delivery.data)]))[0]
        if outcome is not None:
            raise outcome

    async def on_usage_batch(self, messages: list[Inbound]) -> list[Exception | None]:
        """A fetch of usage records, written in one group commit. Per record: None (recorded, or a repeat), a
        TerminalError (can never be priced or charged: dead-letter it), or DependencyUnavailableError (the
        ledger or the partition is not available here now: wait)."""
        outcomes: list[Exception | None] = [None] * len(messages)
        priced: list[PricedUsage] = []
        valid: list[int] = []
        for index, message in enumerate(messages):
            try:
                priced.append(self._priced(message))
            except TerminalError as exc:
                outcomes[index] = exc
                continue
            valid.append(index)
        if not priced:
            return outcomes
        try:
            await self._service.record_many(priced)
        except NotServing as exc:
            # The partition moved to another replica meanwhile: it reads the records when they are redelivered.
            waiting = DependencyUnavailableError(f"budget partition not served here: {exc}")
            for index in valid:
                outcomes[index] = waiting
        except StoreUnavailable as exc:
            # The ledger is the record of truth: wait for the database however long it is away.
            waiting = DependencyUnavailableError(f"the ledger could not be written: {exc}")
            for index in valid:
                outcomes[index] = waiting
        return outcomes

    def _priced(self, message: Inbound) -> PricedUsage:
        try:
            usage = UsageRecorded.model_validate_json(message.data)
        except ValidationError as exc:
            raise _usage_error(exc) from exc
        if (error := _USAGE.check(message.subject, usage.tenant)) is not None:
            raise TerminalError(error.code, f"usage {usage.usage_id}: {error.message}")
        return self._service.price(usage)

    def on_budget_reserve(self, message: Request) -> Awaitable[BudgetReserveReply | None]:
        """Reservations are the hot path: without a trace to record, the answer is a future the request
        server completes when the verdict is committed (no task per reservation)."""
        try:
            request = BudgetReserveRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return _answered(
                BudgetReserveReply(
                    reservation_id=_field(message.data, "reservation_id"), allowed=False, error=_schema_error(exc)
                )
            )
        if (error := _RESERVE.check(message.subject, request.tenant)) is not None:
            return _answered(BudgetReserveReply(reservation_id=request.reservation_id, allowed=False, error=error))
        if message.trace is None:
            return self._service.reserve_soon(request)
        return self._traced_reserve(message.trace, request)

    async def _traced_reserve(self, trace: TraceContext, request: BudgetReserveRequest) -> BudgetReserveReply | None:
        # The budget check shows in the task's trace, as a step of the run that asked for it.
        bind_message_context(tenant=request.tenant, task_id=request.task_id)
        with self._spans.span(
            RESERVE_SPAN_NAME,
            "agent_step",
            trace.child(),
            parent_span_id=trace.span_id,
            task_id=request.task_id,
            tenant=request.tenant,
        ) as span:
            reply = await self._service.reserve(request)
            if reply is None:
                span.fail("not answered: the budget partition is served by another replica")
            elif reply.error is not None:
                span.fail(f"{reply.error.code}: {reply.error.message}")
            elif reply.throttled:
                # Held back, not refused: the call waits for the limit and is asked for again.
                span.update({ALLOWED_ATTRIBUTE: False, RATE_LIMIT_ATTRIBUTE: reply.limit})
            else:
                span.update({ALLOWED_ATTRIBUTE: reply.allowed, RESERVED_USD_ATTRIBUTE: reply.reserved_usd})
                if not reply.allowed:
                    span.set(BUDGET_ATTRIBUTE, reply.budget)
                    span.fail(f"denied by budget {reply.budget}")
        return reply

    async def on_budget_release(self, message: Request) -> BudgetReserveReply | None:
        try:
            request = BudgetReleaseRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return BudgetReserveReply(
                reservation_id=_field(message.data, "task_id"), allowed=False, error=_schema_error(exc)
            )
        if (error := _RELEASE.check(message.subject, request.tenant)) is not None:
            return BudgetReserveReply(reservation_id=request.task_id, allowed=False, error=error)
        return await self._service.release(request)

    async def on_task_cost(self, message: Request) -> TaskCostReply | None:
        try:
            request = TaskCostRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return TaskCostReply(task_id=_field(message.data, "task_id"), cost_usd=0.0, error=_schema_error(exc))
        if (error := _COST.check(message.subject, request.tenant)) is not None:
            return TaskCostReply(task_id=request.task_id, cost_usd=0.0, error=error)
        return await self._service.task_cost(request)

    async def on_rate_limits(self, message: Request) -> RateLimitsReply | None:
        try:
            request = RateLimitsRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return RateLimitsReply(tenant=_field(message.data, "tenant"), error=_schema_error(exc))
        if (error := _LIMITS.check(message.subject, request.tenant)) is not None:
            return RateLimitsReply(tenant=request.tenant, error=error)
        return await self._service.rate_limits(request)

    async def on_cost_report(self, message: Request) -> CostReportReply:
        try:
            request = CostReportRequest.model_validate_json(message.data)
        except ValidationError as exc:
            return CostReportReply(by=_field(message.data, "by"), error=_schema_error(exc))
        return await self._service.report(request)
