"""Publishes outbox messages through JetStream with their idempotency id and trace context."""

from __future__ import annotations

from agentbus.contracts.registry import Header
from agentbus.tool_executor.ports import OutgoingMessage
from nats.js import JetStreamContext

PUBLISH_TIMEOUT_SECONDS = 5.0


class JetStreamPublisher:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, message: OutgoingMessage) -> None:
        headers = {Header.MSG_ID.value: message.msg_id}
        if message.traceparent:
            headers[Header.TRACEPARENT.value] = message.traceparent
        await self._js.publish(
            message.subject, message.payload.encode(), headers=headers, timeout=PUBLISH_TIMEOUT_SECONDS
        )
