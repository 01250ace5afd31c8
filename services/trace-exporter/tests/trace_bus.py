"""Helpers on the span stream for the trace-exporter tests."""

from __future__ import annotations

from agentbus.contracts.registry import SPANS, TRACE_EXPORTER_SPANS
from agentbus.runtime.bootstrap import consumer_config
from nats.aio.client import Client as NatsClient


async def recreate_span_consumer(nc: NatsClient) -> None:
    """Start the exporter's durable consumer again from the first stored span, as if no ack had arrived."""
    js = nc.jetstream()
    await js.delete_consumer(SPANS.name, TRACE_EXPORTER_SPANS.durable)
    await js.add_consumer(SPANS.name, consumer_config(TRACE_EXPORTER_SPANS))


async def reset_span_stream(nc: NatsClient) -> None:
    """Forget every span so far and start the exporter's durable consumer from scratch.

    The stream is purged rather than recreated, so its sequence numbers (and the dead-letter ids derived
    from them) never repeat within a session.
    """
    await nc.jetstream().purge_stream(SPANS.name)
    await recreate_span_consumer(nc)
