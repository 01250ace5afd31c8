"""The export use case: batch spans, claim them in the shared ledger, export what this replica claimed, record
it as exported, then release the callers.

Callers (one per delivered span message) await `export_all(spans)`, the spans the message carries (one, or a
`SpanBatch` of them); it returns once every one of them is safely exported
(by this replica, or by any replica before), so the message is acked only then. While the backend is down the
current batch is retried with exponential backoff capped at `max_backoff_seconds`, and every caller keeps
waiting: nothing is acked, the consumer stops pulling once its in-flight limit is reached, and the spans wait
in JetStream.

Replicas share the ledger. A span claimed by another replica (a duplicate message, or a redelivery while
the first holder still works on it) is not exported here: its caller waits, and the span is looked at again
every `claim_recheck_seconds` until the other replica recorded it exported (then it is acked) or its claim
lapsed (then this replica takes it). Claims are renewed before every retry; one whose lease lapsed during
an outage and was taken by another replica is never exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from agentbus.contracts.spans import SpanRecorded
from agentbus.runtime.logging import get_logger
from agentbus.trace_exporter.domain import ExportSpan, Redactor, TraceDirectory, to_export_span
from agentbus.trace_exporter.ports import BackendUnavailable, ExportLedger, SpanKey, SpansRejected, TraceSink
from prometheus_client import CollectorRegistry, Counter, Gauge

_log = get_logger(__name__)
_T = TypeVar("_T")

_Pending = tuple[SpanRecorded, asyncio.Future[None]]
_LEDGER_PRUNE_INTERVAL_SECONDS = 3600.0
_RELEASE_TIMEOUT_SECONDS = 5.0


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
        self.claimed_elsewhere = Counter(
            "agentbus_trace_spans_claimed_elsewhere_total",
            "Times a span was found claimed by another exporter replica and waited for.",
            registry=registry,
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
    claim_lease_seconds: float = 60.0
    """How long a claim on a span lasts unless renewed; it must outlast one export request."""
    claim_recheck_seconds: float = 1.0
    """How often a span claimed by another replica is looked at again."""


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
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._held: set[SpanKey] = set()
        self._deferred: dict[asyncio.TimerHandle, list[_Pending]] = {}
        self._last_prune = 0.0
        self.backend_up = True

    async def start(self) -> None:
        """Open the ledger and start the batching loop."""
        await self._ledger.open()
        self._metrics.backend_up.labels(self._sink.name).set(1)
        self._task = asyncio.create_task(self._run(), name="trace-export")

    async def stop(self) -> None:
        """Stop exporting. Spans still waiting stay unacked and are redelivered later; this replica's claims
        on spans it did not export are released, so another replica may take them at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle, items in self._deferred.items():
            handle.cancel()
            self._queue.extend(items)
        self._deferred.clear()
        while self._queue:
            _, waiter = self._queue.popleft()
            waiter.cancel()
        if self._held:
            try:
                await asyncio.wait_for(self._ledger.release(self._held), _RELEASE_TIMEOUT_SECONDS)
            except Exception as exc:  # their leases lapse on their own
                _log.warning("trace_ledger_release_failed", spans=len(self._held), error=repr(exc))
            self._held.clear()
        await self._sink.close()
        await self._ledger.close()

    async def export(self, span: SpanRecorded) -> None:
        """Return once `span` is exported (now or before); raise SpanRejected if the backend refuses it for good."""
        await self.export_all([span])

    async def export_all(self, spans: Sequence[SpanRecorded]) -> None:
        """Return once every span of one message is exported (now or before).

        Raise SpanRejected, naming each refused span, once the others are exported, if the backend refuses
        some for good; raise the first other failure once every span is settled.
        """
        if self._task is None or self._task.done():
            raise RuntimeError("the exporter is not running")
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[None]] = [loop.create_future() for _ in spans]
        was_empty = not self._queue
        self._queue.extend(zip(spans, waiters, strict=True))
        if was_empty or len(self._queue) >= self._policy.batch_size:
            self._wakeup.set()
        if len(waiters) == 1:
            await waiters[0]
            return
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        rejected = [outcome for outcome in outcomes if isinstance(outcome, SpanRejected)]
        failure = next((o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, SpanRejected)), None)
        if failure is not None:
            raise failure
        if rejected:
            raise SpanRejected("; ".join(str(reason) for reason in rejected))

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
                except asyncio.CancelledError:
                    # Stopping mid-batch: its messages stay unacked and are redelivered.
                    for _, waiter in batch:
                        waiter.cancel()
                    raise
                except Exception as exc:
                    # A bug, not an outage: fail these spans (their messages are retried later), keep running.
                    _log.exception("trace_export_batch_failed", spans=len(batch))
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(RuntimeError(f"exporting the batch failed: {exc!r}"))
            await self._maybe_prune()

    async def _flush(self, batch: list[_Pending]) -> None:
        spans: dict[SpanKey, SpanRecorded] = {}
        waiters: dict[SpanKey, list[asyncio.Future[None]]] = {}
        for span, waiter in batch:
            key = (span.trace_id, span.span_id)
            spans.setdefault(key, span)
            waiters.setdefault(key, []).append(waiter)

        lease = self._policy.claim_lease_seconds
        claims = await self._retrying("ledger claim", lambda: self._ledger.claim(spans.keys(), lease))
        self._held |= claims.mine
        self._metrics.skipped.inc(len(claims.exported))
        self._metrics.claimed_elsewhere.inc(len(claims.elsewhere))
        prepared = [
            to_export_span(span, self._directory.learn(span), self._redactor, self._environment)
            for key, span in spans.items()
            if key in claims.mine
        ]
        rejected, lost = await self._export(prepared, fresh=True) if prepared else ({}, set())
        exported = [(s.trace_id, s.span_id) for s in prepared if (s.trace_id, s.span_id) not in rejected.keys() | lost]
        # Recorded before any message is acked: a redelivery to any replica finds the span exported.
        await self._retrying("ledger write", lambda: self._ledger.record(exported))
        self._held.difference_update(exported)
        if rejected:
            await self._retrying("ledger release", lambda: self._ledger.release(rejected.keys()))
            self._held.difference_update(rejected)
        self._metrics.exported.labels(self._sink.name).inc(len(exported))
        self._metrics.rejected.inc(len(rejected))
        wait_again = claims.elsewhere | lost
        self._defer([(spans[key], waiter) for key in wait_again for waiter in waiters[key]])
        for key, key_waiters in waiters.items():
            if key in wait_again:
                continue
            for waiter in key_waiters:
                if waiter.done():
                    continue
                if key in rejected:
                    waiter.set_exception(SpanRejected(rejected[key]))
                else:
                    waiter.set_result(None)

    def _defer(self, items: list[_Pending]) -> None:
        """Look at these spans again after `claim_recheck_seconds`: another replica holds them meanwhile."""
        if not items:
            return

        def requeue() -> None:
            waiting = [(span, waiter) for span, waiter in self._deferred.pop(handle, []) if not waiter.done()]
            if waiting:
                self._queue.extend(waiting)
                self._wakeup.set()

        handle = asyncio.get_running_loop().call_later(self._policy.claim_recheck_seconds, requeue)
        self._deferred[handle] = items

    async def _export(self, spans: list[ExportSpan], *, fresh: bool) -> tuple[dict[SpanKey, str], set[SpanKey]]:
        """Export `spans` until the backend takes them. Returns the spans it refuses for good (with the reason),
        and those whose claim lapsed and went to another replica before they could be exported here."""
        delay = self._policy.first_backoff_seconds
        lost: set[SpanKey] = set()
        while True:
            if not fresh:
                keys = {(s.trace_id, s.span_id) for s in spans}
                held = await self._retrying("ledger renew", functools.partial(self._renew, keys))
                lost |= keys - held
                self._held.difference_update(keys - held)
                spans = [s for s in spans if (s.trace_id, s.span_id) in held]
                if not spans:
                    return {}, lost
            fresh = False
            try:
                await self._sink.export(spans)
            except SpansRejected as exc:
                if len(spans) == 1:
                    _log.error("span_rejected", span_id=spans[0].span_id, trace_id=spans[0].trace_id, reason=str(exc))
                    return {(spans[0].trace_id, spans[0].span_id): str(exc)}, lost
                # One bad span must not cost its batch: find it by exporting the spans one by one.
                rejected: dict[SpanKey, str] = {}
                for span in spans:
                    one_rejected, one_lost = await self._export([span], fresh=False)
                    rejected |= one_rejected
                    lost |= one_lost
                return rejected, lost
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
                return {}, lost

    async def _renew(self, keys: set[SpanKey]) -> set[SpanKey]:
        return await self._ledger.renew(keys, self._policy.claim_lease_seconds)

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
