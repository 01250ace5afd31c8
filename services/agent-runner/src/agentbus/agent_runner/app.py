"""Composition root of the agent-runner: settings in, a ready-to-serve service out."""

from __future__ import annotations

from agentbus.agent_runner.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.agent_runner.adapters.nats_budget_gate import NatsBudgetGate, UnlimitedBudgetGate
from agentbus.agent_runner.adapters.nats_event_log import NatsEventLog
from agentbus.agent_runner.adapters.nats_kv_run_store import NatsKvRunStore
from agentbus.agent_runner.adapters.nats_kv_session_store import NatsKvSessionStore
from agentbus.agent_runner.adapters.postgres_session_store import PostgresSessionStore
from agentbus.agent_runner.adapters.redis_session_store import RedisSessionStore
from agentbus.agent_runner.adapters.retriever_memory import RetrieverMemory
from agentbus.agent_runner.domain import MEMORY_TOOLS, RunTiming
from agentbus.agent_runner.handlers import RunnerHandlers
from agentbus.agent_runner.memory import MemoryStoreSpec, load_memory_specs
from agentbus.agent_runner.ports import BudgetGate, SessionStore
from agentbus.agent_runner.service import RunnerMetrics, RunnerService
from agentbus.agent_runner.session_coordinator import SessionCoordinator
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.agent_runner.specs import AgentSpec, load_agent_specs
from agentbus.agent_runner.tools import MEMORY_TOOL_SPECS, ToolCatalog
from agentbus.contracts.registry import (
    RUNNER_CANCELLATIONS,
    RUNNER_DEAD_LETTERS,
    RUNNER_LLM_RESULTS,
    RUNNER_SUBMISSIONS,
    RUNNER_TIMERS,
    RUNNER_TOOL_UPDATES,
    RUNS,
    SESSION_DELETE,
    SESSION_SHOW,
    SESSIONS,
    SESSIONS_LIST,
    TASK_REPLAY,
    Service,
)
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.guardrails import Guardrails, load_guardrails
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.replies import ReplyServer
from agentbus.runtime.routing import RoutingTable, load_routing_table
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from agentbus.runtime.tool_registry import load_tool_definitions
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


class RunnerApp(BusService):
    """The runner's consumers, and the replay responder for identities that may not read streams."""

    def __init__(self, settings: RunnerSettings, build: RunnerBuild, registry: CollectorRegistry, spans: SpanEmitter):
        super().__init__(Service.AGENT_RUNNER, settings, self._wire, registry, spans=spans)
        self._config = settings
        self._build = build
        self._replies: ReplyServer | None = None
        self.add_health_check(lambda: self._replies is not None and self._replies.serving)

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        service = await self._build(nc, js)
        handlers = RunnerHandlers(service)
        self._replies = ReplyServer(nc, Service.AGENT_RUNNER.value, concurrency=self._config.request_concurrency)
        await self._replies.serve(TASK_REPLAY.wildcard, handlers.on_replay_request)
        await self._replies.serve(SESSIONS_LIST.wildcard, handlers.on_sessions_list_request)
        await self._replies.serve(SESSION_SHOW.wildcard, handlers.on_session_show_request)
        await self._replies.serve(SESSION_DELETE.wildcard, handlers.on_session_delete_request)
        # Plain ACK: every transition is idempotent (compare-and-set state, deduplicated publishes),
        # so a lost ack only causes a harmless redelivery.
        return [
            ConsumerRunner(
                js,
                spec,
                handler,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                concurrency=self._config.consumer_concurrency,
                batch=self._config.fetch_batch,
            )
            for spec, handler in (
                (RUNNER_SUBMISSIONS, handlers.on_task_submitted),
                (RUNNER_CANCELLATIONS, handlers.on_task_cancel_requested),
                (RUNNER_LLM_RESULTS, handlers.on_llm_result),
                (RUNNER_TOOL_UPDATES, handlers.on_tool_update),
                (RUNNER_TIMERS, handlers.on_run_timer),
                (RUNNER_DEAD_LETTERS, handlers.on_dead_letter),
            )
        ]

    async def stop(self) -> None:
        if self._replies is not None:
            await self._replies.stop(self._config.drain_timeout_seconds)
        await super().stop()
        await self._build.close()


