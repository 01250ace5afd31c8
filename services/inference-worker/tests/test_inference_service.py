"""The inference use case: timeouts, aborts, GPU-time shares, streaming chunks and the scripted engine's stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest
from agentbus.inference_worker.engines.scripted import ScriptedEngine
from agentbus.inference_worker.ports import Generation, TextSink
from agentbus.inference_worker.service import ABORTED, TIMEOUT, FairShareClock, InferenceService, WorkerMetrics
from agentbus.inference_worker.streaming import StreamedSoFar, TokenStream, contiguous_prefix
from prometheus_client import CollectorRegistry


def _request(request_id: str = "t.step-1", content: str = "hello there") -> LlmRequest:
    return LlmRequest(
        request_id=request_id,
        task_id="t",
        tenant="acme",
        agent="a",
        model="m",
        step=1,
        messages=[ChatMessage(role="user", content=content)],
    )


class SlowEngine:
    """Generates after `seconds`; records cancellations."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.cancelled = 0
        self.calls = 0

    def healthy(self) -> bool:
        return True

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        self.calls += 1
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Generation(
            message=ChatMessage(role="assistant", content="done"),
            usage=TokenUsage(prompt_tokens=3, completion_tokens=1),
            finish_reason="stop",
            first_token_seconds=0.001,
        )


def _service(engine: Any, **kwargs: Any) -> InferenceService:
    return InferenceService(engine, WorkerMetrics(CollectorRegistry()), **kwargs)


async def test_a_generation_past_the_timeout_is_an_error_result_not_a_retry() -> None:
    engine = SlowEngine(seconds=30)
    outcome = await _service(engine, request_timeout_seconds=0.05).generate(_request(), final_attempt=False)
    assert outcome.result.finish_reason == "error"
    assert outcome.result.error is not None
    assert outcome.result.error.code == TIMEOUT
    assert engine.cancelled == 1
    assert outcome.usage is None


async def test_abort_cancels_the_running_generation_and_answers_aborted() -> None:
    engine = SlowEngine(seconds=30)
    service = _service(engine)
    running = asyncio.create_task(service.generate(_request("r1"), final_attempt=False))
    await engine.started.wait()
    assert service.in_flight == 1
    assert service.abort("r1") is True
    outcome = await asyncio.wait_for(running, timeout=5)
    assert outcome.result.error is not None
    assert outcome.result.error.code == ABORTED
    assert engine.cancelled == 1
    assert service.in_flight == 0


async def test_a_request_aborted_before_it_arrives_never_reaches_the_engine() -> None:
    engine = SlowEngine(seconds=0)
    service = _service(engine)
    assert service.abort("r2") is False
    outcome = await service.generate(_request("r2"), final_attempt=False)
    assert outcome.result.error is not None
    assert outcome.result.error.code == ABORTED
    assert engine.calls == 0
    other = await service.generate(_request("r3"), final_attempt=False)
    assert other.result.error is None


async def test_cancelling_the_caller_is_not_mistaken_for_an_abort() -> None:
    engine = SlowEngine(seconds=30)
    service = _service(engine)
    running = asyncio.create_task(service.generate(_request("r4"), final_attempt=False))
    await engine.started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert engine.cancelled == 1


async def test_results_and_usage_carry_gpu_share_node_class_queue_wait_and_reservation() -> None:
    engine = SlowEngine(seconds=0.01)
    service = _service(engine, node_class="nvidia-l4", meter_gpu=True)
    outcome = await service.generate(_request(), final_attempt=False, queued_seconds=0.25)
    assert outcome.result.queue_ms == pytest.approx(250)
    assert outcome.result.ttft_ms == pytest.approx(1)
    assert outcome.result.node_class == "nvidia-l4"
    assert outcome.result.gpu_seconds > 0
    assert outcome.usage is not None
    assert outcome.usage.usage_id == "llm:t.step-1"
    assert outcome.usage.reservation_id == outcome.usage.usage_id
    assert outcome.usage.gpu_seconds == outcome.result.gpu_seconds
    assert outcome.usage.node_class == "nvidia-l4"
    unmetered = await _service(SlowEngine(0)).generate(_request(), final_attempt=False)
    assert unmetered.result.gpu_seconds == 0
    assert unmetered.usage is not None
    assert unmetered.usage.gpu_seconds == 0


def test_fair_share_clock_splits_busy_time_among_concurrent_requests() -> None:
    now = [0.0]
    clock = FairShareClock(lambda: now[0])
    a = clock.enter()  # t=0: a alone
    now[0] = 2.0
    b = clock.enter()  # t=2: a and b share
    now[0] = 6.0
    a_share = clock.leave(a)  # a: 2 + 4/2 = 4
    now[0] = 7.0
    b_share = clock.leave(b)  # b: 4/2 + 1 = 3
    now[0] = 100.0  # idle time is nobody's
    c = clock.enter()
    now[0] = 101.0
    c_share = clock.leave(c)
    assert (a_share, b_share, c_share) == (4.0, 3.0, 1.0)
    assert a_share + b_share + c_share == 8.0  # the busy wall time


class _Published:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, str]] = []

    async def __call__(self, chunk: int, text: str) -> None:
        self.chunks.append((chunk, text))


async def test_token_stream_flushes_by_size_and_numbers_chunks_from_one() -> None:
    published = _Published()
    stream = TokenStream(published, flush_chars=10, flush_interval_seconds=60)
    stream.start()
    for piece in ["Hello ", "wor", "ld, ", "this is ", "streamed"]:
        stream.write(piece)
        for _ in range(20):  # let the flusher run: loop iterations, not wall time
            await asyncio.sleep(0)
    await stream.close()
    assert [n for n, _ in published.chunks] == list(range(1, len(published.chunks) + 1))
    assert "".join(text for _, text in published.chunks) == "Hello world, this is streamed"
    assert len(published.chunks) >= 2  # not one message for the whole text
    assert len(published.chunks) < 5  # not one message per piece either


async def test_token_stream_flushes_small_text_on_the_interval() -> None:
    published = _Published()
    stream = TokenStream(published, flush_chars=1000, flush_interval_seconds=0.01)
    stream.start()
    stream.write("a")
    for _ in range(200):
        if published.chunks:
            break
        await asyncio.sleep(0.01)
    assert published.chunks == [(1, "a")]
    await stream.close()


async def test_a_resumed_stream_skips_what_was_published_and_numbers_on() -> None:
    published = _Published()
    stream = TokenStream(
        published, flush_chars=1000, flush_interval_seconds=60, resume=StreamedSoFar(last_chunk=2, text="Hello wor")
    )
    stream.start()
    for piece in ["Hello ", "world", "!"]:
        stream.write(piece)
    await stream.close()
    assert published.chunks == [(3, "ld!")]


def test_contiguous_prefix_stops_at_the_first_gap() -> None:
    assert contiguous_prefix({1: "a", 2: "b", 4: "d"}) == StreamedSoFar(2, "ab")
    assert contiguous_prefix({2: "b"}) == StreamedSoFar(0, "")


async def test_scripted_engine_streams_pieces_that_join_into_the_answer() -> None:
    pieces: list[str] = []
    generation = await ScriptedEngine(token_delay_seconds=0.001).generate(_request(content="tell me"), pieces.append)
    assert len(pieces) > 3
    assert "".join(pieces) == generation.message.content
    assert generation.first_token_seconds is not None
    assert generation.first_token_seconds > 0
