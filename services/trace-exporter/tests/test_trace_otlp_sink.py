"""The OTLP/HTTP sink against a recording OTLP receiver: Langfuse's ingestion header, gzip, and its verdicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from agentbus.contracts.spans import SpanRecorded
from agentbus.runtime.spans import SpanAttribute
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.adapters.otlp import OtlpHttpTraceSink
from agentbus.trace_exporter.domain import ExportSpan, Redactor, TraceIdentity, to_export_span
from agentbus.trace_exporter.ports import BackendUnavailable, SpansRejected
from trace_otlp_receiver import OtlpReceiver, spans_by_id

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def _spans(count: int, text_chars: int = 200) -> list[ExportSpan]:
    trace = TraceContext.new()
    redactor = Redactor([], max_chars=text_chars + 100)
    spans = []
    for i in range(count):
        event = SpanRecorded(
            trace_id=trace.trace_id,
            span_id=trace.child().span_id,
            name=f"generate {i}",
            kind="generation",
            service="inference-worker",
            task_id="task-1",
            tenant="acme",
            start=T0,
            end=T0 + timedelta(seconds=1),
            attributes={SpanAttribute.MODEL: "llama-3-8b-stable", SpanAttribute.OUTPUT: f"{i} " + "y" * text_chars},
        )
        spans.append(to_export_span(event, TraceIdentity(agent="assistant"), redactor, None))
    return spans


async def test_requests_carry_langfuses_ingestion_version_and_a_gzip_body(receiver: OtlpReceiver) -> None:
    sink = OtlpHttpTraceSink(receiver.endpoint)
    spans = _spans(20)
    try:
        await sink.export(spans)
    finally:
        await sink.close()
    [request] = receiver.requests
    assert request.status == 200
    assert request.header("x-langfuse-ingestion-version") == "4"
    assert request.header("Content-Encoding") == "gzip"
    assert request.wire_bytes < request.body_bytes / 4, "repetitive span text should compress well"
    assert set(spans_by_id(receiver.accepted())) == {s.span_id for s in spans}


async def test_a_batch_of_long_spans_arrives_whole_through_gzip(receiver: OtlpReceiver) -> None:
    sink = OtlpHttpTraceSink(receiver.endpoint)
    spans = _spans(200, text_chars=4000)
    try:
        await sink.export(spans)
    finally:
        await sink.close()
    [request] = receiver.requests
    assert request.body_bytes > 512 * 1024
    assert request.header("Content-Encoding") == "gzip"
    received = spans_by_id(receiver.accepted())
    assert set(received) == {s.span_id for s in spans}
    assert received[spans[-1].span_id].span.name == "generate 199"


async def test_compression_can_be_turned_off_and_the_header_stays(receiver: OtlpReceiver) -> None:
    sink = OtlpHttpTraceSink(receiver.endpoint, compress=False)
    try:
        await sink.export(_spans(3))
    finally:
        await sink.close()
    [request] = receiver.requests
    assert request.header("Content-Encoding") is None
    assert request.wire_bytes == request.body_bytes
    assert request.header("x-langfuse-ingestion-version") == "4"
    assert len(receiver.accepted()) == 3


async def test_an_outage_is_retryable_and_a_refusal_is_not(receiver: OtlpReceiver) -> None:
    sink = OtlpHttpTraceSink(receiver.endpoint)
    try:
        receiver.down = True
        with pytest.raises(BackendUnavailable, match="503"):
            await sink.export(_spans(1))
        receiver.down = False
        refused = _spans(2)
        receiver.reject_names = {refused[0].name}
        with pytest.raises(SpansRejected, match="400"):
            await sink.export(refused)
    finally:
        await sink.close()
    assert receiver.accepted() == []
