"""The accountant's use cases: price and record usage, decide reservations, release, report, alert."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

from agentbus.contracts.budget import (
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    CostReportRow,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.common import ErrorInfo, utc_now
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.batching import BatchWriter
from agentbus.cost_accountant.domain import Verdict, nano_to_usd, usd_to_nano
from agentbus.cost_accountant.ports import AccountantStore, AlertSink, PricedUsage, ReservationInput
from agentbus.cost_accountant.pricing import PriceTable, PricingError, price_tokens, price_tool_call, price_usage
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.logging import get_logger
from prometheus_client import CollectorRegistry, Counter, Histogram

_log = get_logger(__name__)

COST_METRIC = "agentbus_cost_usd_total"
TOKENS_METRIC = "agentbus_cost_tokens_total"
GPU_SECONDS_METRIC = "agentbus_cost_gpu_seconds_total"
USAGE_RECORDS_METRIC = "agentbus_cost_usage_records_total"
PRICED_BY_DEFAULT_METRIC = "agentbus_cost_priced_by_default_total"
RESERVATIONS_METRIC = "agentbus_budget_reservations_total"
RESERVATION_SECONDS_METRIC = "agentbus_budget_reservation_seconds"
ALERTS_METRIC = "agentbus_budget_alerts_published_total"

STORE_UNAVAILABLE = "store_unavailable"
MISSING_MODEL = "missing_model"
MISSING_TOOL = "missing_tool"


class AccountantMetrics:
    """Cost, tokens and GPU-seconds by tenant and model; reservations by outcome and latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cost_usd = Counter(
            COST_METRIC, "Priced cost recorded in the ledger (USD).", ["tenant", "model", "kind"], registry=registry
        )
        self.tokens = Counter(
            TOKENS_METRIC, "Tokens recorded in the ledger.", ["tenant", "model", "direction"], registry=registry
        )
        self.gpu_seconds = Counter(
            GPU_SECONDS_METRIC, "GPU-seconds recorded in the ledger.", ["tenant", "node_class"], registry=registry
        )
        self.usage_records = Counter(
            USAGE_RECORDS_METRIC,
            "Usage records handled, by outcome (recorded, duplicate).",
            ["outcome"],
            registry=registry,
        )
        self.priced_by_default = Counter(
            PRICED_BY_DEFAULT_METRIC,
            "Usage records priced by a default rule because their model, node class or tool has no price.",
            ["tenant", "model"],
            registry=registry,
        )
        self.reservations = Counter(
            RESERVATIONS_METRIC,
            "Budget reservations, by outcome (allowed, denied, error).",
            ["outcome"],
            registry=registry,
        )
        self.reservation_seconds = Histogram(
            RESERVATION_SECONDS_METRIC,
            "Time to decide a reservation.",
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.alerts = Counter(ALERTS_METRIC, "Soft-limit alerts published.", ["tenant"], registry=registry)


def _error(code: str, message: str) -> ErrorInfo:
    return ErrorInfo(code=code, message=message)


class AccountantService:
    """Use cases over an `AccountantStore`. Usage records are written in shared transactions (see batching)."""

    def __init__(
        self,
        store: AccountantStore,
        prices: PriceTable,
        metrics: AccountantMetrics,
        *,
        max_batch: int = 500,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._prices = prices
        self._metrics = metrics
        self._clock = clock
        self._writer: BatchWriter[PricedUsage, bool] = BatchWriter(self._write_usage, max_batch=max_batch)
        # Reservations that arrive together are decided in one transaction (each still sees those before it):
        # under load, one commit serves many, and the budget rows are locked once per batch, not per call.
        self._reserver: BatchWriter[ReservationInput, Verdict] = BatchWriter(self._decide, max_batch=max_batch)
        self.alerts_queued = asyncio.Event()
        """Set when a write queued soft-limit alerts, so the publisher need not wait for its next poll."""

    async def start(self) -> None:
        self._writer.start()
        self._reserver.start()

    async def stop(self) -> None:
        await self._reserver.stop()
        await self._writer.stop()

    # --- usage -------------------------------------------------------------------------------------

    def price(self, usage: UsageRecorded) -> PricedUsage:
        """Price a record, or raise TerminalError with the reason when it cannot be priced."""
        try:
            price = price_usage(self._prices, usage)
        except PricingError as exc:
            raise TerminalError(exc.code, f"usage {usage.usage_id}: {exc.message}") from exc
        return PricedUsage(usage, price.nano, price.priced_by_default)

    async def record_usage(self, usage: UsageRecorded) -> bool:
        """Price and record one usage record; False when its usage id was already in the ledger.

        A model, node class or tool without a price is priced by the table's default rule, flagged
        `priced_by_default` on its ledger row and counted; without a default rule the record is refused
        (TerminalError: the consumer dead-letters it with the reason).
        """
        return await self.record(self.price(usage))

    async def record(self, priced: PricedUsage) -> bool:
        """Record a priced usage record, in a transaction shared with those recorded at the same time."""
        return await self._writer.submit(priced)

    async def _write_usage(self, entries: list[PricedUsage]) -> list[bool]:
        written = await self._store.record_usage(entries, self._clock())
        for entry, new in zip(entries, written.inserted, strict=True):
            self._metrics.usage_records.labels("recorded" if new else "duplicate").inc()
            if new:
                self._count(entry)
        if written.alerts_queued:
            self.alerts_queued.set()
        return written.inserted

    def _count(self, entry: PricedUsage) -> None:
        usage = entry.usage
        model = usage.model or ""
        self._metrics.cost_usd.labels(usage.tenant, model, usage.kind).inc(nano_to_usd(entry.cost_nano))
        if usage.prompt_tokens:
            self._metrics.tokens.labels(usage.tenant, model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._metrics.tokens.labels(usage.tenant, model, "completion").inc(usage.completion_tokens)
        if usage.gpu_seconds:
            self._metrics.gpu_seconds.labels(usage.tenant, usage.node_class or "").inc(usage.gpu_seconds)
        if entry.priced_by_default:
            self._metrics.priced_by_default.labels(usage.tenant, model or usage.tool or "").inc()
            _log.warning("priced_by_default", usage_id=usage.usage_id, model=usage.model, tool=usage.tool)

    # --- reservations ------------------------------------------------------------------------------

    def _estimate(self, request: BudgetReserveRequest) -> tuple[int, bool]:
        if request.kind == "llm":
            if not request.model:
                raise PricingError(MISSING_MODEL, "an llm reservation must name its model")
            price = price_tokens(
                self._prices, request.model, request.estimated_prompt_tokens, request.estimated_completion_tokens
            )
        else:
            if not request.tool:
                raise PricingError(MISSING_TOOL, "a tool reservation must name its tool")
            price = price_tool_call(self._prices, request.tool)
        return price.nano, price.priced_by_default

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        """Allow or deny the estimated cost of one call against every budget that applies."""
        started = time.perf_counter()
        try:
            amount, _ = self._estimate(request)
        except PricingError as exc:
            self._metrics.reservations.labels("error").inc()
            return BudgetReserveReply(
                reservation_id=request.reservation_id, allowed=False, error=_error(exc.code, exc.message)
            )
        reservation = ReservationInput(
            reservation_id=request.reservation_id,
            tenant=request.tenant,
            task_id=request.task_id,
            agent=request.agent,
            user=request.submitted_by,
            kind=request.kind,
            model=request.model,
            tool=request.tool,
            amount_nano=amount,
            task_budget_nano=usd_to_nano(request.task_budget_usd) if request.task_budget_usd is not None else None,
        )
        try:
            verdict = await self._reserver.submit(reservation)
        except Exception as exc:
            _log.exception("reservation_failed", reservation_id=request.reservation_id)
            self._metrics.reservations.labels("error").inc()
            return BudgetReserveReply(
                reservation_id=request.reservation_id,
                allowed=False,
                error=_error(STORE_UNAVAILABLE, f"the budget store failed: {exc.__class__.__name__}; retry"),
            )
        self._metrics.reservations.labels("allowed" if verdict.allowed else "denied").inc()
        self._metrics.reservation_seconds.observe(time.perf_counter() - started)
        return BudgetReserveReply(
            reservation_id=request.reservation_id,
            allowed=verdict.allowed,
            reserved_usd=nano_to_usd(verdict.amount_nano),
            budget=verdict.budget,
            limit_usd=nano_to_usd(verdict.limit_nano) if verdict.limit_nano is not None else None,
            spent_usd=nano_to_usd(verdict.committed_nano) if verdict.committed_nano is not None else None,
        )

    async def _decide(self, batch: list[ReservationInput]) -> list[Verdict]:
        return await self._store.reserve_many(batch, self._clock())

    async def release(self, request: BudgetReleaseRequest) -> BudgetReserveReply:
        """Give back a finished task's open reservations. The reply's `reservation_id` is the task id and
        `reserved_usd` what was given back."""
        try:
            released = await self._store.release_task(request.tenant, request.task_id, self._clock())
        except Exception as exc:
            _log.exception("release_failed", task_id=request.task_id)
            return BudgetReserveReply(
                reservation_id=request.task_id,
                allowed=False,
                error=_error(STORE_UNAVAILABLE, f"the budget store failed: {exc.__class__.__name__}; retry"),
            )
        return BudgetReserveReply(reservation_id=request.task_id, allowed=True, reserved_usd=nano_to_usd(released))

    async def expire_reservations(self) -> int:
        """Release reservations that were never settled within their time to live; the nano-dollars freed."""
        return await self._store.expire_reservations(self._clock())

    # --- reads -------------------------------------------------------------------------------------

    async def task_cost(self, request: TaskCostRequest) -> TaskCostReply:
        try:
            cost, missing = await self._store.task_cost(request.tenant, request.task_id, request.usage_ids)
        except Exception as exc:
            _log.exception("task_cost_failed", task_id=request.task_id)
            return TaskCostReply(
                task_id=request.task_id,
                cost_usd=0.0,
                error=_error(STORE_UNAVAILABLE, f"the ledger failed: {exc.__class__.__name__}; retry"),
            )
        return TaskCostReply(task_id=request.task_id, cost_usd=nano_to_usd(cost), missing_usage_ids=missing)

    async def report(self, request: CostReportRequest) -> CostReportReply:
        try:
            lines = await self._store.report(request.tenant, request.by, request.since)
        except Exception as exc:
            _log.exception("report_failed")
            return CostReportReply(
                by=request.by, error=_error(STORE_UNAVAILABLE, f"the ledger failed: {exc.__class__.__name__}")
            )
        rows = [
            CostReportRow(
                key=line.key,
                prompt_tokens=line.prompt_tokens,
                completion_tokens=line.completion_tokens,
                gpu_seconds=line.gpu_seconds,
                calls=line.calls,
                cost_usd=nano_to_usd(line.cost_nano),
            )
            for line in lines
        ]
        return CostReportReply(by=request.by, rows=rows, total_usd=nano_to_usd(sum(line.cost_nano for line in lines)))

    # --- alerts ------------------------------------------------------------------------------------

    async def publish_alerts(self, sink: AlertSink, *, limit: int = 100) -> int:
        """Publish queued soft-limit alerts and mark them published. An alert published but not yet marked
        (a crash in between) is published again with the same id, which the stream drops as a duplicate."""
        self.alerts_queued.clear()
        alerts = await self._store.unpublished_alerts(limit)
        published: list[str] = []
        try:
            for alert in alerts:
                await sink.publish(alert)
                published.append(alert.alert_id)
                self._metrics.alerts.labels(alert.tenant).inc()
        finally:
            await self._store.mark_alerts_published(published, self._clock())
        return len(published)
