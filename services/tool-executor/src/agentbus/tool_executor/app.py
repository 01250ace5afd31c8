"""Composition root of the tool-executor: settings in, a ready-to-serve service out."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import httpx
from agentbus.contracts.registry import (
    APPROVALS_LIST,
    EXECUTOR_CALLS,
    EXECUTOR_DECISIONS,
    EXECUTOR_WITHDRAWALS,
    Service,
)
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.replies import ReplyServer
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from agentbus.runtime.tool_registry import (
    McpServerDefinition,
    ToolDefinitionError,
    distinct_tools,
    load_mcp_servers,
    load_tool_definitions,
)
from agentbus.tool_executor.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.tool_executor.adapters.mcp import McpConnection, McpMetrics, McpRunner
from agentbus.tool_executor.adapters.runners import (
    HttpRunner,
    PythonRunner,
    RetrievalRunner,
    ShellRunner,
    missing_secrets,
    missing_server_secrets,
)
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore
from agentbus.tool_executor.approvers import check_groups, load_approvers
from agentbus.tool_executor.domain import argument_validator
from agentbus.tool_executor.handlers import ExecutorHandlers
from agentbus.tool_executor.policy import ApproverDirectory, RuleError, compile_policy
from agentbus.tool_executor.ports import DependencyGate, ToolRunner
from agentbus.tool_executor.service import (
    AcceptCall,
    Decide,
    ExecuteCall,
    Executor,
    ExecutorMetrics,
    FaultPoints,
    ListApprovals,
    LoadedTool,
    Sweep,
    WithdrawCall,
)
from agentbus.tool_executor.settings import FAULT_POINTS, ExecutorSettings
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

_log = get_logger(__name__)


def load_tools(
    tools_dir: Path, approvers_file: Path, python_runner: PythonRunner, environ: Mapping[str, str]
) -> tuple[dict[str, LoadedTool], ApproverDirectory]:
    """Load and check every tool file (MCP tool servers' too); a problem raises a ConfigurationError naming the
    file and the field. Tools are keyed by every name a call may give them (an MCP tool's reference too)."""
    definitions = load_tool_definitions(tools_dir)
    approvers = load_approvers(approvers_file)
    loaded: dict[str, LoadedTool] = {}
    for definition in distinct_tools(definitions):
        try:
            policy = compile_policy(definition)
        except RuleError as exc:
            field, _, message = str(exc).partition(": ")
            raise ToolDefinitionError(f"{definition.source}: field '{definition.field(field)}': {message}") from exc
        check_groups(definition, approvers, approvers_file)
        if definition.kind == "http" and (missing := missing_secrets(definition, environ)):
            raise ConfigurationError(
                f"{definition.source}: field '{missing[0]}': the environment variable is not set on the executor"
            )
        if definition.kind == "python":
            python_runner.register(definition)
        if definition.approval.policy != "never" and not definition.approval.approvers:
            _log.warning("tool_without_approvers", tool=definition.name, file=str(definition.source))
        loaded[definition.name] = LoadedTool(definition, policy, argument_validator(definition.parameters))
    tools = {key: loaded[definition.name] for key, definition in definitions.items()}
    return tools, approvers


def load_servers(tools_dir: Path, environ: Mapping[str, str]) -> dict[str, McpServerDefinition]:
    """The MCP tool servers of the tools folder; one whose secrets are not in the environment stops start-up."""
    servers = load_mcp_servers(tools_dir)
    for server in servers.values():
        if missing := missing_server_secrets(server, environ):
            raise ConfigurationError(
                f"{server.source}: field '{missing[0]}': the environment variable is not set on the executor"
            )
    return servers


class UseCases:
    """The executor's use cases, built once connected (their runners and publisher need the connection)."""

    def __init__(
        self,
        executor: Executor,
        runners: Mapping[str, ToolRunner],
        *,
        max_running_tools: int,
        gates: Mapping[str, DependencyGate],
    ) -> None:
        self.executor = executor
        self.execute = ExecuteCall(executor, runners, max_running_tools=max_running_tools, gates=gates)
        self.accept = AcceptCall(executor, self.execute)
        self.decide = Decide(executor, self.execute)
        self.withdraw = WithdrawCall(executor)
        self.sweep = Sweep(executor, self.execute)
        self.list_approvals = ListApprovals(executor.store)


class ToolExecutorApp(BusService):
    """The executor's consumers, the approvals list it answers, and the sweep that expires approvals, resumes
    unfinished executions and publishes what was left unpublished."""

    def __init__(
        self,
        settings: ExecutorSettings,
        store: SqlApprovalStore,
        tools: dict[str, LoadedTool],
        approvers: ApproverDirectory,
        python_runner: PythonRunner,
        registry: CollectorRegistry,
        spans: SpanEmitter,
        servers: Mapping[str, McpServerDefinition],
    ) -> None:
        self._store = store
        self._tools = tools
        self._approvers = approvers
        self._python_runner = python_runner
        mcp_metrics = McpMetrics(registry)
        self.mcp_connections = {
            name: McpConnection(server, os.environ, mcp_metrics) for name, server in servers.items()
        }
        self._http_client = httpx.AsyncClient(follow_redirects=False)
        self._executor_metrics = ExecutorMetrics(registry)
        self.use_cases: UseCases | None = None
        self._replies: ReplyServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        super().__init__(Service.TOOL_EXECUTOR, settings, self._wire, registry, spans=spans)
        self.add_health_check(lambda: self._sweeper is not None and not self._sweeper.done())
        self.add_health_check(lambda: self._replies is not None and self._replies.serving)

    @property
    def store(self) -> SqlApprovalStore:
        """The executor's store (approvals, ledger, audit, tickets)."""
        return self._store

    @property
    def config(self) -> ExecutorSettings:
        assert isinstance(self.settings, ExecutorSettings)
        return self.settings

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        config = self.config
        await self._store.migrate()
        runners: dict[str, ToolRunner] = {
            "python": self._python_runner,
            "shell": ShellRunner(),
            "http": HttpRunner(self._http_client),
            "retrieval": RetrievalRunner(nc),
        }
        mcp = McpRunner(self.mcp_connections)
        runners["mcp"] = mcp
        assert self.spans is not None
        executor = Executor(
            self._tools,
            self._approvers,
            self._store,
            JetStreamPublisher(nc, js),
            self._executor_metrics,
            self.spans,
            lease_seconds=config.execution_lease_seconds,
            faults=FaultPoints(config.fault_pause_at, config.fault_marker_dir),
        )
        self.use_cases = use_cases = UseCases(
            executor, runners, max_running_tools=config.max_running_tools, gates={"mcp": mcp}
        )
        handlers = ExecutorHandlers(use_cases.accept, use_cases.decide, use_cases.withdraw, use_cases.list_approvals)
        self._replies = ReplyServer(nc, Service.TOOL_EXECUTOR.value, concurrency=config.request_concurrency)
        await self._replies.serve(APPROVALS_LIST.wildcard, handlers.on_approvals_list)
        concurrency = config.consumer_concurrency
        batch = min(config.fetch_batch, concurrency)
        # Plain ACK: the ledger makes every effect idempotent on call_id (and the audit on the decision's
        # stream sequence), so a lost ack only re-delivers a message that then changes nothing.
        return [
            ConsumerRunner(
                js, spec, handler, ack_policy=AckPolicy.ACK, metrics=metrics, concurrency=concurrency, batch=batch
            )
            for spec, handler in (
                (EXECUTOR_CALLS, handlers.on_tool_call),
                (EXECUTOR_WITHDRAWALS, handlers.on_tool_call_withdrawn),
                (EXECUTOR_DECISIONS, handlers.on_approval_decision),
            )
        ]

    async def start(self) -> None:
        # Connecting to MCP servers goes on in the background: one that is down is waited for, not fatal.
        for connection in self.mcp_connections.values():
            connection.start()
        await super().start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="executor-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._replies is not None:
            await self._replies.stop(self.config.drain_timeout_seconds)
        if self.use_cases is not None:
            await self.use_cases.execute.cancel_background()
        await super().stop()
        for connection in self.mcp_connections.values():
            await connection.stop()
        if self.use_cases is not None:
            await self.use_cases.executor.flush_marks()
        await self._http_client.aclose()
        await self._store.close()

    async def _sweep_loop(self) -> None:
        # The first sweep runs at once: after a restart it resumes what the previous process left.
        while True:
            if self.use_cases is not None:
                await self.use_cases.sweep()
            await asyncio.sleep(self.config.expiry_sweep_seconds)


def create_app(settings: ExecutorSettings) -> ToolExecutorApp:
    """Build the executor. Tool files and the approvers file load here: a bad one stops start-up."""
    if settings.fault_pause_at is not None and settings.fault_pause_at not in FAULT_POINTS:
        raise ConfigurationError(f"fault_pause_at must be one of {FAULT_POINTS}, not {settings.fault_pause_at!r}")
    python_runner = PythonRunner()
    tools, approvers = load_tools(settings.tools_dir, settings.approvers_file, python_runner, os.environ)
    servers = load_servers(settings.tools_dir, os.environ)
    registry = CollectorRegistry()
    spans = SpanEmitter(Service.TOOL_EXECUTOR)
    store = SqlApprovalStore(settings.database_url)
    return ToolExecutorApp(settings, store, tools, approvers, python_runner, registry, spans, servers)
