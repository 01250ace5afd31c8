"""Span events: every service reports what it did, off the hot path, for one trace per task.

A `SpanEmitter` publishes `SpanRecorded` events on `agentbus.spans.<service>` (stream AGENTBUS_SPANS, which
keeps them 7 days or up to 1 GiB while the trace backend is down). `record()` only appends to a bounded
in-memory buffer: it never blocks, never raises and never does I/O. A background task lets spans gather for
`SPAN_LINGER_SECONDS`, then validates, serialises and publishes them through JetStream: a span alone as a
`SpanRecorded`, several as `SpanBatch` messages of up to `SPANS_PER_MESSAGE`, so for a busy service the
stream stores, and the exporter fetches and acks, one message for many spans
(`agentbus.contracts.spans.spans_in` reads both). When the buffer is full (NATS unreachable for a long time,
or a burst faster than NATS takes it) new spans are dropped and counted in
`agentbus_spans_dropped_total{service}`; a dropped span leaves a gap in its trace but never slows a handler.

Emitting spans
--------------
Build one emitter per process and hand it to `BusService(..., spans=emitter)`, which starts it once
connected and flushes it on shutdown::

    spans = SpanEmitter(Service.AGENT_RUNNER)
    app = BusService(Service.AGENT_RUNNER, settings, wiring, registry, spans=spans)

In a handler, a message whose `traceparent` parsed to `incoming` (`delivery.trace`) gets a child context;
the handler's span is recorded under it, and everything it publishes carries it, so the next hop's span is
a child of this one::

    ctx = delivery.trace.child() if delivery.trace else TraceContext.new()
    parent = delivery.trace.span_id if delivery.trace else None
    with spans.span("generate", "generation", ctx, parent_span_id=parent, task_id=..., tenant=...) as span:
        outcome = await service.generate(request)
        span.set(SpanAttribute.MODEL, request.model)
        span.set(SpanAttribute.INPUT_TOKENS, outcome.usage.prompt_tokens)
    await publish_message(js, subject, outcome.result, msg_id=..., trace=ctx)

A span whose work outlives one handler (a task, an approval wait) is recorded with `record(start=..., end=...)`
once it ends. Spans are kinds of `SpanKind`: task (the root: one per task), agent_step, generation, tool,
retrieval, approval_wait. Attribute names the trace exporter reads are in `SpanAttribute`; others are kept
as metadata. Inputs and outputs are truncated and redacted by the exporter, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, NamedTuple

import nats.errors
import nats.js.errors
from agentbus.contracts.registry import SPAN, Header
from agentbus.contracts.spans import SpanKind, SpanRecorded
from agentbus.runtime.logging import get_logger
from agentbus.runtime.tracing import TraceContext
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

__all__ = [
    "SPANS_DROPPED_METRIC",
    "SPANS_PUBLISHED_METRIC",
    "NullSpanEmitter",
    "SpanAttribute",
    "SpanEmitter",
    "SpanHandle",
    "span_msg_id",
]

_log = get_logger(__name__)

SPANS_DROPPED_METRIC = "agentbus_spans_dropped_total"
SPANS_PUBLISHED_METRIC = "agentbus_spans_published_total"

_PUBLISH_BATCH = 256
SPANS_PER_MESSAGE = 64
"""At most this many spans travel in one message (a `SpanBatch`)."""
SPAN_MESSAGE_BYTES = 256 * 1024
"""A batch closes before it would grow past this size (the spans stream takes messages up to 1 MiB)."""
SPAN_LINGER_SECONDS = 0.05
"""How long the publisher lets spans gather once the first is buffered (a full message's worth goes at once)."""
_PUBLISH_TIMEOUT_SECONDS = 5.0
_RETRY_FIRST_DELAY_SECONDS = 0.05
_RETRY_MAX_DELAY_SECONDS = 2.0
_MAX_NAME_CHARS = 200
_MAX_STATUS_MESSAGE_CHARS = 2000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SpanAttribute(StrEnum):
    """Attribute names the trace exporter maps onto Langfuse (GenAI semantic conventions where they exist)."""

    MODEL = "gen_ai.request.model"
    """Generations: the model name."""
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    """Generations: prompt tokens."""
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    """Generations: completion tokens."""
    COST_USD = "gen_ai.usage.cost"
    """Generations: the accountant's price of this call in USD (optional; set it when the cost is known)."""
    INPUT = "langfuse.observation.input"
    """What the step was given (a string, or JSON-able data). Truncated and redacted by the exporter."""
    OUTPUT = "langfuse.observation.output"
    """What the step produced. Truncated and redacted by the exporter."""
    AGENT = "agentbus.agent"
    """The agent's name: the trace is named after it. Set it on the task span (and any span that knows it)."""
    USER = "agentbus.user"
    """Who submitted the task (`submitted_by`): the trace's user."""
    TOOL = "agentbus.tool"
    """Tool spans and approval waits: the tool's name."""
    GUARDRAIL_STAGE = "agentbus.guardrail.stage"
    """Guardrail spans: the stage checked (input, tool_arguments, output)."""
    GUARDRAIL_ACTION = "agentbus.guardrail.action"
    """Guardrail spans: the strongest action of the findings (block, redact, require_approval)."""
    GUARDRAIL_POLICIES = "agentbus.guardrail.policies"
    """Guardrail spans: the policies whose checks found something."""
    GUARDRAIL_FINDINGS = "agentbus.guardrail.findings"
    """Guardrail spans: each finding as `policy/check:kind` (never the matched text)."""


def span_msg_id(span_id: str) -> str:
    """The `Nats-Msg-Id` of a span event: a re-published span is dropped by the stream's dedupe window."""
    return f"span:{span_id}"


class SpanHandle:
    """The span being timed by `SpanEmitter.span()`: add attributes, or mark it failed without raising.

    It is the context manager `span()` returns: entering starts the clock, leaving records the span.
    """

    __slots__ = (
        "_emitter",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_task_id",
        "_tenant",
        "attributes",
        "status",
        "status_message",
        "trace",
    )

    def __init__(
        self,
        emitter: SpanEmitter,
        name: str,
        kind: SpanKind,
        trace: TraceContext,
        parent_span_id: str | None,
        task_id: str | None,
        tenant: str | None,
        attributes: dict[str, Any],
    ) -> None:
        self._emitter = emitter
        self._name = name
        self._kind = kind
        self._parent = parent_span_id
        self._task_id = task_id
        self._tenant = tenant
        self._start = _EPOCH
        self.trace = trace
        self.attributes = attributes
        self.status: Literal["ok", "error"] = "ok"
        self.status_message: str | None = None

    @property
    def span_id(self) -> str:
        """This span's id: the parent id of spans recorded under it."""
        return self.trace.span_id

    def set(self, key: str, value: Any) -> None:
        """Add or replace one attribute. Values must be JSON-able (anything else is exported as its str())."""
        self.attributes[key] = value

    def update(self, attributes: dict[str, Any]) -> None:
        """Add or replace several attributes."""
        self.attributes.update(attributes)

    def fail(self, message: str) -> None:
        """Mark the span as an error (a rejected call, a denied approval) without raising."""
        self.status = "error"
        self.status_message = message

    def __enter__(self) -> SpanHandle:
        self._start = datetime.now(UTC)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # A plain class rather than @contextmanager: a generator per span would double what a span costs.
        if exc is not None:
            self.status = "error"
            self.status_message = f"{type(exc).__name__}: {exc}"
        self._emitter._append(
            (
                self._name,
                self._kind,
                self.trace,
                self._parent,
                self._start,
                datetime.now(UTC),
                self._task_id,
                self._tenant,
                self.status,
                self.status_message,
                self.attributes,
            )
        )


# What record() buffers: the raw arguments, validated and serialised later by the publisher task.
_Pending = tuple[
    str,  # name
    str,  # kind
    TraceContext,
    str | None,  # parent_span_id
    datetime,  # start
    datetime,  # end
    str | None,  # task_id
    str | None,  # tenant
    str,  # status
    str | None,  # status_message
    dict[str, Any] | None,  # attributes
]


class SpanEmitter:
    """Publishes SpanRecorded events on SPAN.format(service=...) through a bounded in-memory buffer.

    Never blocks or raises on the hot path: when the buffer is full the span is dropped and counted
    (Prometheus counter agentbus_spans_dropped_total{service}). Call `record()` and `span()` from the
    event loop's thread.
    """

    def __init__(self, service: str, *, capacity: int = 10_000, registry: CollectorRegistry | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.service = service
        self._subject = SPAN.format(service=service)
        self._capacity = capacity
        self._buffer: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._js: JetStreamContext | None = None
        self._dropped = 0
        self._published = 0
        self._in_flight = 0
        # Unregistered until a registry is given, here or by attach_metrics(): no global metric state.
        self._dropped_total = Counter(
            SPANS_DROPPED_METRIC,
            "Span events dropped: buffer full, unpublishable, or still buffered at shutdown.",
            ["service"],
            registry=None,
        )
        self._published_total = Counter(
            SPANS_PUBLISHED_METRIC, "Span events published to JetStream.", ["service"], registry=None
        )
        self._dropped_child = self._dropped_total.labels(service)
        self._published_child = self._published_total.labels(service)
        self._metrics_registries: list[CollectorRegistry] = []
        if registry is not None:
            self.attach_metrics(registry)

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Export the emitter's counters in `registry` (idempotent). `BusService` does this with its own."""
        if any(r is registry for r in self._metrics_registries):
            return
        registry.register(self._dropped_total)
        registry.register(self._published_total)
        self._metrics_registries.append(registry)

    @property
    def dropped(self) -> int:
        """Spans dropped so far (buffer full, unpublishable, or unflushed at stop)."""
        return self._dropped

    @property
    def published(self) -> int:
        """Spans the stream has acknowledged so far."""
        return self._published

    @property
    def buffered(self) -> int:
        """Spans waiting to be published."""
        return len(self._buffer) + self._in_flight

    async def start(self, js: JetStreamContext) -> None:
        """Start the background publisher task. Spans recorded before this wait in the buffer."""
        if self._task is not None:
            return
        self._js = js
        self._stopping = False
        self._task = asyncio.create_task(self._publish_loop(), name=f"spans:{self.service}")
        if self._buffer:
            self._wakeup.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is buffered (for up to `timeout` seconds), then stop. What is left is counted dropped."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wakeup.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif (error := task.exception()) is not None:
            _log.error("span_publisher_failed", service=self.service, error=repr(error))
        left = len(self._buffer) + self._in_flight
        if left:
            self._count_dropped(left)
            _log.warning("spans_dropped_at_stop", service=self.service, count=left)
        self._buffer.clear()
        self._in_flight = 0

    def record(
        self,
        *,
        name: str,
        kind: SpanKind,
        trace: TraceContext,
        parent_span_id: str | None,
        start: datetime,
        end: datetime,
        task_id: str | None = None,
        tenant: str | None = None,
        status: Literal["ok", "error"] = "ok",
        status_message: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Buffer one finished span (span_id = trace.span_id, trace_id = trace.trace_id). Never blocks or raises."""
        self._append(
            (
                name,
                kind,
                trace,
                parent_span_id,
                start,
                end,
                task_id,
                tenant,
                status,
                status_message,
                dict(attributes) if attributes else None,
            )
        )

    def _append(self, pending: _Pending) -> None:
        if len(self._buffer) >= self._capacity:
            self._count_dropped(1)
            return
        self._buffer.append(pending)
        if not self._wakeup.is_set():
            self._wakeup.set()

    def span(
        self,
        name: str,
        kind: SpanKind,
        trace: TraceContext,
        *,
        parent_span_id: str | None,
        task_id: str | None = None,
        tenant: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> SpanHandle:
        """A context manager timing its block as one span, recorded on exit; it yields the `SpanHandle`.

        An exception marks the span as an error (status_message "Type: message") and propagates.
        """
        return SpanHandle(self, name, kind, trace, parent_span_id, task_id, tenant, dict(attributes or {}))

    # --- the background publisher ------------------------------------------------------------------

    def _count_dropped(self, count: int) -> None:
        self._dropped += count
        self._dropped_child.inc(count)

    async def _publish_loop(self) -> None:
        while True:
            if not self._buffer:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._stopping and len(self._buffer) < SPANS_PER_MESSAGE:
                # Let spans gather for a moment, as OpenTelemetry's batch processor does (for seconds): a busy
                # service then sends many spans a message, and a quiet one waits only this long for its span.
                await asyncio.sleep(SPAN_LINGER_SECONDS)
            size = min(len(self._buffer), _PUBLISH_BATCH)
            batch = [self._buffer.popleft() for _ in range(size)]
            self._in_flight = size
            try:
                await self._publish_batch(batch)
            except Exception:
                # A bug must cost these spans, not every later one: the publisher keeps running.
                _log.exception("span_batch_failed", service=self.service, count=self._in_flight)
                self._count_dropped(self._in_flight)
                self._in_flight = 0

    def _encode(self, pending: _Pending) -> _Encoded | None:
        name, kind, trace, parent, start, end, task_id, tenant, status, status_message, attributes = pending
        try:
            event = SpanRecorded(
                trace_id=trace.trace_id,
                span_id=trace.span_id,
                parent_span_id=parent,
                name=name[:_MAX_NAME_CHARS] or kind,
                kind=kind,  # type: ignore[arg-type]
                service=self.service,
                task_id=task_id,
                tenant=tenant,
                start=start,
                end=end,
                status=status,  # type: ignore[arg-type]
                status_message=status_message[:_MAX_STATUS_MESSAGE_CHARS] if status_message else None,
                attributes=attributes or {},
            )
        except ValidationError as exc:
            _log.warning("span_invalid", service=self.service, name=name, error=str(exc))
            return None
        # `fallback=str`: a value that is not JSON-able is exported as its text rather than losing the span.
        return _Encoded(event.model_dump_json(fallback=str).encode(), trace.span_id, trace.traceparent)

    async def _publish_batch(self, batch: list[_Pending]) -> None:
        encoded = [span for item in batch if (span := self._encode(item)) is not None]
        self._count_dropped(len(batch) - len(encoded))
        pending = _messages(encoded)
        self._in_flight = len(encoded)
        delay = _RETRY_FIRST_DELAY_SECONDS
        while pending:
            results = await self._publish_all(pending)
            retry: list[_Message] = []
            split: list[_Message] = []
            for message, error in zip(pending, results, strict=True):
                if error is None:
                    self._published += message.spans
                    self._published_child.inc(message.spans)
                elif _is_permanent(error) and message.spans > 1:
                    # A server whose payload limit is below the batch's size: send these spans one by one, now.
                    split.extend(_messages(message.parts, max_spans=1))
                elif _is_permanent(error):
                    self._count_dropped(1)
                    _log.warning("span_unpublishable", service=self.service, error=repr(error))
                else:
                    retry.append(message)
            pending = split + retry
            self._in_flight = sum(message.spans for message in pending)
            if retry:
                # NATS unreachable or the stream missing: keep these, and let the bounded buffer absorb new ones.
                first_error = next(e for e in results if e is not None and not _is_permanent(e))
                count = sum(message.spans for message in retry)
                _log.warning("span_publish_retry", service=self.service, count=count, error=repr(first_error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_DELAY_SECONDS)

    async def _publish_all(self, messages: list[_Message]) -> list[BaseException | None]:
        """Publish every message without waiting for each ack in turn; the error of each, or None once acked."""
        assert self._js is not None
        errors: list[BaseException | None] = [None] * len(messages)
        futures: dict[asyncio.Future[PubAck], int] = {}
        for index, message in enumerate(messages):
            payload, headers = message.payload, message.headers
            try:
                # No wait_stall: it costs a timer per message, and a batch (256) stays far below the
                # client's limit of pending publishes (4000), since each batch's acks are awaited.
                future = await self._js.publish_async(self._subject, payload, headers=headers)
            except Exception as exc:  # not connected, too many unacked publishes, too large
                errors[index] = exc
            else:
                futures[future] = index
        if futures:
            done, not_acked = await asyncio.wait(futures, timeout=_PUBLISH_TIMEOUT_SECONDS)
            for future in not_acked:
                future.cancel()
                errors[futures[future]] = TimeoutError("no ack from the stream")
            for future in done:
                cancelled = future.cancelled()
                errors[futures[future]] = TimeoutError("publish cancelled") if cancelled else future.exception()
        return errors


class _Encoded(NamedTuple):
    """One span, validated and serialised."""

    payload: bytes
    span_id: str
    traceparent: str


class _Message(NamedTuple):
    """What one publish sends: a single span, or a `SpanBatch` of several."""

    payload: bytes
    headers: dict[str, str]
    parts: list[_Encoded]

    @property
    def spans(self) -> int:
        return len(self.parts)


def _messages(
    spans: list[_Encoded], *, max_spans: int = SPANS_PER_MESSAGE, max_bytes: int = SPAN_MESSAGE_BYTES
) -> list[_Message]:
    """Group spans, in order, into messages of up to `max_spans` spans and about `max_bytes` bytes.

    Spans that pile up (a busy service) travel many to a message: the stream stores, and the exporter
    fetches and acks, one message for them all. A span alone is sent as a plain `SpanRecorded`, with
    `traceparent`. A batch's `Nats-Msg-Id` comes from its spans' ids, so publishing it again is deduplicated.
    """
    messages: list[_Message] = []
    group: list[_Encoded] = []
    size = 0
    for span in spans:
        if group and (len(group) >= max_spans or size + len(span.payload) > max_bytes):
            messages.append(_message(group))
            group, size = [], 0
        group.append(span)
        size += len(span.payload) + 1
    if group:
        messages.append(_message(group))
    return messages


def _message(group: list[_Encoded]) -> _Message:
    if len(group) == 1:
        span = group[0]
        headers = {Header.MSG_ID.value: span_msg_id(span.span_id), Header.TRACEPARENT.value: span.traceparent}
        return _Message(span.payload, headers, group)
    payload = b'{"spans":[' + b",".join(span.payload for span in group) + b"]}"
    digest = hashlib.blake2b("".join(span.span_id for span in group).encode(), digest_size=16).hexdigest()
    return _Message(payload, {Header.MSG_ID.value: f"spans:{digest}"}, group)


def _is_permanent(error: BaseException) -> bool:
    """Errors a retry cannot fix: a span too large for the server, or a request the stream refuses."""
    if isinstance(error, nats.errors.MaxPayloadError):
        return True
    if isinstance(error, nats.js.errors.ServiceUnavailableError | nats.js.errors.ServerError):
        return False
    return isinstance(error, nats.js.errors.APIError)


class NullSpanEmitter(SpanEmitter):
    """A SpanEmitter that records nothing: for tests and services run without tracing."""

    def __init__(self, service: str = "none", *, capacity: int = 1, registry: CollectorRegistry | None = None) -> None:
        super().__init__(service, capacity=max(capacity, 1), registry=registry)

    async def start(self, js: JetStreamContext) -> None:
        """Nothing to start."""

    async def stop(self, timeout: float = 5.0) -> None:
        """Nothing to flush."""

    def _append(self, pending: _Pending) -> None:
        """Discard the span."""
