"""Composition root of the cost-accountant: settings in, a ready-to-serve service out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import (
    BUDGET_PARTITIONS,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    COST_REPORT,
    RATE_LIMITS,
    TASK_COST,
    Service,
    SubjectSpec,
    accountant_usage_consumer,
)
from agentbus.cost_accountant.adapters.nats_bus import JetStreamAlertSink
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore
from agentbus.cost_accountant.budgets import BudgetPolicy
from agentbus.cost_accountant.committer import FaultPoints, GroupCommitter
from agentbus.cost_accountant.config import load_budget_config, load_limits_config, load_price_table
from agentbus.cost_accountant.handlers import AccountantHandlers
from agentbus.cost_accountant.limits import RatePolicy
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.ownership import PartitionOwnership
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.cost_accountant.service import AccountantService
from agentbus.cost_accountant.settings import FAULT_POINTS, AccountantSettings
from agentbus.runtime.consumer import AckPolicy, BatchConsumerRunner, ConsumerRunner
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.replies import ReplyServer
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

_log = get_logger(__name__)


def _partition_subject(spec: SubjectSpec, partition: int) -> str:
    return spec.pattern.format(partition=partition, tenant="*")


class AccountantApp(BusService):
    """The budget partitions this replica owns (their request subjects and usage consumers, served while their
    leases hold), the cost report, the expiry sweep and the alert publisher, around one group committer and
    one SQL store that is migrated at start-up."""

    def __init__(
        self,
        settings: AccountantSettings,
        prices: PriceTable,
        policy: BudgetPolicy,
        registry: CollectorRegistry,
        spans: SpanEmitter | None = None,
        rates: RatePolicy | None = None,
    ) -> None:
        super().__init__(Service.COST_ACCOUNTANT, settings, self._wire, registry, spans=spans)
        self._config = settings
        self._prices = prices
        self._policy = policy
        self._rates = rates
        self._accountant_metrics = AccountantMetrics(registry)
        self._store: SqlAccountantStore | None = None
        self._committer: GroupCommitter | None = None
        self._service: AccountantService | None = None
        self._ownership: PartitionOwnership | None = None
        self._handlers: AccountantHandlers | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._report: ReplyServer | None = None
        self._served: dict[int, tuple[ReplyServer, BatchConsumerRunner]] = {}
        self._loops: list[asyncio.Task[None]] = []

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

    @property
    def committer(self) -> GroupCommitter:
        if self._committer is None:
            raise RuntimeError("the accountant has not started")
        return self._committer

    @property
    def ownership(self) -> PartitionOwnership:
        if self._ownership is None:
            raise RuntimeError("the accountant has not started")
        return self._ownership

    @property
    def served(self) -> set[int]:
        """The budget partitions whose requests and usage this replica serves now."""
        return set(self._served)

    def ready(self) -> bool:
        """Connected, answering cost reports, and serving every partition it owns (possibly none: a replica
        beyond the eighth waits for a partition to free up)."""
        return (
            self._nc is not None
            and self._nc.is_connected
            and self._ownership is not None
            and self._ownership.started
            and self._report is not None
            and self._report.serving
            and all(responder.serving and consumer.running for responder, consumer in self._served.values())
        )

    async def start(self) -> None:
        settings = self._config
        self._store = SqlAccountantStore(settings.database_url, schema=settings.database_schema)
        if settings.migrate_on_start:
            await self._store.migrate()
        self._committer = GroupCommitter(
            self._store,
            self._policy,
            self._accountant_metrics,
            replica=settings.replica_id,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            max_batch=settings.ingest_max_batch,
            clock=utc_now,
            on_fenced=self._on_fenced,
            faults=FaultPoints(settings.fault_pause_at, settings.fault_marker_dir),
            rates=self._rates,
        )
        self._committer.start()
        self._service = AccountantService(
            self._committer,
            self._store,
            self._prices,
            self._accountant_metrics,
            task_idle_seconds=settings.task_idle_seconds,
        )
        await super().start()

    def _on_fenced(self, partition: int, epoch: int) -> None:
        if self._ownership is not None:
            self._ownership.fenced(partition, epoch)

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        service = self.service
        self._nc, self._js = nc, js
        self._handlers = AccountantHandlers(service, self.spans)
        # Reports read the database: any replica answers them.
        self._report = ReplyServer(nc, Service.COST_ACCOUNTANT.value, concurrency=self._config.request_concurrency)
        await self._report.serve(COST_REPORT.wildcard, self._handlers.on_cost_report)
        await nc.flush()
        self._ownership = PartitionOwnership(
            self.store,
            self.committer,
            self,
            self._accountant_metrics,
            partitions=BUDGET_PARTITIONS,
            ttl_seconds=self._config.lease_ttl_seconds,
            renew_seconds=self._config.lease_renew_seconds,
            clock=utc_now,
        )
        await self._ownership.start()
        sink = JetStreamAlertSink(js)
        self._loops = [
            asyncio.create_task(self._every(self._config.expiry_sweep_seconds, service.expire_reservations)),
            asyncio.create_task(self._publish_alerts(lambda: service.publish_alerts(sink))),
        ]
        # Each partition's usage consumer runs while its lease is held (see serve); none is static.
        return []

    async def serve(self, partition: int) -> None:
        """Serve a partition this replica just took: its reserve, release and cost subjects, and its usage."""
        if partition in self._served or self._nc is None or self._js is None or self._handlers is None:
            return
        handlers = self._handlers
        responder = ReplyServer(self._nc, Service.COST_ACCOUNTANT.value, concurrency=self._config.request_concurrency)
        await responder.serve(_partition_subject(BUDGET_RESERVE, partition), handlers.on_budget_reserve)
        await responder.serve(_partition_subject(BUDGET_RELEASE, partition), handlers.on_budget_release)
        await responder.serve(_partition_subject(TASK_COST, partition), handlers.on_task_cost)
        await responder.serve(_partition_subject(RATE_LIMITS, partition), handlers.on_rate_limits)
        # Plain ACK after the record's group commit: the ledger is keyed by usage id, so a lost ack only
        # brings a redelivery that writes nothing.
        batch = self._config.ingest_fetch_batch
        consumer = BatchConsumerRunner(
            self._js,
            accountant_usage_consumer(partition),
            handlers.on_usage_batch,
            ack_policy=AckPolicy.ACK,
            metrics=self.metrics,
            batch=batch,
            in_flight=max(1, -(-self._config.ingest_concurrency // batch)),
        )
        await consumer.start()
        # The server knows the subscriptions once it answered a ping: only then is the partition served.
        await self._nc.flush()
        self._served[partition] = (responder, consumer)

    async def unserve(self, partition: int) -> None:
        """Stop serving a partition: no new requests or usage; those in flight finish or go unanswered."""
        served = self._served.pop(partition, None)
        if served is None:
            return
        responder, consumer = served
        timeout = self._config.drain_timeout_seconds
        await asyncio.gather(responder.stop(timeout), consumer.stop(timeout))

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                _log.exception("periodic_job_failed")

    async def _publish_alerts(self, publish: Callable[[], Awaitable[int]]) -> None:
        queued = self.committer.alerts_queued
        while True:
            queued.clear()
            try:
                await publish()
            except Exception:
                _log.exception("alert_publishing_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queued.wait(), timeout=self._config.alert_retry_seconds)

    async def stop(self) -> None:
        """Give every partition up (its queued work committed, its lease freed for another replica), stop
        answering, then close the connection, the committer and the store."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        if self._ownership is not None:
            await self._ownership.stop()
        if self._report is not None:
            await self._report.stop(self._config.drain_timeout_seconds)
        await super().stop()
        if self._committer is not None:
            await self._committer.stop()
        if self._store is not None:
            await self._store.close()


def create_app(settings: AccountantSettings, *, spans: SpanEmitter | None = None) -> AccountantApp:
    """Build the accountant. The price table and budgets load here, so a bad file stops start-up naming it."""
    if settings.fault_pause_at is not None and settings.fault_pause_at not in FAULT_POINTS:
        raise ConfigurationError(f"fault_pause_at must be one of {FAULT_POINTS}, not {settings.fault_pause_at!r}")
    prices = load_price_table(settings.prices_file)
    policy = BudgetPolicy(load_budget_config(settings.budgets_file))
    rates = RatePolicy(load_limits_config(settings.limits_file)) if settings.limits_file is not None else None
    spans = spans if spans is not None else SpanEmitter(Service.COST_ACCOUNTANT)
    return AccountantApp(settings, prices, policy, CollectorRegistry(), spans, rates)
