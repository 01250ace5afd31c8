"""Composition root of the inference-worker."""

from __future__ import annotations

from agentbus.contracts.registry import Service, inference_consumer
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.handlers import WorkerHandlers
from agentbus.inference_worker.ports import LLMEngine
from agentbus.inference_worker.service import InferenceService, WorkerMetrics
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


def create_engine(settings: WorkerSettings) -> LLMEngine:
    """The engine the settings choose."""
    return ScriptedEngine(token_delay_seconds=settings.scripted_token_delay_seconds)


def create_app(settings: WorkerSettings, engine: LLMEngine | None = None) -> BusService:
    """Build the worker: one durable consumer per served model, `max_concurrency` requests in flight each."""
    registry = CollectorRegistry()
    service = InferenceService(engine or create_engine(settings), WorkerMetrics(registry))

    async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        runners = []
        for model in settings.models:
            spec = inference_consumer(model)
            handlers = WorkerHandlers(js, service, spec)
            # Plain ACK: results and usage are published with deterministic ids, so a redelivered
            # request publishes nothing new.
            runners.append(
                ConsumerRunner(
                    js,
                    spec,
                    handlers.on_llm_request,
                    ack_policy=AckPolicy.ACK,
                    metrics=metrics,
                    concurrency=settings.max_concurrency,
                    batch=min(settings.fetch_batch, settings.max_concurrency),
                )
            )
        return runners

    app = BusService(Service.INFERENCE_WORKER, settings, wiring, registry)
    app.add_health_check(service.healthy)
    return app
