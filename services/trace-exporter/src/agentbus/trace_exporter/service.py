"""The export use case: batch spans, skip those exported before, export the rest, remember them, then release.

Callers (one per delivered span message) await `export(span)`; it returns once the span is safely exported
(or was before), so the message is acked only then. While the backend is down the current batch is retried
with exponential backoff capped at `max_backoff_seconds`, and every caller keeps waiting: nothing is acked,
the consumer stops pulling once its in-flight limit is reached, and the spans wait in JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from agentbus.contracts.spans import SpanRecorded
from agentbus.runtime.logging import get_logger
from agentbus.trace_exporter.domain import ExportSpan, Redactor, TraceDirectory, to_export_span
from agentbus.trace_exporter.ports import BackendUnavailable, ExportLedger, SpansRejected, TraceSink
from prometheus_client import CollectorRegistry, Counter, Gauge

_log = get_logger(__name__)
_T = TypeVar("_T")

SpanKey = tuple[str, str]
_LEDGER_PRUNE_INTERVAL_SECONDS = 3600.0


class SpanRejected(Exception):  # noqa: N818 - the backend's verdict on one span
    """The backend refused this span for good; its message should be dead-lettered with the reason."""


class ExporterMetrics:
    """What the exporter did: spans exported, skipped as already exported, rejected, and backend health."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.exported = Counter("agentbus_trace_spans_exported_total", "Spans exported.", ["sink"], registry=registry)
        self.skipped = Counter(
            "agentbus_trace_spans_skipped_total",
            "Redelivered spans not exported again because the ledger had them.",
            registry=registry,
        )
        self.rejected = Counter(
            "agentbus_trace_spans_rejected_total", "Spans the backend refused for good.", registry=registry
        )
        self.failures = Counter(
            "agentbus_trace_export_failures_total",
            "Failed export attempts (each is retried).",
            ["sink"],
            registry=registry,
        )
        self.backend_up = Gauge(
            "agentbus_trace_backend_up", "1 while the last export attempt succeeded.", ["sink"], registry=registry
        )


@dataclass(frozen=True)
class ExportPolicy:
    """How spans are batched and how failed exports are retried."""

    batch_size: int = 200
    flush_interval_seconds: float = 1.0
    first_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 60.0
    ledger_retention_seconds: float = 8 * 86400.0


