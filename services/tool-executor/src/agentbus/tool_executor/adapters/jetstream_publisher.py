"""Publishes outbox messages through JetStream with their idempotency id and trace context, and notices on
core subjects."""

from __future__ import annotations

from agentbus.contracts.registry import Header
from agentbus.tool_executor.ports import OutgoingMessage
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

PUBLISH_TIMEOUT_SECONDS = 5.0


class JetStreamPublisher:
    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js

    async def publish(self, message: OutgoingMessage) -> None:
        headers = {Header.MSG_ID.value: message.msg_id}
        if message.traceparent:
            headers[Header.TRACEPARENT.value] = message.traceparent
        await self._js.publish(
            message.subject, message.payload.encode(), headers=headers, timeout=PUBLISH_TIMEOUT_SECONDS
        )

    async def notify(self, subject: str, payload: str) -> None:
        await self._nc.publish(subject, payload.encode())
