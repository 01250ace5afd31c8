"""Publishing contract messages through JetStream with an idempotency id and the trace context."""

from __future__ import annotations

from agentbus.contracts.registry import Header
from agentbus.runtime.tracing import TraceContext
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import BaseModel


async def publish_message(
    js: JetStreamContext,
    subject: str,
    message: BaseModel,
    *,
    msg_id: str,
    trace: TraceContext | None = None,
    timeout: float = 5.0,
) -> PubAck:
    """Publish `message` as JSON and wait for the stream's ack.

    `msg_id` goes into `Nats-Msg-Id`, so publishing the same effect again within the stream's duplicate
    window is dropped by the server (`duplicate=True` on the ack): every effect is safe to repeat.
    """
    headers = {Header.MSG_ID.value: msg_id}
    if trace is not None:
        headers[Header.TRACEPARENT.value] = trace.traceparent
    return await js.publish(subject, message.model_dump_json().encode(), timeout=timeout, headers=headers)
