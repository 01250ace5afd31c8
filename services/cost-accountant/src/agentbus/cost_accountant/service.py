"""The accountant's use cases: price and record usage, decide reservations, close tasks, price tasks, report,
expire, alert.

Every decision goes through the group committer (see committer.py) and is answered only once committed. A
use case answers None when its partition is not (or no longer) this replica's: nothing is said, and the
caller asks again, reaching the partition's owner.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agentbus.contracts.budget import (
    BudgetErrorCode,
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    CostReportReply,
    CostReportRequest,
    CostReportRow,
    RateBucketLevel,
    RateLimitsReply,
    RateLimitsRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.common import ErrorInfo, utc_now
from agentbus.contracts.registry import budget_partition
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.book import PartitionBook, TaskKey
from agentbus.cost_accountant.committer import (
    CloseOp,
    ExpireOp,
    GroupCommitter,
    LoadOp,
    NotServing,
    ReadOp,
    ReserveOp,
    StoreUnavailable,
    UsageOp,
    naive_utc,
)
from agentbus.cost_accountant.domain import Verdict, nano_to_usd, usd_to_nano
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.ports import AccountantStore, AlertSink, PricedUsage, ReservationInput
from agentbus.cost_accountant.pricing import PriceTable, PricingError, price_tokens, price_tool_call, price_usage
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)


def _error(code: str, message: str) -> ErrorInfo:
    return ErrorInfo(code=code, message=message)


def partition_of(tenant: str) -> int:
    return int(budget_partition(tenant))


class AccountantService:
    """Use cases over the group committer (decisions) and the store (reports, alerts)."""

    def __init__(
        self,
        committer: GroupCommitter,
        store: AccountantStore,
        prices: PriceTable,
        metrics: AccountantMetrics,
        *,
        task_idle_seconds: float = 600.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._committer = committer
        self._store = store
        self._prices = prices
        self._metrics = metrics
        self._task_idle = task_idle_seconds
        self._clock = clock
        # Every reservation counts one outcome: the labelled children are looked up once.
        self._outcomes = {
            outcome: metrics.reservations.labels(outcome)
            for outcome in ("allowed", "denied", "closed", "error", "throttled", "rate_limited")
        }
        self._recorded = metrics.usage_records.labels("recorded")
        self._duplicate = metrics.usage_records.labels("duplicate")
        self._usage_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

    # --- usage -------------------------------------------------------------------------------------

    def price(self, usage: UsageRecorded) -> PricedUsage:
        """Price a record, or raise TerminalError with the reason when it cannot be priced.

        A model, node class or tool without a price is priced by the table's default rule, flagged
        `priced_by_default` on its ledger row and counted; without a default rule the record is refused
        (the consumer dead-letters it with the reason).
        """
        try:
            price = price_usage(self._prices, usage)
        except PricingError as exc:
            raise TerminalError(exc.code, f"usage {usage.usage_id}: {exc.message}") from exc
        return PricedUsage(usage, price.nano, price.priced_by_default)

    async def record(self, priced: PricedUsage) -> bool:
        """Post a priced record to the ledger (see `record_many`); False when its usage id was there already."""
        return (await self.record_many([priced]))[0]

    async def record_many(self, entries: list[PricedUsage]) -> list[bool]:
        """Post priced records to the ledger, in the transaction shared with every decision made at the same
        time; per record, whether it was new (False: its usage id was in the ledger already). Raises
        NotServing or StoreUnavailable, for all of them."""
        by_partition: dict[int, list[PricedUsage]] = {}
        for entry in entries:
            by_partition.setdefault(partition_of(entry.usage.tenant), []).append(entry)
        ops = [UsageOp(partition, group) for partition, group in by_partition.items()]
        for op in ops:
            committed = self._committer.enqueue(op)
            # Counted as the commit completes, before anyone woken by the same commit (a cost query) answers.
            committed.add_done_callback(functools.partial(self._counted, op.entries))
        results: dict[int, bool] = {}
        for op in ops:
            for entry, new in zip(op.entries, await op.future, strict=True):
                results[id(entry)] = new
        return [results[id(entry)] for entry in entries]

    def _counted(self, entries: list[PricedUsage], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        for entry, new in zip(entries, future.result(), strict=True):
            if new:
                self._recorded.inc()
                self._count(entry)
            else:
                self._duplicate.inc()

    def _count(self, entry: PricedUsage) -> None:
        usage = entry.usage
        model = usage.model or ""
        key = (usage.tenant, model, usage.kind)
        children = self._usage_children.get(key)
        if children is None:
            # Looked up once per tenant, model and kind: every record is counted.
            children = (
                self._metrics.cost_usd.labels(usage.tenant, model, usage.kind),
                self._metrics.tokens.labels(usage.tenant, model, "prompt"),
                self._metrics.tokens.labels(usage.tenant, model, "completion"),
            )
            self._usage_children[key] = children
        cost, prompt, completion = children
        cost.inc(nano_to_usd(entry.cost_nano))
        if usage.prompt_tokens:
            prompt.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            completion.inc(usage.completion_tokens)
        if usage.gpu_seconds:
            self._metrics.gpu_seconds.labels(usage.tenant, usage.node_class or "").inc(usage.gpu_seconds)
        if entry.priced_by_default:
            self._metrics.priced_by_default.labels(usage.tenant, model or usage.tool or "").inc()
            _log.warning("priced_by_default", usage_id=usage.usage_id, model=usage.model, tool=usage.tool)

    # --- reservations ------------------------------------------------------------------------------

    def _estimate(self, request: BudgetReserveRequest) -> int:
        if request.kind == "llm":
            if not request.model:
                raise PricingError(BudgetErrorCode.MISSING_MODEL, "an llm reservation must name its model")
            return price_tokens(
                self._prices, request.model, request.estimated_prompt_tokens, request.estimated_completion_tokens
            ).nano
        if not request.tool:
            raise PricingError(BudgetErrorCode.MISSING_TOOL, "a tool reservation must name its tool")
        return price_tool_call(self._prices, request.tool).nano

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply | None:
        """Allow or deny the estimated cost of one call against every budget that applies, answered once the
        verdict is committed. The same reservation id gets its first verdict again; a closed task's
        reservations are refused (`task_closed`)."""
        return await self.reserve_soon(request)

    def reserve_soon(self, request: BudgetReserveRequest) -> asyncio.Future[BudgetReserveReply | None]:
        """`reserve` as a future, queued at once: the request path runs no task of its own per reservation."""
        started = time.perf_counter()
        rid = request.reservation_id
        try:
            amount = self._estimate(request)
        except PricingError as exc:
            self._outcomes["error"].inc()
            return _done(BudgetReserveReply(reservation_id=rid, allowed=False, error=_error(exc.code, exc.message)))
        partition = partition_of(request.tenant)
        verdict = self._committed_verdict(partition, (request.tenant, request.task_id), rid)
        if verdict is not None:
            return _done(self._answer(rid, request.task_id, verdict, started))
        reservation = ReservationInput(
            reservation_id=rid,
            tenant=request.tenant,
            task_id=request.task_id,
            agent=request.agent,
            user=request.submitted_by,
            kind=request.kind,
            model=request.model,
            tool=request.tool,
            amount_nano=amount,
            task_budget_nano=usd_to_nano(request.task_budget_usd) if request.task_budget_usd is not None else None,
            tokens=_tokens(request),
        )
        decided = self._committer.enqueue(ReserveOp(partition, reservation))
        answer: asyncio.Future[BudgetReserveReply | None] = asyncio.get_running_loop().create_future()

        def committed(future: asyncio.Future[Any]) -> None:
            if answer.done():
                return
            error = future.exception()
            if error is None:
                answer.set_result(self._answer(rid, request.task_id, future.result(), started))
            elif isinstance(error, StoreUnavailable):
                self._outcomes["error"].inc()
                answer.set_result(
                    BudgetReserveReply(
                        reservation_id=rid, allowed=False, error=_error(BudgetErrorCode.STORE_UNAVAILABLE, str(error))
                    )
                )
            elif isinstance(error, NotServing):
                answer.set_result(None)
            else:
                answer.set_exception(error)

        decided.add_done_callback(committed)
        return answer

    def _answer(self, rid: str, task_id: str, verdict: Verdict | None, started: float) -> BudgetReserveReply:
        if verdict is None:
            self._outcomes["closed"].inc()
            return BudgetReserveReply(
                reservation_id=rid,
                allowed=False,
                error=_error(BudgetErrorCode.TASK_CLOSED, f"task {task_id} was closed: its run has ended"),
            )
        if verdict.rate_limit is not None:
            self._outcomes["rate_limited" if verdict.rate_reject else "throttled"].inc()
        else:
            self._outcomes["allowed" if verdict.allowed else "denied"].inc()
        self._metrics.reservation_seconds.observe(time.perf_counter() - started)
        return _reply(rid, verdict)

    def _committed_verdict(self, partition: int, key: TaskKey, reservation_id: str) -> Verdict | None:
        """A repeat's first verdict straight from memory, when it is committed already."""
        book = self._committer.books.get(partition)
        task = book.tasks.get(key) if book is not None else None
        hold = task.holds.get(reservation_id) if task is not None else None
        if book is None or hold is None or hold.batch > book.committed:
            return None
        return hold.verdict

    async def release(self, request: BudgetReleaseRequest) -> BudgetReserveReply | None:
        """Close a finished task: give back its open reservations and refuse its later ones. The reply's
        `reservation_id` is the task id and `reserved_usd` what was given back (0 when closed already)."""
        try:
            released: int = await self._committer.submit(
                CloseOp(partition_of(request.tenant), request.tenant, request.task_id)
            )
        except NotServing:
            return None
        except StoreUnavailable as exc:
            return BudgetReserveReply(
                reservation_id=request.task_id, allowed=False, error=_error(BudgetErrorCode.STORE_UNAVAILABLE, str(exc))
            )
        return BudgetReserveReply(reservation_id=request.task_id, allowed=True, reserved_usd=nano_to_usd(released))

    async def expire_reservations(self) -> int:
        """Release reservations never settled within their time to live; the nano-dollars freed. Idle tasks
        and past months are forgotten from memory at the same time."""
        partitions = list(self._committer.books)
        results = await asyncio.gather(
            *(self._committer.submit(ExpireOp(partition)) for partition in partitions), return_exceptions=True
        )
        await self._committer.upkeep(self._task_idle)
        return sum(result for result in results if isinstance(result, int))

    # --- reads -------------------------------------------------------------------------------------

    async def rate_limits(self, request: RateLimitsRequest) -> RateLimitsReply | None:
        """The tenant's rate buckets in the current window, read from its partition's book once the partition
        passed the fence (so the levels are the owner's current ones). None: another replica's partition."""
        partition = partition_of(request.tenant)
        try:
            await self._committer.submit(ReadOp(partition))
        except NotServing:
            return None
        except StoreUnavailable as exc:
            return RateLimitsReply(tenant=request.tenant, error=_error(BudgetErrorCode.STORE_UNAVAILABLE, str(exc)))
        book = self._committer.books.get(partition)
        if book is None:
            return None
        now = naive_utc(self._clock())
        rates = self._committer.rates
        tenant_limit = rates.tenant_limit(request.tenant)
        return RateLimitsReply(
            tenant=request.tenant,
            window_seconds=rates.window_seconds,
            window_started_at=rates.window_began(now).replace(tzinfo=UTC),
            buckets=[
                RateBucketLevel(
                    bucket=level.bucket,
                    requests=level.requests,
                    tokens=level.tokens,
                    requests_per_minute=level.requests_per_minute,
                    tokens_per_minute=level.tokens_per_minute,
                    on_limit="reject" if level.on_limit == "reject" else "wait",
                )
                for level in book.rates.levels(request.tenant, now)
            ],
            open_tasks=book.rates.open_tasks.get(request.tenant, 0),
            concurrent_tasks=tenant_limit.concurrent_tasks if tenant_limit is not None else None,
        )

    async def task_cost(self, request: TaskCostRequest) -> TaskCostReply | None:
        """The task's priced cost, once every asked-for usage id is in the ledger or `wait_seconds` passed
        (then with the ids still missing). Woken by the commit that brings the last one, never polling."""
        key = (request.tenant, request.task_id)
        partition = partition_of(request.tenant)
        try:
            book = await self._current_book(partition, key)
            if book is None:
                return None
            cost, missing = book.task_cost(key, request.usage_ids)
            if missing and request.wait_seconds > 0:
                arrived = self._committer.wait_for_usage(key, missing)
                try:
                    await asyncio.wait_for(arrived, timeout=request.wait_seconds)
                except TimeoutError:
                    pass
                finally:
                    self._committer.forget_waiter(key, arrived)
                book = await self._current_book(partition, key)
                if book is None:
                    return None
                cost, missing = book.task_cost(key, request.usage_ids)
            closed = False
            if request.close and not missing:
                # The run is priced on everything it named: close it in the same request, one hop less.
                await self._committer.submit(CloseOp(partition, request.tenant, request.task_id))
                closed = True
        except NotServing:
            return None
        except StoreUnavailable as exc:
            return TaskCostReply(
                task_id=request.task_id, cost_usd=0.0, error=_error(BudgetErrorCode.STORE_UNAVAILABLE, str(exc))
            )
        return TaskCostReply(
            task_id=request.task_id, cost_usd=nano_to_usd(cost), missing_usage_ids=missing, closed=closed
        )

    async def _current_book(self, partition: int, key: TaskKey) -> PartitionBook | None:
        """The partition's book holding the task with nothing of it uncommitted: straight from memory while
        the lease surely holds, else once the committer loaded the task and passed the fence. None: the
        partition is not (or no longer) this replica's."""
        book = self._committer.readable(partition)
        while True:
            task = book.tasks.get(key) if book is not None else None
            if book is not None and task is not None and not book.pending(task):
                return book
            # Wait for a commit. The committer may decide the next batch before this coroutine resumes, so
            # the check above runs again after every one.
            try:
                await self._committer.submit(LoadOp(partition, key[0], key[1]))
            except NotServing:
                return None
            book = self._committer.books.get(partition)
            if book is None:
                return None

    async def report(self, request: CostReportRequest) -> CostReportReply:
        try:
            lines = await self._store.report(request.tenant, request.by, request.since)
        except Exception as exc:
            _log.exception("report_failed")
            return CostReportReply(
                by=request.by,
                error=_error(BudgetErrorCode.STORE_UNAVAILABLE, f"the ledger failed: {exc.__class__.__name__}"),
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
        """Publish queued soft-limit alerts of the partitions owned here and mark them published. An alert
        published but not yet marked (a crash in between) is published again with the same id, which the
        stream drops as a duplicate."""
        alerts = [
            alert
            for alert in await self._store.unpublished_alerts(limit)
            if self._committer.owns(partition_of(alert.tenant))
        ]
        published: list[str] = []
        try:
            for alert in alerts:
                await sink.publish(alert)
                published.append(alert.alert_id)
                self._metrics.alerts.labels(alert.tenant).inc()
        finally:
            await self._store.mark_alerts_published(published, self._clock())
        return len(published)


def _tokens(request: BudgetReserveRequest) -> int:
    if request.kind != "llm":
        return 0
    return request.estimated_prompt_tokens + request.estimated_completion_tokens


def _done(value: BudgetReserveReply | None) -> asyncio.Future[BudgetReserveReply | None]:
    future: asyncio.Future[BudgetReserveReply | None] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _reply(reservation_id: str, verdict: Verdict) -> BudgetReserveReply:
    if verdict.rate_limit is not None:
        if verdict.rate_reject:
            return BudgetReserveReply(
                reservation_id=reservation_id,
                allowed=False,
                retry_after_seconds=verdict.wait_seconds,
                limit=verdict.rate_limit,
                error=_error(
                    BudgetErrorCode.RATE_LIMITED,
                    f"rate limit {verdict.rate_limit} refuses new tasks while it is reached",
                ),
            )
        return BudgetReserveReply(
            reservation_id=reservation_id,
            allowed=False,
            throttled=True,
            retry_after_seconds=verdict.wait_seconds,
            limit=verdict.rate_limit,
        )
    if verdict.allowed:
        return BudgetReserveReply(
            reservation_id=reservation_id, allowed=True, reserved_usd=nano_to_usd(verdict.amount_nano)
        )
    return BudgetReserveReply(
        reservation_id=reservation_id,
        allowed=False,
        budget=verdict.budget,
        limit_usd=nano_to_usd(verdict.limit_nano) if verdict.limit_nano is not None else None,
        spent_usd=nano_to_usd(verdict.committed_nano) if verdict.committed_nano is not None else None,
        requested_usd=nano_to_usd(verdict.requested_nano) if verdict.requested_nano is not None else None,
    )