class SpanExportService:
    """Exports span events in batches, each span once."""

    def __init__(
        self,
        sink: TraceSink,
        ledger: ExportLedger,
        redactor: Redactor,
        metrics: ExporterMetrics,
        policy: ExportPolicy | None = None,
        *,
        environment: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sink = sink
        self._ledger = ledger
        self._redactor = redactor
        self._metrics = metrics
        self._policy = policy or ExportPolicy()
        self._environment = environment
        self._sleep = sleep
        self._directory = TraceDirectory()
        self._queue: deque[tuple[SpanRecorded, asyncio.Future[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.backend_up = True

    async def start(self) -> None:
        """Open the ledger and start the batching loop."""
        await self._ledger.open()
        self._metrics.backend_up.labels(self._sink.name).set(1)
        self._task = asyncio.create_task(self._run(), name="trace-export")

    async def stop(self) -> None:
        """Stop exporting. Spans still waiting stay unacked and are redelivered later."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            _, waiter = self._queue.popleft()
            waiter.cancel()
        await self._sink.close()
        await self._ledger.close()

    async def export(self, span: SpanRecorded) -> None:
        """Return once `span` is exported (now or before); raise SpanRejected if the backend refuses it for good."""
        if self._task is None or self._task.done():
            raise RuntimeError("the exporter is not running")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((span, waiter))
        if len(self._queue) == 1 or len(self._queue) >= self._policy.batch_size:
            self._wakeup.set()
        await waiter

    # --- the batching loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the batch fill for up to flush_interval after its first span arrived.
            deadline = loop.time() + self._policy.flush_interval_seconds
            while len(self._queue) < self._policy.batch_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._policy.batch_size))]
            batch = [(span, waiter) for span, waiter in batch if not waiter.done()]
            if batch:
                try:
                    await self._flush(batch)
                except Exception as exc:
                    # A bug, not an outage: fail these spans (their messages are retried later), keep running.
                    _log.exception("trace_export_batch_failed", spans=len(batch))
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(RuntimeError(f"exporting the batch failed: {exc!r}"))
            await self._maybe_prune()

    async def _flush(self, batch: list[tuple[SpanRecorded, asyncio.Future[None]]]) -> None:
        spans: dict[SpanKey, SpanRecorded] = {}
        waiters: dict[SpanKey, list[asyncio.Future[None]]] = {}
        for span, waiter in batch:
            key = (span.trace_id, span.span_id)
            spans.setdefault(key, span)
            waiters.setdefault(key, []).append(waiter)

        done_before = await self._retrying("ledger lookup", lambda: self._ledger.exported(spans))
        self._metrics.skipped.inc(len(done_before))
        prepared = [
            to_export_span(span, self._directory.learn(span), self._redactor, self._environment)
            for key, span in spans.items()
            if key not in done_before
        ]
        rejected = await self._export(prepared) if prepared else {}
        exported = [(s.trace_id, s.span_id) for s in prepared if (s.trace_id, s.span_id) not in rejected]
        # Recorded before any message is acked: a redelivery after this point finds the span in the ledger.
        await self._retrying("ledger write", lambda: self._ledger.record(exported))
        self._metrics.exported.labels(self._sink.name).inc(len(exported))
        self._metrics.rejected.inc(len(rejected))
        for key, key_waiters in waiters.items():
            for waiter in key_waiters:
                if waiter.done():
                    continue
                if key in rejected:
                    waiter.set_exception(SpanRejected(rejected[key]))
                else:
                    waiter.set_result(None)

    async def _export(self, spans: list[ExportSpan]) -> dict[SpanKey, str]:
        """Export `spans` until the backend takes them; the spans it refuses for good, with the reason."""
        delay = self._policy.first_backoff_seconds
        while True:
            try:
                await self._sink.export(spans)
            except SpansRejected as exc:
                if len(spans) == 1:
                    _log.error("span_rejected", span_id=spans[0].span_id, trace_id=spans[0].trace_id, reason=str(exc))
                    return {(spans[0].trace_id, spans[0].span_id): str(exc)}
                # One bad span must not cost its batch: find it by exporting the spans one by one.
                rejected: dict[SpanKey, str] = {}
                for span in spans:
                    rejected |= await self._export([span])
                return rejected
            except BackendUnavailable as exc:
                wait = min(exc.retry_after_seconds or delay, self._policy.max_backoff_seconds)
                self._set_backend_up(False)
                self._metrics.failures.labels(self._sink.name).inc()
                _log.warning(
                    "trace_export_failed", sink=self._sink.name, spans=len(spans), retry_in=wait, error=str(exc)
                )
                await self._sleep(wait)
                delay = min(delay * 2, self._policy.max_backoff_seconds)
            else:
                self._set_backend_up(True)
                return {}

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        delay = self._policy.first_backoff_seconds
        while True:
            try:
                return await operation()
            except Exception as exc:  # a locked or full disk: wait for it rather than lose or repeat spans
                _log.error("trace_ledger_failed", operation=what, retry_in=delay, error=repr(exc))
                await self._sleep(delay)
                delay = min(delay * 2, self._policy.max_backoff_seconds)

    def _set_backend_up(self, up: bool) -> None:
        if up and not self.backend_up:
            _log.info("trace_backend_recovered", sink=self._sink.name)
        self.backend_up = up
        self._metrics.backend_up.labels(self._sink.name).set(1 if up else 0)

    async def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < _LEDGER_PRUNE_INTERVAL_SECONDS:
            return
        self._last_prune = now
        try:
            forgotten = await self._ledger.forget_older_than(self._policy.ledger_retention_seconds)
        except Exception as exc:  # pruning is housekeeping: try again at the next interval
            _log.warning("trace_ledger_prune_failed", error=repr(exc))
            return
        if forgotten:
            _log.info("trace_ledger_pruned", forgotten=forgotten)
