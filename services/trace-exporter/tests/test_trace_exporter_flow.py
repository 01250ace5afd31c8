"""The trace-exporter against a real nats-server and a real OTLP/HTTP receiver: shape, outage, restart."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.registry import SPAN, SPANS, TRACE_EXPORTER_SPANS, Header
from agentbus.contracts.spans import SpanBatch, SpanKind, SpanRecorded
from agentbus.runtime.deadletter import dead_letter_subject
from agentbus.runtime.spans import SpanAttribute, SpanEmitter
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.app import TraceExporterApp, create_app
from agentbus.trace_exporter.domain import REDACTED, LangfuseAttribute
from agentbus.trace_exporter.settings import TraceExporterSettings
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from trace_bus import recreate_span_consumer
from trace_otlp_receiver import OTLP_BASE_PATH, OtlpReceiver, ReceivedSpan, spans_by_id

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
PUBLIC_KEY, SECRET_KEY = "pk-lf-test", "sk-lf-test"


def _settings(nats_url: str, tmp_path: Path, **overrides: Any) -> TraceExporterSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "jsonl_path": tmp_path / "traces.jsonl",
        "ledger_path": tmp_path / "ledger.sqlite3",
        "batch_size": 20,
        "flush_interval_seconds": 0.05,
        "first_backoff_seconds": 0.05,
        "max_backoff_seconds": 0.2,
        "drain_timeout_seconds": 2.0,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return TraceExporterSettings(**values)


def _langfuse(nats_url: str, tmp_path: Path, receiver: OtlpReceiver) -> TraceExporterSettings:
    return _settings(
        nats_url,
        tmp_path,
        otlp_endpoint=receiver.endpoint,
        langfuse_public_key=PUBLIC_KEY,
        langfuse_secret_key=SECRET_KEY,
    )


async def _eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _consumer_state(js: JetStreamContext) -> tuple[int, int]:
    info = await js.consumer_info(SPANS.name, TRACE_EXPORTER_SPANS.durable)
    return info.num_pending or 0, info.num_ack_pending or 0


async def _stored_messages(js: JetStreamContext) -> int:
    """Span messages in the stream: spans that piled up in an emitter share one (a SpanBatch)."""
    return (await js.stream_info(SPANS.name)).state.messages


async def _all_acked(js: JetStreamContext) -> None:
    async def done() -> bool:
        return await _consumer_state(js) == (0, 0)

    await _eventually(done, "every span message to be acked")


async def _received(receiver: OtlpReceiver, count: int) -> list[ReceivedSpan]:
    async def enough() -> bool:
        return len(receiver.accepted()) >= count

    await _eventually(enough, f"{count} spans at the receiver")
    return receiver.accepted()


async def _emit(js: JetStreamContext, service: str, count: int, trace: TraceContext | None = None) -> list[str]:
    emitter = SpanEmitter(service)
    await emitter.start(js)
    trace = trace or TraceContext.new()
    ids = []
    for i in range(count):
        ctx = trace.child()
        ids.append(ctx.span_id)
        emitter.record(
            name=f"step {i}",
            kind="agent_step",
            trace=ctx,
            parent_span_id=trace.span_id,
            start=T0,
            end=T0 + timedelta(milliseconds=i),
            task_id="task-bulk",
            tenant="acme",
        )
    await emitter.stop()
    assert emitter.published == count
    return ids


async def _running(settings: TraceExporterSettings) -> TraceExporterApp:
    app = create_app(settings)
    await app.start()
    return app


async def test_a_task_becomes_one_connected_trace_that_langfuse_can_read(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path
) -> None:
    js = span_bus.jetstream()
    emitters = {name: SpanEmitter(name) for name in ("agent-runner", "inference-worker", "retriever", "tool-executor")}
    for emitter in emitters.values():
        await emitter.start(js)
    runner, worker = emitters["agent-runner"], emitters["inference-worker"]
    hop = await span_bus.subscribe("test.trace.hop")

    async def send(trace: TraceContext) -> TraceContext:
        """One hop over NATS: the receiving service's context is the child of what the header carries."""
        await span_bus.publish("test.trace.hop", b"{}", headers={Header.TRACEPARENT.value: trace.traceparent})
        message = await hop.next_msg(timeout=5)
        incoming = TraceContext.parse((message.headers or {}).get(Header.TRACEPARENT.value))
        assert incoming == trace
        return incoming

    def record(
        emitter: SpanEmitter, name: str, kind: SpanKind, ctx: TraceContext, parent: str | None, **attributes: Any
    ) -> None:
        emitter.record(
            name=name,
            kind=kind,
            trace=ctx,
            parent_span_id=parent,
            start=T0,
            end=T0 + timedelta(seconds=1),
            task_id="task-42",
            tenant="acme",
            attributes=attributes,
            status="error" if name == "kubectl apply" else "ok",
            status_message="exit status 1" if name == "kubectl apply" else None,
        )

    who = {SpanAttribute.AGENT: "deployer", SpanAttribute.USER: "bob"}
    secret = "sk-" + "live0123456789abcdef"
    task = TraceContext.new()
    step1 = task.child()
    record(runner, "step 1", "agent_step", step1, task.span_id, **who)
    incoming = await send(step1)
    generation1 = incoming.child()
    record(
        worker,
        "generate",
        "generation",
        generation1,
        incoming.span_id,
        **{
            SpanAttribute.MODEL: "scripted",
            SpanAttribute.INPUT_TOKENS: 12,
            SpanAttribute.OUTPUT_TOKENS: 5,
            SpanAttribute.COST_USD: 0.0012,
            SpanAttribute.INPUT: f"deploy with key {secret}",
            SpanAttribute.OUTPUT: "y" * 10_000,
        },
    )
    incoming = await send(step1)
    record(emitters["retriever"], "search", "retrieval", incoming.child(), incoming.span_id, top_k=4)
    incoming = await send(step1)
    tool = incoming.child()
    record(emitters["tool-executor"], "approval", "approval_wait", tool.child(), tool.span_id, approver="alice")
    record(
        emitters["tool-executor"], "kubectl apply", "tool", tool, incoming.span_id, **{SpanAttribute.TOOL: "kubectl"}
    )
    step2 = task.child()
    record(runner, "step 2", "agent_step", step2, task.span_id, **who)
    incoming = await send(step2)
    record(worker, "generate", "generation", incoming.child(), incoming.span_id, **{SpanAttribute.MODEL: "scripted"})
    # The task span ends last, so it reaches the exporter after all of its descendants.
    record(
        runner, "task", "task", task, None, **who, **{SpanAttribute.INPUT: "deploy it", SpanAttribute.OUTPUT: "done"}
    )
    for emitter in emitters.values():
        await emitter.stop()
    await hop.unsubscribe()

    app = await _running(_langfuse(nats_url, tmp_path, receiver))
    try:
        spans = spans_by_id(await _received(receiver, 8))
        await _all_acked(js)
    finally:
        await app.stop()

    assert len(spans) == 8
    assert {s.trace_id for s in spans.values()} == {task.trace_id}
    [root] = [s for s in spans.values() if s.parent_span_id is None]
    assert root.span_id == task.span_id
    assert all(s.parent_span_id in spans for s in spans.values() if s is not root), "orphan span"
    assert {s.service for s in spans.values()} == set(emitters)
    assert {s.scope for s in spans.values()} == {"agentbus"}

    for span in spans.values():
        attrs = span.attributes
        assert attrs[LangfuseAttribute.SESSION_ID] == attrs[LangfuseAttribute.LANGFUSE_SESSION_ID] == "task-42"
        assert attrs[LangfuseAttribute.TRACE_TAGS] == ["tenant:acme"]
    root_attrs = root.attributes
    assert root_attrs[LangfuseAttribute.TRACE_NAME] == "deployer"
    assert root_attrs[LangfuseAttribute.USER_ID] == root_attrs[LangfuseAttribute.LANGFUSE_USER_ID] == "bob"
    assert root_attrs[LangfuseAttribute.OBSERVATION_TYPE] == "agent"
    assert (root_attrs[LangfuseAttribute.TRACE_INPUT], root_attrs[LangfuseAttribute.TRACE_OUTPUT]) == (
        "deploy it",
        "done",
    )

    types = sorted(str(s.attributes[LangfuseAttribute.OBSERVATION_TYPE]) for s in spans.values())
    assert types == ["agent", "chain", "chain", "generation", "generation", "retriever", "span", "tool"]
    generation = spans[generation1.span_id].attributes
    assert generation[LangfuseAttribute.MODEL] == generation["gen_ai.request.model"] == "scripted"
    assert json.loads(generation[LangfuseAttribute.USAGE_DETAILS]) == {"input": 12, "output": 5, "total": 17}
    assert (generation["gen_ai.usage.input_tokens"], generation["gen_ai.usage.output_tokens"]) == (12, 5)
    assert json.loads(generation[LangfuseAttribute.COST_DETAILS]) == {"total": 0.0012}
    assert generation[LangfuseAttribute.OBSERVATION_INPUT] == f"deploy with key {REDACTED}"
    assert len(generation[LangfuseAttribute.OBSERVATION_OUTPUT]) < 4100
    [failed_tool] = [s for s in spans.values() if s.span.name == "kubectl apply"]
    assert failed_tool.span.status.code == 2
    assert failed_tool.span.status.message == "exit status 1"
    assert failed_tool.attributes[LangfuseAttribute.LEVEL] == "ERROR"

    posted = receiver.requests[0]
    assert posted.path == OTLP_BASE_PATH + "/v1/traces"
    assert posted.header("Content-Type") == "application/x-protobuf"
    assert posted.header("Authorization") == "Basic " + base64.b64encode(b"pk-lf-test:sk-lf-test").decode()
    # Langfuse's ingestion path for OTLP data sent as its own SDK sends it, and a gzip body it decompresses.
    assert posted.header("x-langfuse-ingestion-version") == "4"
    assert posted.header("Content-Encoding") == "gzip"
    assert posted.wire_bytes < posted.body_bytes


