"""Composition root of the workflow-orchestrator: settings in, a ready-to-serve service out."""

from __future__ import annotations

from agentbus.contracts.registry import (
    ORCHESTRATOR_ADMISSIONS,
    ORCHESTRATOR_CANCELLATIONS,
    ORCHESTRATOR_SUBMISSIONS,
    ORCHESTRATOR_TASK_EVENTS,
    ORCHESTRATOR_TIMERS,
    WORKFLOW_REPLAY,
    WORKFLOW_RUNS,
    WORKFLOWS_LIST,
    Service,
)
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.replies import ReplyServer
from agentbus.runtime.service import BusService
from agentbus.workflow_orchestrator.adapters.jetstream_publisher import JetStreamPublisher
from agentbus.workflow_orchestrator.adapters.nats_event_log import NatsEventLog
from agentbus.workflow_orchestrator.adapters.nats_kv_store import NatsKvRecordStore, NatsKvStepIndex
from agentbus.workflow_orchestrator.handlers import OrchestratorHandlers
from agentbus.workflow_orchestrator.ports import RunRecord, SlotsRecord
from agentbus.workflow_orchestrator.service import OrchestratorMetrics, OrchestratorService
from agentbus.workflow_orchestrator.settings import OrchestratorSettings
from agentbus.workflow_orchestrator.specs import WorkflowSpec, load_agent_names, load_workflow_specs
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry


class OrchestratorApp(BusService):
    """The orchestrator's consumers, and the replay and list responders for identities that may not read
    streams."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        workflows: dict[str, WorkflowSpec],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(Service.WORKFLOW_ORCHESTRATOR, settings, self._wire, registry)
        self._config = settings
        self._workflows = workflows
        self._metrics = OrchestratorMetrics(registry)
        self._replies: ReplyServer | None = None
        self.add_health_check(lambda: self._replies is not None and self._replies.serving)

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        bucket = await js.key_value(WORKFLOW_RUNS.bucket)
        service = OrchestratorService(
            NatsKvRecordStore(bucket, RunRecord),
            NatsKvRecordStore(bucket, SlotsRecord),
            NatsKvStepIndex(bucket),
            JetStreamPublisher(js),
            self._workflows,
            self._metrics,
            events=NatsEventLog(js),
        )
        handlers = OrchestratorHandlers(service)
        self._replies = ReplyServer(
            nc, Service.WORKFLOW_ORCHESTRATOR.value, concurrency=self._config.request_concurrency
        )
        await self._replies.serve(WORKFLOW_REPLAY.wildcard, handlers.on_replay_request)
        await self._replies.serve(WORKFLOWS_LIST.wildcard, handlers.on_list_request)
        # Plain ACK: every transition is idempotent (compare-and-set state, deduplicated publishes, task ids
        # the runner takes once), so a lost ack only causes a harmless redelivery.
        # The task-events consumer reads every task's events; those of tasks that are no workflow's step are
        # acked as they arrive, without a handler.
        return [
            ConsumerRunner(
                js,
                spec,
                handler,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                concurrency=self._config.consumer_concurrency,
                batch=self._config.fetch_batch,
                passes_over=handlers.passes_over_task_event if spec is ORCHESTRATOR_TASK_EVENTS else None,
            )
            for spec, handler in (
                (ORCHESTRATOR_SUBMISSIONS, handlers.on_workflow_submitted),
                (ORCHESTRATOR_CANCELLATIONS, handlers.on_workflow_cancel_requested),
                (ORCHESTRATOR_TASK_EVENTS, handlers.on_task_event),
                (ORCHESTRATOR_TIMERS, handlers.on_timer),
                (ORCHESTRATOR_ADMISSIONS, handlers.on_admission),
            )
        ]

    async def stop(self) -> None:
        if self._replies is not None:
            await self._replies.stop(self._config.drain_timeout_seconds)
        await super().stop()


def create_app(settings: OrchestratorSettings) -> OrchestratorApp:
    """Build the orchestrator. Workflows load here, so a bad workflow file stops start-up naming it."""
    agents = load_agent_names(settings.agents_dir)
    workflows = load_workflow_specs(settings.workflows_dir, agents)
    return OrchestratorApp(settings, workflows, CollectorRegistry())
