"""Composition root of the cost-accountant: settings in, a ready-to-serve service out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from agentbus.contracts.registry import (
    ACCOUNTANT_USAGE,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    COST_REPORT,
    TASK_COST,
    Service,
)
from agentbus.cost_accountant.adapters.nats_bus import JetStreamAlertSink, ReplyServer
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore, create_engine, migrate
from agentbus.cost_accountant.budgets import BudgetPolicy
from agentbus.cost_accountant.config import load_budget_config, load_price_table
from agentbus.cost_accountant.handlers import AccountantHandlers
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.cost_accountant.service import AccountantMetrics, AccountantService
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

_log = get_logger(__name__)


class AccountantApp(BusService):
    """The usage consumer, the budget and report request handlers, the reservation sweeper and the alert
    publisher, around one SQL store that is migrated at start-up."""

    def __init__(
        self,
        settings: AccountantSettings,
        prices: PriceTable,
        policy: BudgetPolicy,
        registry: CollectorRegistry,
        spans: SpanEmitter | None = None,
    ) -> None:
        super().__init__(Service.COST_ACCOUNTANT, settings, self._wire, registry, spans=spans)
        self._config = settings
        self._prices = prices
        self._policy = policy
        self._accountant_metrics = AccountantMetrics(registry)
        self._store: SqlAccountantStore | None = None
        self._service: AccountantService | None = None
        self._replies: ReplyServer | None = None
        self._loops: list[asyncio.Task[None]] = []
        self.add_health_check(lambda: self._replies is not None and self._replies.serving)

    @property
    def store(self) -> SqlAccountantStore:
        if self._store is None:
            raise RuntimeError("the accountant has not started")
        return self._store

    @property
    def service(self) -> AccountantService:
        if self._service is None:
            raise RuntimeError("the accountant has not started")
        return self._service

    async def start(self) -> None:
        settings = self._config
        engine = create_engine(settings.database_url, schema=settings.database_schema)
        self._store = SqlAccountantStore(engine, self._policy, reservation_ttl_seconds=settings.reservation_ttl_seconds)
        if settings.migrate_on_start:
            await migrate(engine)
        self._service = AccountantService(
            self._store, self._prices, self._accountant_metrics, max_batch=settings.ingest_max_batch
        )
        await self._service.start()
        await super().start()

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        service = self.service
        handlers = AccountantHandlers(service, self.spans)
        self._replies = ReplyServer(nc, Service.COST_ACCOUNTANT.value, concurrency=self._config.request_concurrency)
        await self._replies.serve(BUDGET_RESERVE.wildcard, handlers.on_budget_reserve)
        await self._replies.serve(BUDGET_RELEASE.wildcard, handlers.on_budget_release)
        await self._replies.serve(TASK_COST.wildcard, handlers.on_task_cost)
        await self._replies.serve(COST_REPORT.wildcard, handlers.on_cost_report)
        sink = JetStreamAlertSink(js)
        self._loops = [
            asyncio.create_task(self._every(self._config.expiry_sweep_seconds, service.expire_reservations)),
            asyncio.create_task(self._publish_alerts(lambda: service.publish_alerts(sink))),
        ]
        # Plain ACK after the record's transaction committed: the ledger is keyed by usage id, so a lost
        # ack only brings a redelivery that writes nothing.
        return [
            ConsumerRunner(
                js,
                ACCOUNTANT_USAGE,
                handlers.on_usage_recorded,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                concurrency=self._config.ingest_concurrency,
                batch=self._config.ingest_fetch_batch,
            )
        ]

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                _log.exception("periodic_job_failed")

    async def _publish_alerts(self, publish: Callable[[], Awaitable[int]]) -> None:
        queued = self.service.alerts_queued
        while True:
            try:
                await publish()
            except Exception:
                _log.exception("alert_publishing_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queued.wait(), timeout=self._config.alert_retry_seconds)

    async def stop(self) -> None:
        """Stop answering, drain the usage consumer through the writer, then close the store."""
        if self._replies is not None:
            await self._replies.stop(self._config.drain_timeout_seconds)
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        await super().stop()
        if self._service is not None:
            await self._service.stop()
        if self._store is not None:
            await self._store.close()


def create_app(settings: AccountantSettings, *, spans: SpanEmitter | None = None) -> AccountantApp:
    """Build the accountant. The price table and budgets load here, so a bad file stops start-up naming it."""
    prices = load_price_table(settings.prices_file)
    policy = BudgetPolicy(load_budget_config(settings.budgets_file))
    spans = spans if spans is not None else SpanEmitter(Service.COST_ACCOUNTANT)
    return AccountantApp(settings, prices, policy, CollectorRegistry(), spans)
