"""A task's stored events, read from its subject in the task-events stream."""

from __future__ import annotations

from agentbus.contracts.registry import TASK_EVENT, TASK_EVENTS
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TaskEvent
from agentbus.runtime.event_log import SubjectEventLog
from nats.js import JetStreamContext


class NatsEventLog:
    def __init__(self, js: JetStreamContext) -> None:
        self._log = SubjectEventLog(js, TASK_EVENTS.name, TASK_EVENT_ADAPTER)

    async def events(self, tenant: str, task_id: str, from_seq: int, limit: int) -> tuple[list[TaskEvent], bool]:
        return await self._log.read(TASK_EVENT.format(tenant=tenant, task_id=task_id), from_seq, limit)
