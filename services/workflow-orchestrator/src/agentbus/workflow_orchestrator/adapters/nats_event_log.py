"""A run's stored events, read from its subject in the workflow-events stream."""

from __future__ import annotations

from agentbus.contracts.registry import WORKFLOW_EVENT, WORKFLOW_EVENTS
from agentbus.contracts.workflows import WORKFLOW_EVENT_ADAPTER, WorkflowEventKind
from agentbus.runtime.event_log import SubjectEventLog
from nats.js import JetStreamContext


class NatsEventLog:
    def __init__(self, js: JetStreamContext) -> None:
        self._log = SubjectEventLog(js, WORKFLOW_EVENTS.name, WORKFLOW_EVENT_ADAPTER)

    async def events(self, tenant: str, run_id: str, from_seq: int, limit: int) -> tuple[list[WorkflowEventKind], bool]:
        return await self._log.read(WORKFLOW_EVENT.format(tenant=tenant, run_id=run_id), from_seq, limit)