async def test_spans_wait_unacked_while_the_backend_is_down_and_arrive_once_when_it_returns(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path
) -> None:
    js = span_bus.jetstream()
    ids = await _emit(js, "agent-runner", 50)
    receiver.down = True
    app = await _running(_langfuse(nats_url, tmp_path, receiver))
    try:

        async def failed_a_few_times() -> bool:
            return receiver.statuses().count(503) >= 4

        await _eventually(failed_a_few_times, "repeated export attempts during the outage")
        assert receiver.accepted() == []
        stored = await _stored_messages(js)
        assert await _consumer_state(js) == (0, stored), "spans were acked while the backend was down"

        receiver.down = False
        spans = spans_by_id(await _received(receiver, 50))
        await _all_acked(js)
    finally:
        await app.stop()
    assert set(spans) == set(ids)
    statuses = receiver.statuses()
    first_success = statuses.index(200)
    assert set(statuses[:first_success]) == {503}
    assert set(statuses[first_success:]) == {200}
    assert app.registry.get_sample_value("agentbus_trace_backend_up", {"sink": "otlp"}) == 1


async def test_a_restarted_exporter_never_exports_a_redelivered_span_again(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path
) -> None:
    js = span_bus.jetstream()
    first = await _emit(js, "agent-runner", 30)
    settings = _langfuse(nats_url, tmp_path, receiver)
    app = await _running(settings)
    try:
        await _received(receiver, 30)
        await _all_acked(js)
    finally:
        await app.stop()

    # Every message comes again, as after lost acks: the restarted exporter finds them in its ledger.
    await recreate_span_consumer(span_bus)
    assert await _consumer_state(js) == (await _stored_messages(js), 0)
    restarted = await _running(settings)
    try:
        await _all_acked(js)
        later = await _emit(js, "inference-worker", 5)
        spans = spans_by_id(await _received(receiver, 35))
        await _all_acked(js)
    finally:
        await restarted.stop()
    assert set(spans) == set(first) | set(later)
    assert restarted.registry.get_sample_value("agentbus_trace_spans_skipped_total") == 30


