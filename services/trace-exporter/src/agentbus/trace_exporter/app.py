"""Composition root of the trace-exporter."""

from __future__ import annotations

from agentbus.contracts.registry import TRACE_EXPORTER_SPANS, Service
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from agentbus.trace_exporter.adapters.jsonl import JsonlTraceSink
from agentbus.trace_exporter.adapters.ledger import SqlExportLedger
from agentbus.trace_exporter.adapters.otlp import OtlpHttpTraceSink, basic_auth
from agentbus.trace_exporter.domain import Redactor
from agentbus.trace_exporter.handlers import ExporterHandlers
from agentbus.trace_exporter.ports import ExportLedger, TraceSink
from agentbus.trace_exporter.service import ExporterMetrics, ExportPolicy, SpanExportService
from agentbus.trace_exporter.settings import TraceExporterSettings
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


def create_sink(settings: TraceExporterSettings) -> TraceSink:
    """Langfuse (OTLP/HTTP) when an endpoint is configured, else the local JSONL file."""
    if settings.otlp_endpoint is None:
        return JsonlTraceSink(settings.jsonl_path)
    authorization = None
    if settings.langfuse_public_key is not None and settings.langfuse_secret_key is not None:
        authorization = basic_auth(settings.langfuse_public_key, settings.langfuse_secret_key.get_secret_value())
    return OtlpHttpTraceSink(
        settings.otlp_endpoint,
        authorization=authorization,
        timeout_seconds=settings.otlp_timeout_seconds,
        compress=settings.otlp_gzip,
    )


class TraceExporterApp(BusService):
    """The bus service plus the export loop, which starts before the consumer and stops after it drained."""

    def __init__(self, settings: TraceExporterSettings, exporter: SpanExportService, registry: CollectorRegistry):
        self.exporter = exporter
        handlers = ExporterHandlers(exporter)
        # Enough handlers in flight for one batch to fill while the previous one is being exported.
        concurrency = max(settings.consumer_concurrency, 2 * settings.batch_size)

        async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
            # Plain ACK: the ledger is written before the ack, so a lost ack only means a redelivery (to
            # any replica) that the shared ledger turns into a no-op.
            return [
                ConsumerRunner(
                    js,
                    TRACE_EXPORTER_SPANS,
                    handlers.on_span_recorded,
                    ack_policy=AckPolicy.ACK,
                    metrics=metrics,
                    concurrency=concurrency,
                    batch=min(settings.fetch_batch, concurrency),
                )
            ]

        super().__init__(Service.TRACE_EXPORTER, settings, wiring, registry)

    async def start(self) -> None:
        await self.exporter.start()
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self.exporter.stop()


def create_app(
    settings: TraceExporterSettings, sink: TraceSink | None = None, ledger: ExportLedger | None = None
) -> TraceExporterApp:
    """Build the exporter: the configured sink, the shared SQL ledger, and the durable consumer of span events."""
    registry = CollectorRegistry()
    exporter = SpanExportService(
        sink or create_sink(settings),
        ledger or SqlExportLedger(settings.ledger_url),
        Redactor(settings.redact_patterns, settings.max_field_chars),
        ExporterMetrics(registry),
        ExportPolicy(
            batch_size=settings.batch_size,
            flush_interval_seconds=settings.flush_interval_seconds,
            first_backoff_seconds=settings.first_backoff_seconds,
            max_backoff_seconds=settings.max_backoff_seconds,
            ledger_retention_seconds=settings.ledger_retention_hours * 3600.0,
            claim_lease_seconds=settings.claim_lease_seconds,
            claim_recheck_seconds=settings.claim_recheck_seconds,
        ),
        environment=settings.environment,
    )
    return TraceExporterApp(settings, exporter, registry)
