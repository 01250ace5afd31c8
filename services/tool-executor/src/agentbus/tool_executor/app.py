"""Composition root of the tool-executor: settings in, a ready-to-serve service out."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import httpx
from agentbus.contracts.registry import EXECUTOR_CALLS, EXECUTOR_DECISIONS, Service
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import SpanEmitter
from agentbus.runtime.tool_registry import ToolDefinitionError, load_tool_definitions
from agentbus.tool_executor.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.tool_executor.adapters.runners import (
    HttpRunner,
    PythonRunner,
    RetrievalRunner,
    ShellRunner,
    missing_secrets,
)
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore
from agentbus.tool_executor.approvers import check_groups, load_approvers
from agentbus.tool_executor.domain import ApproverDirectory, RuleError, compile_policy
from agentbus.tool_executor.handlers import ExecutorHandlers
from agentbus.tool_executor.ports import ToolRunner
from agentbus.tool_executor.service import ExecutorMetrics, FaultPoints, LoadedTool, ToolExecutorService
from agentbus.tool_executor.settings import FAULT_POINTS, ExecutorSettings
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

_log = get_logger(__name__)


def load_tools(
    tools_dir: Path, approvers_file: Path, python_runner: PythonRunner, environ: Mapping[str, str]
) -> tuple[dict[str, LoadedTool], ApproverDirectory]:
    """Load and check every tool file; a problem raises a ConfigurationError naming the file and the field."""
    definitions = load_tool_definitions(tools_dir)
    approvers = load_approvers(approvers_file)
    tools: dict[str, LoadedTool] = {}
    for name, definition in definitions.items():
        try:
            policy = compile_policy(definition)
        except RuleError as exc:
            field, _, message = str(exc).partition(": ")
            raise ToolDefinitionError(f"{definition.source}: field '{field}': {message}") from exc
        check_groups(definition, approvers, approvers_file)
        if definition.kind == "http" and (missing := missing_secrets(definition, environ)):
            raise ConfigurationError(
                f"{definition.source}: field '{missing[0]}': the environment variable is not set on the executor"
            )
        if definition.kind == "python":
            python_runner.register(definition)
        if definition.approval.policy != "never" and not definition.approval.approvers:
            _log.warning("tool_without_approvers", tool=name, file=str(definition.source))
        tools[name] = LoadedTool(definition, policy)
    return tools, approvers


class ToolExecutorApp(BusService):
    """The executor's consumers, plus the sweep that expires approvals and resumes unfinished executions."""

    def __init__(
        self,
        settings: ExecutorSettings,
        store: SqlApprovalStore,
        http_client: httpx.AsyncClient,
        build: BuildService,
        registry: CollectorRegistry,
        spans: SpanEmitter,
    ) -> None:
        self._store = store
        self._http_client = http_client
        self._build = build
        self._sweep_seconds = settings.expiry_sweep_seconds
        self.executor: ToolExecutorService | None = None
        self._sweeper: asyncio.Task[None] | None = None
        super().__init__(Service.TOOL_EXECUTOR, settings, self._wire, registry, spans=spans)
        self.add_health_check(lambda: self._sweeper is not None and not self._sweeper.done())

    @property
    def store(self) -> SqlApprovalStore:
        """The executor's store (approvals, ledger, audit, tickets)."""
        return self._store

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        await self._store.create_tables()
        self.executor = self._build(nc, js)
        handlers = ExecutorHandlers(self.executor)
        concurrency = self.settings.consumer_concurrency
        batch = min(self.settings.fetch_batch, concurrency)
        # Plain ACK: the ledger makes every effect idempotent on call_id (and the audit on the decision's
        # stream sequence), so a lost ack only re-delivers a message that then changes nothing.
        return [
            ConsumerRunner(
                js, spec, handler, ack_policy=AckPolicy.ACK, metrics=metrics, concurrency=concurrency, batch=batch
            )
            for spec, handler in (
                (EXECUTOR_CALLS, handlers.on_tool_call),
                (EXECUTOR_DECISIONS, handlers.on_approval_decision),
            )
        ]

    async def start(self) -> None:
        await super().start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="executor-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.executor is not None:
            await self.executor.cancel_resumed()
        await super().stop()
        if self.executor is not None:
            await self.executor.flush_marks()
        await self._http_client.aclose()
        await self._store.close()

    async def _sweep_loop(self) -> None:
        # The first sweep runs at once: after a restart it resumes what the previous process left.
        while True:
            if self.executor is not None:
                try:
                    await self.executor.sweep()
                except Exception:
                    _log.exception("sweep_failed")
            await asyncio.sleep(self._sweep_seconds)


class BuildService:
    """Builds the service once connected (its runners and publisher need the connection)."""

    def __init__(
        self,
        tools: dict[str, LoadedTool],
        approvers: ApproverDirectory,
        store: SqlApprovalStore,
        python_runner: PythonRunner,
        http_client: httpx.AsyncClient,
        metrics: ExecutorMetrics,
        spans: SpanEmitter,
        settings: ExecutorSettings,
    ) -> None:
        self._tools = tools
        self._approvers = approvers
        self._store = store
        self._python_runner = python_runner
        self._http_client = http_client
        self._metrics = metrics
        self._spans = spans
        self._settings = settings

    def __call__(self, nc: NatsClient, js: JetStreamContext) -> ToolExecutorService:
        runners: dict[str, ToolRunner] = {
            "python": self._python_runner,
            "shell": ShellRunner(),
            "http": HttpRunner(self._http_client),
            "retrieval": RetrievalRunner(nc),
        }
        return ToolExecutorService(
            self._tools,
            self._approvers,
            self._store,
            JetStreamPublisher(js),
            runners,
            self._metrics,
            self._spans,
            lease_seconds=self._settings.execution_lease_seconds,
            faults=FaultPoints(self._settings.fault_pause_at, self._settings.fault_marker_dir),
        )


def create_app(settings: ExecutorSettings) -> ToolExecutorApp:
    """Build the executor. Tool files and the approvers file load here: a bad one stops start-up."""
    if settings.fault_pause_at is not None and settings.fault_pause_at not in FAULT_POINTS:
        raise ConfigurationError(f"fault_pause_at must be one of {FAULT_POINTS}, not {settings.fault_pause_at!r}")
    python_runner = PythonRunner()
    tools, approvers = load_tools(settings.tools_dir, settings.approvers_file, python_runner, os.environ)
    registry = CollectorRegistry()
    spans = SpanEmitter(Service.TOOL_EXECUTOR)
    store = SqlApprovalStore(settings.database_url)
    http_client = httpx.AsyncClient(follow_redirects=False)
    build = BuildService(
        tools, approvers, store, python_runner, http_client, ExecutorMetrics(registry), spans, settings
    )
    return ToolExecutorApp(settings, store, http_client, build, registry, spans)