async def test_without_an_endpoint_spans_go_to_a_jsonl_file_once_each(
    span_bus: NatsClient, nats_url: str, tmp_path: Path
) -> None:
    js = span_bus.jetstream()
    ids = await _emit(js, "retriever", 25)
    settings = _settings(nats_url, tmp_path)
    app = await _running(settings)
    try:
        await _all_acked(js)
    finally:
        await app.stop()
    records = [json.loads(line) for line in settings.jsonl_path.read_text().splitlines()]
    assert sorted(r["span_id"] for r in records) == sorted(ids)
    record = records[0]
    assert record["service"] == "retriever"
    assert record["kind"] == "agent_step"
    assert record["attributes"][LangfuseAttribute.SESSION_ID] == "task-bulk"
    assert datetime.fromisoformat(record["start"]) == T0


async def test_bad_span_messages_are_dead_lettered_with_their_reason(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path
) -> None:
    js = span_bus.jetstream()
    trace = TraceContext.new()
    poison = SpanRecorded(
        trace_id=trace.trace_id, span_id=trace.span_id, name="poison", kind="tool", service="x", start=T0, end=T0
    )
    subject = SPAN.format(service="tool-executor")
    garbage_ack = await js.publish(subject, b"{not json")
    poison_ack = await js.publish(subject, poison.model_dump_json().encode())
    # A batch with one refused span among good ones: the good ones are exported, the message dead-lettered.
    batch_spans = [poison.model_copy(update={"span_id": trace.child().span_id, "name": name}) for name in "ab"]
    batch_poison = poison.model_copy(update={"span_id": trace.child().span_id})
    batch = SpanBatch(spans=[batch_spans[0], batch_poison, batch_spans[1]])
    batch_ack = await js.publish(subject, batch.model_dump_json().encode())
    empty_batch_ack = await js.publish(subject, b'{"spans": []}')
    good = await _emit(js, "tool-executor", 3)
    receiver.reject_names = {"poison"}
    app = await _running(_langfuse(nats_url, tmp_path, receiver))
    try:
        spans = spans_by_id(await _received(receiver, 5))
        await _all_acked(js)
    finally:
        await app.stop()
    assert set(spans) == set(good) | {span.span_id for span in batch_spans}

    letters: dict[int, DeadLetter] = {}
    sub = await js.subscribe(dead_letter_subject(TRACE_EXPORTER_SPANS), ordered_consumer=True)
    try:
        while not {garbage_ack.seq, poison_ack.seq, batch_ack.seq, empty_batch_ack.seq} <= set(letters):
            letter = DeadLetter.model_validate_json((await sub.next_msg(timeout=10)).data)
            letters[letter.stream_seq] = letter
    finally:
        await sub.unsubscribe()
    assert letters[garbage_ack.seq].error.code == "schema_violation"
    assert letters[empty_batch_ack.seq].error.code == "schema_violation"
    assert letters[poison_ack.seq].error.code == "export_rejected"
    assert "400" in letters[poison_ack.seq].error.message
    assert letters[batch_ack.seq].error.code == "export_rejected"
    assert "400" in letters[batch_ack.seq].error.message


