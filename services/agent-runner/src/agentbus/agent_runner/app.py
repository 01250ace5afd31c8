"""Composition root of the agent-runner: settings in, a ready-to-serve service out."""

from __future__ import annotations

from agentbus.agent_runner.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.agent_runner.adapters.nats_budget_gate import NatsBudgetGate, UnlimitedBudgetGate
from agentbus.agent_runner.adapters.nats_kv_run_store import NatsKvRunStore
from agentbus.agent_runner.handlers import RunnerHandlers
from agentbus.agent_runner.ports import BudgetGate
from agentbus.agent_runner.service import RunnerMetrics, RunnerService
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.agent_runner.specs import load_agent_specs
from agentbus.agent_runner.tools import ToolCatalog
from agentbus.contracts.registry import (
    RUNNER_CANCELLATIONS,
    RUNNER_LLM_RESULTS,
    RUNNER_SUBMISSIONS,
    RUNNER_TOOL_UPDATES,
    RUNS,
    Service,
)
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.routing import RoutingTable, load_routing_table
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from agentbus.runtime.tool_registry import load_tool_definitions
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


def create_app(settings: RunnerSettings) -> BusService:
    """Build the runner. Specs load here, so a bad agent, tool or routing file stops start-up naming it."""
    remote_tools = load_tool_definitions(settings.tools_dir) if settings.tools_dir.is_dir() else {}
    catalog = ToolCatalog({name: definition.spec() for name, definition in remote_tools.items()})
    agents = load_agent_specs(settings.agents_dir, catalog.names)
    router = load_routing_table(settings.routing_file) if settings.routing_file.is_file() else RoutingTable.empty()
    registry = CollectorRegistry()
    runner_metrics = RunnerMetrics(registry)
    spans = SpanEmitter(Service.AGENT_RUNNER)

    async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        budget: BudgetGate = (
            NatsBudgetGate(
                nc, timeout_seconds=settings.budget_timeout_seconds, cost_wait_seconds=settings.cost_wait_seconds
            )
            if settings.budgets_enabled
            else UnlimitedBudgetGate()
        )
        service = RunnerService(
            NatsKvRunStore(await js.key_value(RUNS.bucket)),
            JetStreamPublisher(js, nc),
            agents,
            catalog,
            runner_metrics,
            budget,
            router,
            spans,
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
                (RUNNER_TOOL_UPDATES, handlers.on_tool_update),
            )
        ]

    return BusService(Service.AGENT_RUNNER, settings, wiring, registry, spans=spans)
