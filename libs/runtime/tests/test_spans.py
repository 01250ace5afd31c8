"""Span emission against a real nats-server: what is published, what is dropped, and that nothing blocks."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from agentbus.contracts.registry import SPAN, SPANS, Header
from agentbus.contracts.spans import SpanRecorded, spans_in
from agentbus.runtime.bootstrap import stream_config
from agentbus.runtime.consumer import ConsumerRunner
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.runtime.settings import ServiceSettings
from agentbus.runtime.spans import (
    SPANS_DROPPED_METRIC,
    NullSpanEmitter,
    SpanAttribute,
    SpanEmitter,
    _Encoded,
    _messages,
    span_msg_id,
)
from agentbus.runtime.tracing import TraceContext
from agentbus.testing import running_nats_server
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def _service_name() -> str:
    # One subject per test, so tests sharing the session's SPANS stream never read each other's spans.
    return f"test-{uuid.uuid4().hex[:10]}"


async def _read_spans(js: JetStreamContext, service: str, count: int) -> list[Msg]:
    sub = await js.subscribe(SPAN.format(service=service), ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=10) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def _stored_count(js: JetStreamContext, service: str) -> int:
    """Messages stored for this service: one per span, or one per batch of spans."""
    info = await js.stream_info(SPANS.name, subjects_filter=SPAN.format(service=service))
    return sum((info.state.subjects or {}).values())


async def _stored_spans(js: JetStreamContext, service: str) -> list[SpanRecorded]:
    messages = await _read_spans(js, service, await _stored_count(js, service))
    return [span for msg in messages for span in spans_in(msg.data)]


async def test_a_recorded_span_is_published_with_its_trace_headers_and_fields(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    service = _service_name()
    js = nats_client.jetstream()
    emitter = SpanEmitter(service)
    root = TraceContext.new()
    ctx = root.child()
    await emitter.start(js)
    emitter.record(
        name="generate",
        kind="generation",
        trace=ctx,
        parent_span_id=root.span_id,
        start=T0,
        end=T0 + timedelta(milliseconds=250),
        task_id="task-1",
        tenant="acme",
        attributes={SpanAttribute.MODEL: "scripted", SpanAttribute.INPUT_TOKENS: 12},
    )
    await emitter.stop()

    [msg] = await _read_spans(js, service, 1)
    event = SpanRecorded.model_validate_json(msg.data)
    assert (event.trace_id, event.span_id, event.parent_span_id) == (root.trace_id, ctx.span_id, root.span_id)
    assert (event.name, event.kind, event.service, event.task_id, event.tenant) == (
        "generate",
        "generation",
        service,
        "task-1",
        "acme",
    )
    assert event.end - event.start == timedelta(milliseconds=250)
    assert event.attributes == {"gen_ai.request.model": "scripted", "gen_ai.usage.input_tokens": 12}
    assert msg.headers is not None
    assert msg.headers[Header.MSG_ID.value] == span_msg_id(ctx.span_id)
    assert TraceContext.parse(msg.headers[Header.TRACEPARENT.value]) == ctx
    assert (emitter.published, emitter.dropped) == (1, 0)


async def test_the_span_context_records_attributes_and_marks_an_exception_as_error(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    service = _service_name()
    js = nats_client.jetstream()
    emitter = SpanEmitter(service)
    await emitter.start(js)
    root = TraceContext.new()
    with emitter.span("step", "agent_step", root, parent_span_id=None, attributes={"step": 1}) as span:
        span.set(SpanAttribute.OUTPUT, "done")
    failing = root.child()
    with (
        pytest.raises(RuntimeError, match="tool crashed"),
        emitter.span("call", "tool", failing, parent_span_id=root.span_id),
    ):
        raise RuntimeError("tool crashed")
    denied = root.child()
    with emitter.span("approval", "approval_wait", denied, parent_span_id=root.span_id) as span:
        span.fail("denied by alice")
    await emitter.stop()

    events = {e.span_id: e for e in await _stored_spans(js, service)}
    assert len(events) == 3
    assert events[root.span_id].status == "ok"
    assert events[root.span_id].attributes == {"step": 1, "langfuse.observation.output": "done"}
    assert events[root.span_id].start <= events[root.span_id].end
    assert events[failing.span_id].status == "error"
    assert events[failing.span_id].status_message == "RuntimeError: tool crashed"
    assert events[failing.span_id].parent_span_id == root.span_id
    assert (events[denied.span_id].status, events[denied.span_id].status_message) == ("error", "denied by alice")


async def test_a_full_buffer_drops_and_counts_instead_of_blocking(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    service = _service_name()
    registry = CollectorRegistry()
    emitter = SpanEmitter(service, capacity=3, registry=registry)
    trace = TraceContext.new()
    # Not started yet: the buffer fills, then spans are dropped, and record() never raises.
    for _ in range(5):
        emitter.record(name="s", kind="tool", trace=trace.child(), parent_span_id=None, start=T0, end=T0)
    assert emitter.dropped == 2
    assert registry.get_sample_value(SPANS_DROPPED_METRIC, {"service": service}) == 2

    js = nats_client.jetstream()
    await emitter.start(js)
    await emitter.stop()
    assert emitter.published == 3
    assert len(await _stored_spans(js, service)) == 3


async def test_an_invalid_span_is_dropped_and_counted_without_losing_the_others(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    service = _service_name()
    js = nats_client.jetstream()
    emitter = SpanEmitter(service)
    await emitter.start(js)
    trace = TraceContext.new()
    emitter.record(name="bad", kind="tool", trace=trace, parent_span_id=None, start=T0, end=T0, tenant="not a tenant")
    emitter.record(
        name="odd values",
        kind="tool",
        trace=trace.child(),
        parent_span_id=trace.span_id,
        start=T0,
        end=T0,
        attributes={"path": Path("/tmp/x"), "n": 1},
    )
    await emitter.stop()
    assert (emitter.published, emitter.dropped) == (1, 1)
    [msg] = await _read_spans(js, service, 1)
    assert SpanRecorded.model_validate_json(msg.data).attributes == {"path": "/tmp/x", "n": 1}


async def test_spans_wait_in_the_buffer_until_the_stream_accepts_them(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    # A server with no streams yet: publishes fail, the emitter keeps the spans and retries.
    with running_nats_server(tmp_path / "fresh") as server:
        nc = NatsClient()
        await nc.connect(server.url)
        try:
            js = nc.jetstream()
            service = _service_name()
            emitter = SpanEmitter(service)
            await emitter.start(js)
            trace = TraceContext.new()
            for _ in range(4):
                emitter.record(name="s", kind="retrieval", trace=trace.child(), parent_span_id=None, start=T0, end=T0)
            await asyncio.sleep(0.3)
            assert (emitter.published, emitter.buffered) == (0, 4)
            await js.add_stream(stream_config(SPANS, replicas=1))
            await emitter.stop(timeout=30)
            assert (emitter.published, emitter.dropped) == (4, 0)
            assert len(await _stored_spans(js, service)) == 4
        finally:
            await nc.close()


async def test_stop_counts_what_it_could_not_publish_as_dropped(nats_server: NatsServerProcess, tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "empty") as server:
        nc = NatsClient()
        await nc.connect(server.url)
        try:
            emitter = SpanEmitter(_service_name())
            await emitter.start(nc.jetstream())
            trace = TraceContext.new()
            for _ in range(3):
                emitter.record(name="s", kind="tool", trace=trace.child(), parent_span_id=None, start=T0, end=T0)
            await emitter.stop(timeout=0.3)
            assert (emitter.published, emitter.dropped, emitter.buffered) == (0, 3, 0)
        finally:
            await nc.close()


async def test_the_null_emitter_records_nothing() -> None:
    emitter = NullSpanEmitter()
    trace = TraceContext.new()
    with emitter.span("s", "task", trace, parent_span_id=None) as span:
        span.set("k", "v")
    emitter.record(name="s", kind="tool", trace=trace, parent_span_id=None, start=T0, end=T0)
    assert (emitter.buffered, emitter.published, emitter.dropped) == (0, 0, 0)


async def test_bus_service_starts_the_emitter_and_flushes_it_on_stop(bootstrapped_nats: NatsServerProcess) -> None:
    service = _service_name()
    emitter = SpanEmitter(service)
    trace = TraceContext.new()

    async def wiring(nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        return []

    app = BusService(service, ServiceSettings(nats_url=bootstrapped_nats.url), wiring, spans=emitter)
    await app.start()
    for _ in range(20):
        emitter.record(name="s", kind="agent_step", trace=trace.child(), parent_span_id=None, start=T0, end=T0)
    await app.stop()
    assert emitter.published == 20
    assert app.registry.get_sample_value(SPANS_DROPPED_METRIC, {"service": service}) == 0

    nc = NatsClient()
    await nc.connect(bootstrapped_nats.url)
    try:
        assert len(await _stored_spans(nc.jetstream(), service)) == 20
    finally:
        await nc.close()


async def test_spans_that_piled_up_travel_as_one_batch_whose_id_makes_a_resend_a_duplicate(
    bootstrapped_nats: NatsServerProcess, nats_client: NatsClient
) -> None:
    service = _service_name()
    js = nats_client.jetstream()
    emitter = SpanEmitter(service)
    trace = TraceContext.new()
    children = [trace.child() for _ in range(5)]
    for child in children:  # recorded before the publisher runs: they pile up in the buffer
        emitter.record(name="s", kind="tool", trace=child, parent_span_id=trace.span_id, start=T0, end=T0)
    await emitter.start(js)
    await emitter.stop()

    assert (emitter.published, emitter.dropped) == (5, 0)
    [msg] = await _read_spans(js, service, 1)
    assert [span.span_id for span in spans_in(msg.data)] == [child.span_id for child in children]
    assert msg.headers is not None
    assert msg.headers[Header.MSG_ID.value].startswith("spans:")
    again = await js.publish(msg.subject, msg.data, headers={Header.MSG_ID.value: msg.headers[Header.MSG_ID.value]})
    assert again.duplicate
    assert await _stored_count(js, service) == 1


async def test_a_batch_over_the_servers_payload_limit_is_sent_span_by_span(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    # A server that takes messages smaller than a batch of these spans, but not than one of them.
    with running_nats_server(tmp_path / "small", extra_config="max_payload: 1024\n") as server:
        nc = NatsClient()
        await nc.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(stream_config(SPANS, replicas=1))
            service = _service_name()
            emitter = SpanEmitter(service)
            trace = TraceContext.new()
            for index in range(6):
                emitter.record(
                    name=f"step {index}",
                    kind="agent_step",
                    trace=trace.child(),
                    parent_span_id=trace.span_id,
                    start=T0,
                    end=T0,
                    attributes={"note": "x" * 200},
                )
            await emitter.start(js)
            await emitter.stop(timeout=30)
            assert (emitter.published, emitter.dropped) == (6, 0)
            assert await _stored_count(js, service) == 6
            assert [span.name for span in await _stored_spans(js, service)] == [f"step {i}" for i in range(6)]
        finally:
            await nc.close()


def test_spans_are_grouped_in_order_by_count_and_by_size() -> None:
    spans = [_Encoded(b"x" * size, f"{index:016x}", f"tp-{index}") for index, size in enumerate([10, 10, 10, 50, 10])]
    by_count = _messages(spans, max_spans=2, max_bytes=1000)
    assert [message.spans for message in by_count] == [2, 2, 1]
    by_size = _messages(spans, max_spans=10, max_bytes=40)
    assert [message.spans for message in by_size] == [3, 1, 1]
    alone = by_count[-1]
    assert alone.payload == b"x" * 10
    assert alone.headers == {Header.MSG_ID.value: span_msg_id(f"{4:016x}"), Header.TRACEPARENT.value: "tp-4"}
    assert by_count[0].payload == b'{"spans":[' + b"x" * 10 + b"," + b"x" * 10 + b"]}"
    assert _messages(spans, max_spans=2)[0].headers != _messages(spans[1:], max_spans=2)[0].headers
