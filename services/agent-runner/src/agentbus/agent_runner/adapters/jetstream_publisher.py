"""Publishes outbox items through JetStream, deduplicated by their msg id."""

from __future__ import annotations

from agentbus.agent_runner.ports import OutboxItem
from agentbus.contracts.registry import Header
from nats.js import JetStreamContext


class JetStreamPublisher:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, item: OutboxItem) -> None:
        headers = {Header.MSG_ID.value: item.msg_id}
        if item.traceparent:
            headers[Header.TRACEPARENT.value] = item.traceparent
        await self._js.publish(item.subject, item.payload.encode(), headers=headers, timeout=5.0)
