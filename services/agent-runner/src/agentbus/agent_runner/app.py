"""Composition root of the agent-runner: settings in, a ready-to-serve service out."""

from __future__ import annotations

from agentbus.agent_runner.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.agent_runner.adapters.nats_kv_run_store import NatsKvRunStore
from agentbus.agent_runner.handlers import RunnerHandlers
from agentbus.agent_runner.service import RunnerMetrics, RunnerService
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.agent_runner.specs import load_agent_specs
from agentbus.agent_runner.tools import BUILTIN_TOOLS, BuiltinToolbox
from agentbus.contracts.registry import (
    RUNNER_CANCELLATIONS,
    RUNNER_LLM_RESULTS,
    RUNNER_SUBMISSIONS,
    RUNS,
    Service,
)
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


def create_app(settings: RunnerSettings) -> BusService:
    """Build the runner. Agent specs load here, so a bad spec stops start-up naming its file and field."""
    agents = load_agent_specs(settings.agents_dir, set(BUILTIN_TOOLS))
    registry = CollectorRegistry()
    runner_metrics = RunnerMetrics(registry)

    async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        service = RunnerService(
            NatsKvRunStore(await js.key_value(RUNS.bucket)),
            JetStreamPublisher(js),
            agents,
            BuiltinToolbox(),
            runner_metrics,
        )
        handlers = RunnerHandlers(service)
        # Plain ACK: every transition is idempotent (compare-and-set state, deduplicated publishes),
        # so a lost ack only causes a harmless redelivery.
        return [
            ConsumerRunner(
                js,
                spec,
                handler,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                concurrency=settings.consumer_concurrency,
                batch=settings.fetch_batch,
            )
            for spec, handler in (
                (RUNNER_SUBMISSIONS, handlers.on_task_submitted),
                (RUNNER_CANCELLATIONS, handlers.on_task_cancel_requested),
                (RUNNER_LLM_RESULTS, handlers.on_llm_result),
            )
        ]

    return BusService(Service.AGENT_RUNNER, settings, wiring, registry)
