"""The lifecycle every service shares: connect, serve health and metrics, consume, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable

from agentbus.runtime.connection import connect_service
from agentbus.runtime.consumer import ConsumerRunner
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.http import HealthServer
from agentbus.runtime.logging import configure_logging, get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.settings import ServiceSettings
from agentbus.runtime.spans import SpanEmitter
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

_log = get_logger(__name__)

_SPAN_FLUSH_SECONDS = 5.0

Wiring = Callable[[NatsClient, JetStreamContext, ConsumerMetrics], Awaitable[list[ConsumerRunner]]]
"""Builds a service's consumers once it is connected: its composition root supplies this."""


class BusService:
    """A service made of durable consumers on one NATS connection.

    `spans`, when given, is started once connected and flushed on shutdown after the consumers drained;
    its counters are exported with the service's metrics.
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        wiring: Wiring,
        registry: CollectorRegistry | None = None,
        *,
        spans: SpanEmitter | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ConsumerMetrics(self.registry)
        self.spans = spans
        if spans is not None:
            spans.attach_metrics(self.registry)
        self._wiring = wiring
        self._nc: NatsClient | None = None
        self._consumers: list[ConsumerRunner] = []
        self._health_checks: list[Callable[[], bool]] = []

    def add_health_check(self, check: Callable[[], bool]) -> None:
        """Add a condition /readyz requires besides a live connection and running consumers."""
        self._health_checks.append(check)

    def ready(self) -> bool:
        """Connected, every consumer pulling, and every added check passing."""
        return (
            self._nc is not None
            and self._nc.is_connected
            and bool(self._consumers)
            and all(c.running for c in self._consumers)
            and all(check() for check in self._health_checks)
        )

    async def start(self) -> None:
        self._nc = await connect_service(self.settings, self.name)
        js = self._nc.jetstream()
        if self.spans is not None:
            await self.spans.start(js)
        try:
            self._consumers = await self._wiring(self._nc, js, self.metrics)
            for consumer in self._consumers:
                await consumer.start()
        except NotFoundError as exc:
            # Services never create streams or consumers themselves: that is the bootstrap's job.
            raise ConfigurationError(
                f"a stream, consumer or bucket of the registry is missing on {self.settings.nats_url} ({exc}); "
                "run `agentbus streams apply` first"
            ) from exc
        _log.info("service_started", consumers=[c.spec.durable for c in self._consumers])

    async def stop(self) -> None:
        """Stop pulling, finish in-flight messages within the drain timeout, then close the connection."""
        await asyncio.gather(*(c.stop(self.settings.drain_timeout_seconds) for c in self._consumers))
        if self.spans is not None:
            # After the consumers: the spans of the messages they drained are flushed too.
            await self.spans.stop(timeout=min(_SPAN_FLUSH_SECONDS, self.settings.drain_timeout_seconds))
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        _log.info("service_stopped")


async def serve(service: BusService, stop: asyncio.Event | None = None) -> None:
    """Run `service` with its HTTP endpoints until SIGTERM or SIGINT (or `stop` is set), then drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings = service.settings
    health = HealthServer(settings.http_host, settings.http_port, service.registry, service.ready)
    await health.start()
    _log.info("http_listening", port=health.port)
    try:
        await service.start()
        await stop.wait()
    finally:
        await service.stop()
        await health.stop()


def run_service(name: str, factory: Callable[[], BusService]) -> None:
    """Entry point of a service process: build the service, configure logging, serve it.

    A configuration error (bad settings, a bad spec file) ends the process with status 2 and a one-line
    message naming what is wrong, rather than a traceback.
    """
    try:
        service = factory()
    except (ConfigurationError, ValidationError) as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    configure_logging(service.settings.log_level, service.name)
    try:
        asyncio.run(serve(service))
    except ConfigurationError as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