class RunnerBuild:
    """Builds the use cases once connected (the store, publisher and budget gate need the connection)."""

    def __init__(self, settings: RunnerSettings, spans: SpanEmitter, metrics: RunnerMetrics) -> None:
        remote_tools = load_tool_definitions(settings.tools_dir) if settings.tools_dir.is_dir() else {}
        clashes = sorted(set(remote_tools) & MEMORY_TOOLS)
        if clashes:
            raise ValueError(f"tools {clashes} are the runner's memory tools and cannot be defined for the executor")
        self._catalog = ToolCatalog(
            {name: definition.spec() for name, definition in remote_tools.items()} | MEMORY_TOOL_SPECS
        )
        # Memory stores load first: an agent naming one that does not exist stops start-up naming its field.
        self._memory = load_memory_specs(settings.memory_dir)
        self._urls = {name: spec.connection_url() for name, spec in self._memory.items() if spec.type != "nats-kv"}
        self._guardrail_catalog = load_guardrails(settings.guardrails_file)
        self._guardrails: dict[str, Guardrails] = {}
        self._agents = load_agent_specs(settings.agents_dir, self._catalog.names, self._check_spec)
        self._sessions: SessionCoordinator | None = None
        self._router = (
            load_routing_table(settings.routing_file) if settings.routing_file.is_file() else RoutingTable.empty()
        )
        self._settings = settings
        self._spans = spans
        self._metrics = metrics

    def _check_spec(self, agent: AgentSpec) -> tuple[str, str] | None:
        return self._check_guardrails(agent) or self._check_memory(agent)

    def _check_guardrails(self, agent: AgentSpec) -> tuple[str, str] | None:
        """Every policy an agent names exists; its guardrails are kept for its runs."""
        known = self._guardrail_catalog.policies
        for index, name in enumerate(agent.guardrails):
            if name not in known:
                where = self._guardrail_catalog.source
                return f"guardrails[{index}]", f"no policy {name!r} in {where}; known: {sorted(known)}"
        if agent.guardrails:
            self._guardrails[agent.name] = self._guardrail_catalog.for_agent(agent.guardrails, agent=agent.name)
        return None

    def _check_memory(self, agent: AgentSpec) -> tuple[str, str] | None:
        """An agent's memory store exists; its memory tools need a store that keeps long-term memory."""
        if agent.memory is not None and agent.memory not in self._memory:
            return "memory", f"unknown memory store {agent.memory!r}; known: {sorted(self._memory)}"
        for index, tool in enumerate(agent.tools):
            if tool not in MEMORY_TOOLS:
                continue
            store = self._memory.get(agent.memory) if agent.memory is not None else None
            if store is None or store.active_long_term is None:
                return f"tools[{index}]", f"{tool!r} needs a memory store (`memory:`) with long_term memory"
        return None

    async def _session_store(self, js: JetStreamContext, spec: MemoryStoreSpec) -> SessionStore:
        if spec.type == "redis":
            assert spec.redis is not None
            return RedisSessionStore.from_url(self._urls[spec.name], spec.name, spec.ttl_seconds, spec.redis.key_prefix)
        if spec.type == "postgres":
            assert spec.postgres is not None
            return PostgresSessionStore(self._urls[spec.name], spec.name, spec.ttl_seconds, spec.postgres.table)
        return NatsKvSessionStore(js, await js.key_value(SESSIONS.bucket), spec.name, spec.ttl_seconds)

    async def close(self) -> None:
        if self._sessions is not None:
            await self._sessions.close()
            self._sessions = None

    async def __call__(self, nc: NatsClient, js: JetStreamContext) -> RunnerService:
        settings = self._settings
        if self._memory:
            await self.close()
            stores = {name: await self._session_store(js, spec) for name, spec in self._memory.items()}
            self._sessions = SessionCoordinator(stores, self._memory)
        budget: BudgetGate = (
            NatsBudgetGate(
                nc, timeout_seconds=settings.budget_timeout_seconds, cost_wait_seconds=settings.cost_wait_seconds
            )
            if settings.budgets_enabled
            else UnlimitedBudgetGate()
        )
        return RunnerService(
            NatsKvRunStore(await js.key_value(RUNS.bucket)),
            JetStreamPublisher(js, nc),
            self._agents,
            self._catalog,
            self._metrics,
            budget,
            self._router,
            self._spans,
            timing=RunTiming(
                default_deadline_seconds=settings.default_deadline_seconds, redrive_seconds=settings.redrive_seconds
            ),
            events=NatsEventLog(js),
            sessions=self._sessions,
            memory=RetrieverMemory(nc, js, self._memory, settings.memory_timeout_seconds) if self._memory else None,
            guardrails=self._guardrails,
        )


def create_app(settings: RunnerSettings) -> RunnerApp:
    """Build the runner. Specs load here, so a bad agent, tool, memory store or routing file stops start-up
    naming it."""
    registry = CollectorRegistry()
    spans = SpanEmitter(Service.AGENT_RUNNER)
    build = RunnerBuild(settings, spans, RunnerMetrics(registry))
    return RunnerApp(settings, build, registry, spans)
