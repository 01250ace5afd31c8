"""Publishes outbox items through JetStream, deduplicated by their msg id; core notices on plain NATS."""

from __future__ import annotations

from agentbus.agent_runner.ports import OutboxItem
from agentbus.contracts.registry import Header
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext


class JetStreamPublisher:
    def __init__(self, js: JetStreamContext, nc: NatsClient | None = None) -> None:
        self._js = js
        self._nc = nc

    async def publish(self, item: OutboxItem) -> None:
        headers = {Header.MSG_ID.value: item.msg_id, **item.headers}
        if item.traceparent:
            headers[Header.TRACEPARENT.value] = item.traceparent
        if item.kind == "notice":
            if self._nc is not None:
                await self._nc.publish(item.subject, item.payload.encode(), headers=headers)
            return
        await self._js.publish(item.subject, item.payload.encode(), headers=headers, timeout=5.0)
