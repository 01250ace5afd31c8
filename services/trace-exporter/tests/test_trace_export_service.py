"""The export use case with fake ports: batching, skipping what was exported, retries, rejections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime

import pytest
from agentbus.contracts.spans import SpanRecorded
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.domain import ExportSpan, Redactor
from agentbus.trace_exporter.ports import SpanKey
from agentbus.trace_exporter.service import ExporterMetrics, ExportPolicy, SpanExportService, SpanRejected
from prometheus_client import CollectorRegistry
from trace_fakes import FakeLedger, FakeSink, RecordingSleep

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def _spans(count: int, name: str = "step") -> list[SpanRecorded]:
    trace = TraceContext.new()
    return [
        SpanRecorded(
            trace_id=trace.trace_id,
            span_id=trace.child().span_id,
            name=name,
            kind="agent_step",
            service="agent-runner",
            start=T0,
            end=T0,
        )
        for _ in range(count)
    ]


class Harness:
    def __init__(self, sink: FakeSink, policy: ExportPolicy) -> None:
        self.sink = sink
        self.ledger = FakeLedger()
        self.sleep = RecordingSleep()
        self.registry = CollectorRegistry()
        self.service = SpanExportService(
            sink, self.ledger, Redactor([], 1000), ExporterMetrics(self.registry), policy, sleep=self.sleep
        )

    async def export_all(self, spans: list[SpanRecorded]) -> list[BaseException | None]:
        return await asyncio.gather(*(self.service.export(s) for s in spans), return_exceptions=True)


QUICK = ExportPolicy(batch_size=4, flush_interval_seconds=0.01, claim_recheck_seconds=0.01)


def _key(span: SpanRecorded) -> SpanKey:
    return span.trace_id, span.span_id


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    sink, policy = getattr(request, "param", (FakeSink(), QUICK))
    h = Harness(sink, policy)
    await h.service.start()
    yield h
    await h.service.stop()


async def test_spans_are_exported_in_batches_of_at_most_batch_size(harness: Harness) -> None:
    results = await harness.export_all(_spans(10))
    assert results == [None] * 10
    assert [len(b) for b in harness.sink.batches] == [4, 4, 2]
    assert len(harness.ledger.ids) == 10


async def test_a_span_exported_before_is_not_exported_again(harness: Harness) -> None:
    spans = _spans(3)
    await harness.export_all(spans)
    await harness.export_all([spans[0], spans[0], spans[2]])
    assert len(harness.sink.exported) == 3
    assert harness.registry.get_sample_value("agentbus_trace_spans_skipped_total") == 2


async def test_the_same_span_twice_in_one_batch_is_exported_once(harness: Harness) -> None:
    [span] = _spans(1)
    assert await harness.export_all([span, span]) == [None, None]
    assert len(harness.sink.exported) == 1


@pytest.mark.parametrize(
    "harness",
    [
        (
            FakeSink(outages=12),
            ExportPolicy(
                batch_size=5, flush_interval_seconds=0.01, first_backoff_seconds=0.5, max_backoff_seconds=60.0
            ),
        )
    ],
    indirect=True,
)
async def test_an_outage_is_retried_with_backoff_capped_at_the_maximum(harness: Harness) -> None:
    assert await harness.export_all(_spans(5)) == [None] * 5
    assert harness.sleep.delays == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    assert len(harness.sink.exported) == 5
    assert harness.registry.get_sample_value("agentbus_trace_export_failures_total", {"sink": "fake"}) == 12
    assert harness.registry.get_sample_value("agentbus_trace_backend_up", {"sink": "fake"}) == 1


@pytest.mark.parametrize(
    "harness",
    [(FakeSink(outages=2, retry_after=7.0), ExportPolicy(flush_interval_seconds=0.01, max_backoff_seconds=5.0))],
    indirect=True,
)
async def test_the_backends_retry_after_is_honoured_up_to_the_cap(harness: Harness) -> None:
    await harness.export_all(_spans(1))
    assert harness.sleep.delays == [5.0, 5.0]


async def test_nothing_is_released_while_the_backend_is_down(harness: Harness) -> None:
    harness.sink.outages = 10**9
    pending = asyncio.gather(*(harness.service.export(s) for s in _spans(3)))
    while harness.sink.attempts < 5:
        await asyncio.sleep(0)
    assert not pending.done()
    assert harness.ledger.ids == set()
    harness.sink.outages = 0
    assert await pending == [None] * 3
    assert len(harness.ledger.ids) == 3


@pytest.mark.parametrize(
    "harness", [(FakeSink(refuse={"poison"}), ExportPolicy(batch_size=5, flush_interval_seconds=0.05))], indirect=True
)
async def test_a_refused_span_is_found_and_rejected_without_costing_its_batch(harness: Harness) -> None:
    good = _spans(4)
    [bad] = _spans(1, name="poison")
    results = await harness.export_all([*good[:2], bad, *good[2:]])
    assert isinstance(results[2], SpanRejected)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 4
    assert {s.span_id for s in harness.sink.exported} == {s.span_id for s in good}
    assert (bad.trace_id, bad.span_id) not in harness.ledger.ids
    assert harness.ledger.released == {(bad.trace_id, bad.span_id)}, "a refused span's claim is given up"
    assert harness.registry.get_sample_value("agentbus_trace_spans_rejected_total") == 1


async def test_stop_closes_the_sink_and_the_ledger_and_refuses_new_spans(harness: Harness) -> None:
    await harness.service.stop()
    assert harness.sink.closed
    assert not harness.ledger.opened
    with pytest.raises(RuntimeError, match="not running"):
        await harness.service.export(_spans(1)[0])


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_span_another_replica_is_exporting_waits_for_it_and_is_never_exported_here(harness: Harness) -> None:
    [span] = _spans(1)
    loop = asyncio.get_running_loop()
    harness.ledger.others[_key(span)] = loop.time() + 60
    pending = asyncio.ensure_future(harness.service.export(span))
    await _until(lambda: (harness.registry.get_sample_value("agentbus_trace_spans_claimed_elsewhere_total") or 0) >= 3)
    assert not pending.done(), "the message must not be acked while the other replica may still fail"
    # The other replica records the span as exported: this replica's copy is then acked, not exported.
    harness.ledger.ids.add(_key(span))
    await asyncio.wait_for(pending, 5)
    assert harness.sink.exported == []


async def test_a_lapsed_claim_of_another_replica_is_taken_over(harness: Harness) -> None:
    [span] = _spans(1)
    harness.ledger.others[_key(span)] = asyncio.get_running_loop().time() + 0.05
    await asyncio.wait_for(harness.service.export(span), 5)
    assert [s.span_id for s in harness.sink.exported] == [span.span_id]
    assert _key(span) in harness.ledger.ids


def _taken_by_another_replica(harness: Harness) -> Callable[[Sequence[ExportSpan]], None]:
    """On the first failed attempt, the claims lapse and another replica takes them (a long outage)."""

    def take(spans: Sequence[ExportSpan]) -> None:
        if harness.sink.attempts == 1:
            for s in spans:
                harness.ledger.claims.discard((s.trace_id, s.span_id))
                harness.ledger.others[(s.trace_id, s.span_id)] = asyncio.get_running_loop().time() + 60

    return take


@pytest.mark.parametrize("harness", [(FakeSink(outages=2), QUICK)], indirect=True)
async def test_spans_whose_claim_went_to_another_replica_during_an_outage_are_not_exported_here(
    harness: Harness,
) -> None:
    harness.sink.on_attempt = _taken_by_another_replica(harness)
    spans = _spans(3)
    pending = asyncio.gather(*(harness.service.export(s) for s in spans))
    await _until(lambda: harness.ledger.renewals >= 1)
    await _until(lambda: (harness.registry.get_sample_value("agentbus_trace_spans_claimed_elsewhere_total") or 0) >= 3)
    assert not pending.done()
    harness.ledger.ids.update(_key(s) for s in spans)
    assert await asyncio.wait_for(pending, 5) == [None] * 3
    assert harness.sink.attempts == 1, "renewed before the retry, found taken, and never sent again"
    assert harness.sink.exported == []


@pytest.mark.parametrize("harness", [(FakeSink(outages=10**9), QUICK)], indirect=True)
async def test_stop_gives_up_the_claims_of_spans_it_did_not_export(harness: Harness) -> None:
    spans = _spans(2)
    pending = asyncio.gather(*(harness.service.export(s) for s in spans), return_exceptions=True)
    await _until(lambda: harness.sink.attempts >= 2)
    await harness.service.stop()
    assert harness.ledger.released == {_key(s) for s in spans}
    assert all(isinstance(r, asyncio.CancelledError) for r in await pending)
