"""The dead-letter path: a message given up on is kept, with its error and origin, on its own stream."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.registry import DEAD_LETTER, ConsumerSpec
from agentbus.runtime.publishing import publish_message
from nats.js import JetStreamContext

if TYPE_CHECKING:
    from agentbus.runtime.consumer import Delivery


def dead_letter_subject(spec: ConsumerSpec) -> str:
    """Where the consumer's dead letters go."""
    return DEAD_LETTER.format(stream=spec.stream, consumer=spec.durable)


async def dead_letter(js: JetStreamContext, spec: ConsumerSpec, delivery: Delivery, error: ErrorInfo) -> None:
    """Store the message and why it failed. Idempotent on (stream, sequence): a retried give-up adds nothing."""
    letter = DeadLetter(
        stream=spec.stream,
        consumer=spec.durable,
        subject=delivery.subject,
        stream_seq=delivery.stream_seq,
        deliveries=delivery.deliveries,
        error=error,
        headers=delivery.headers,
        payload=delivery.data.decode("utf-8", errors="replace"),
        payload_base64=base64.b64encode(delivery.data).decode("ascii"),
    )
    await publish_message(
        js,
        dead_letter_subject(spec),
        letter,
        msg_id=f"dead:{spec.stream}:{spec.durable}:{delivery.stream_seq}",
        trace=delivery.trace,
    )
