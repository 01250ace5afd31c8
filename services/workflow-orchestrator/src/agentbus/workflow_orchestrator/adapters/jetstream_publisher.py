"""Publishes outbox items through JetStream, deduplicated by their msg id."""

from __future__ import annotations

from agentbus.contracts.registry import Header
from agentbus.runtime.errors import DependencyUnavailableError
from agentbus.workflow_orchestrator.ports import OutboxItem
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError


class JetStreamPublisher:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, item: OutboxItem) -> None:
        headers = {Header.MSG_ID.value: item.msg_id, **item.headers}
        if item.traceparent:
            headers[Header.TRACEPARENT.value] = item.traceparent
        try:
            await self._js.publish(item.subject, item.payload.encode(), headers=headers, timeout=5.0)
        except (NoStreamResponseError, ServiceUnavailableError) as exc:
            raise DependencyUnavailableError(f"no stream took {item.subject}: {exc!r}") from exc
