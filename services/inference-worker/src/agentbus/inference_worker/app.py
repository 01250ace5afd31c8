"""Composition root of the inference-worker."""

from __future__ import annotations

from collections.abc import Callable

from agentbus.contracts.registry import LLM_ABORT, ConsumerSpec, Service, inference_consumer
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.handlers import WorkerHandlers
from agentbus.inference_worker.ports import LLMEngine, ManagedEngine
from agentbus.inference_worker.service import InferenceService, WorkerMetrics
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService, Wiring
from agentbus.runtime.spans import SpanEmitter
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


def create_engine(settings: WorkerSettings) -> LLMEngine:
    """The engine the settings choose. Engine modules with optional dependencies are imported only here."""
    if settings.engine == "openai":
        from agentbus.inference_worker.engines.openai import OpenAIEngine

        assert settings.openai_base_url is not None  # WorkerSettings checks it
        return OpenAIEngine(
            settings.openai_base_url,
            api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
            model_name=settings.openai_model,
            timeout_seconds=settings.request_timeout_seconds,
            max_retries=settings.max_retries,
        )
    if settings.engine == "vllm":
        from agentbus.inference_worker.engines.vllm import VllmEngine

        assert settings.vllm_model is not None  # WorkerSettings checks it
        return VllmEngine(
            settings.vllm_model, engine_args=settings.vllm_engine_args, tool_parser=settings.vllm_tool_parser
        )
    return ScriptedEngine(token_delay_seconds=settings.scripted_token_delay_seconds)


class WorkerApp(BusService):
    """The worker's service: starts its engine before consuming and closes it after the drain."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: LLMEngine,
        wiring: Wiring,
        registry: CollectorRegistry,
        service: InferenceService,
        spans: SpanEmitter | None,
    ) -> None:
        super().__init__(Service.INFERENCE_WORKER, settings, wiring, registry, spans=spans)
        self.engine = engine
        self.inference = service

    async def start(self) -> None:
        if isinstance(self.engine, ManagedEngine):
            await self.engine.start()
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if isinstance(self.engine, ManagedEngine):
            await self.engine.aclose()


def create_app(
    settings: WorkerSettings,
    engine: LLMEngine | None = None,
    *,
    consumer_for: Callable[[str], ConsumerSpec] = inference_consumer,
    spans: SpanEmitter | None = None,
) -> WorkerApp:
    """Build the worker: one durable consumer per served model, `max_concurrency` requests in flight each,
    and a subscription to each model's abort notices."""
    registry = CollectorRegistry()
    engine = engine or create_engine(settings)
    service = InferenceService(
        engine,
        WorkerMetrics(registry),
        request_timeout_seconds=settings.request_timeout_seconds,
        node_class=settings.node_class,
        meter_gpu=settings.meters_gpu,
    )
    spans = spans if spans is not None else SpanEmitter(Service.INFERENCE_WORKER)

    async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        runners = []
        for model in settings.models:
            spec = consumer_for(model)
            handlers = WorkerHandlers(js, service, spec, settings, spans)
            # Every worker of the model hears each abort (no queue group): whichever runs the request stops it.
            await nc.subscribe(LLM_ABORT.format(model=model), cb=handlers.on_llm_abort)
            # Plain ACK: results, usage and token chunks are published with deterministic ids, so a
            # redelivered request publishes nothing new.
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

    app = WorkerApp(settings, engine, wiring, registry, service, spans)
    app.add_health_check(service.healthy)
    return app