# --- two replicas sharing one ledger ---------------------------------------------------------------------


def _replica_settings(nats_url: str, tmp_path: Path, receiver: OtlpReceiver, ledger_url: str, name: str) -> Any:
    """A replica of its own: its own working folder (no SQLite file in common), the shared ledger database."""
    folder = tmp_path / name
    folder.mkdir()
    return _settings(
        nats_url,
        folder,
        otlp_endpoint=receiver.endpoint,
        langfuse_public_key=PUBLIC_KEY,
        langfuse_secret_key=SECRET_KEY,
        database_url=ledger_url,
        claim_recheck_seconds=0.05,
    )


def _counter(app: TraceExporterApp, name: str, labels: dict[str, str] | None = None) -> float:
    return app.registry.get_sample_value(name, labels or {}) or 0.0


async def _publish_copies(js: JetStreamContext, service: str, count: int, copies: int) -> list[str]:
    """`count` spans, each published `copies` times as distinct messages (as after a publisher's retry that
    JetStream did not de-duplicate): every copy is delivered, to whichever replica pulls it."""
    trace = TraceContext.new()
    ids = []
    subject = SPAN.format(service=service)
    for i in range(count):
        ctx = trace.child()
        span = SpanRecorded(
            trace_id=ctx.trace_id,
            span_id=ctx.span_id,
            parent_span_id=trace.span_id,
            name=f"step {i}",
            kind="agent_step",
            service=service,
            task_id="task-copies",
            tenant="acme",
            start=T0,
            end=T0,
        )
        ids.append(ctx.span_id)
        for _ in range(copies):
            await js.publish(subject, span.model_dump_json().encode())
    return ids


async def test_two_replicas_export_every_span_once_even_when_each_span_comes_twice(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path, ledger_url: str
) -> None:
    js = span_bus.jetstream()
    receiver.delay_seconds = 0.02  # a backend that takes its time, so both replicas hold spans at once
    replicas = [
        await _running(_replica_settings(nats_url, tmp_path, receiver, ledger_url, name)) for name in ("a", "b")
    ]
    try:
        ids = await _publish_copies(js, "agent-runner", 200, copies=2)
        spans = spans_by_id(await _received(receiver, 200))
        await _all_acked(js)
    finally:
        for app in replicas:
            await app.stop()
    assert set(spans) == set(ids)
    assert len(receiver.accepted()) == 200, "a span was exported twice"
    exported = [_counter(app, "agentbus_trace_spans_exported_total", {"sink": "otlp"}) for app in replicas]
    assert sum(exported) == 200
    assert all(n > 0 for n in exported), f"both replicas should have exported spans: {exported}"


async def test_spans_one_replica_exported_are_not_exported_again_when_redelivered_to_the_other(
    span_bus: NatsClient, receiver: OtlpReceiver, nats_url: str, tmp_path: Path, ledger_url: str
) -> None:
    js = span_bus.jetstream()
    first = await _emit(js, "agent-runner", 40)
    a = await _running(_replica_settings(nats_url, tmp_path, receiver, ledger_url, "a"))
    try:
        await _received(receiver, 40)
        await _all_acked(js)
    finally:
        await a.stop()

    # Every message comes again, as after lost acks, and this time replica b alone is there to take them.
    await recreate_span_consumer(span_bus)
    b = await _running(_replica_settings(nats_url, tmp_path, receiver, ledger_url, "b"))
    try:
        await _all_acked(js)
        later = await _emit(js, "inference-worker", 5)
        spans = spans_by_id(await _received(receiver, 45))
        await _all_acked(js)
    finally:
        await b.stop()
    assert set(spans) == set(first) | set(later)
    assert _counter(b, "agentbus_trace_spans_skipped_total") == 40
    assert _counter(b, "agentbus_trace_spans_exported_total", {"sink": "otlp"}) == 5
