"""Generate one LLM step and say what to publish: the result for the runner and a usage record."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agentbus.contracts.common import ErrorInfo, TokenUsage
from agentbus.contracts.llm import LlmRequest, LlmResult
from agentbus.contracts.usage import UsageRecorded
from agentbus.inference_worker.ports import EngineError, Generation, LLMEngine, TextSink
from agentbus.runtime.errors import RetryableError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ABORTED = "aborted"
"""Error code of a request whose task was cancelled (LlmAbort) while it waited or generated."""
TIMEOUT = "timeout"
"""Error code of a request that outran the worker's request timeout: the runner may fall back."""
INTERRUPTED = "interrupted"
"""Error code of a last delivery cut short by the worker's shutdown: nothing would redeliver it."""

IN_FLIGHT_METRIC = "agentbus_llm_in_flight"
REQUESTS_METRIC = "agentbus_llm_requests_total"
TOKENS_METRIC = "agentbus_llm_tokens_total"
GENERATION_SECONDS_METRIC = "agentbus_llm_generation_seconds"
QUEUE_SECONDS_METRIC = "agentbus_llm_queue_seconds"
TTFT_SECONDS_METRIC = "agentbus_llm_time_to_first_token_seconds"
TOKENS_PER_SECOND_METRIC = "agentbus_llm_output_tokens_per_second"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATE_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 1000)
_REMEMBERED_ABORTS = 10_000


@dataclass(frozen=True)
class StepOutcome:
    result: LlmResult
    usage: UsageRecorded | None

    @classmethod
    def billed(cls, result: LlmResult, usage: UsageRecorded | None) -> StepOutcome:
        """The outcome with its result naming its usage record, so the runner waits for exactly that record."""
        if usage is None:
            return cls(result, None)
        return cls(result.model_copy(update={"usage_id": usage.usage_id}), usage)


class WorkerMetrics:
    """Queue wait, time to first token, tokens/s, in-flight requests and outcomes, per model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(IN_FLIGHT_METRIC, "LLM requests generating now.", ["model"], registry=registry)
        self.requests = Counter(
            REQUESTS_METRIC,
            "LLM requests finished, by outcome (ok, error, retried, aborted, timeout, interrupted).",
            ["model", "outcome"],
            registry=registry,
        )
        self.tokens = Counter(TOKENS_METRIC, "Tokens processed, by kind.", ["model", "kind"], registry=registry)
        self.generation_seconds = Histogram(
            GENERATION_SECONDS_METRIC,
            "Engine time per request.",
            ["model"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_seconds = Histogram(
            QUEUE_SECONDS_METRIC,
            "Time a request waited in its stream before a worker took it.",
            ["model"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.ttft_seconds = Histogram(
            TTFT_SECONDS_METRIC,
            "Time from the start of generation to the first token.",
            ["model"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.tokens_per_second = Histogram(
            TOKENS_PER_SECOND_METRIC,
            "Completion tokens per second of generation, per request.",
            ["model"],
            registry=registry,
            buckets=_RATE_BUCKETS,
        )


def usage_id(request_id: str) -> str:
    """One usage record per requested step: a regenerated step (after a redelivery) is billed once."""
    return f"llm:{request_id}"


class FairShareClock:
    """Splits the accelerator's busy time among the requests that shared it.

    With continuous batching, n requests generating together each hold the GPU for 1/n of that time; a
    request's share is the integral of 1/n(t) over its lifetime. A virtual clock that advances by dt/n
    makes this O(1) per start and end, and the shares of all requests add up to the busy wall time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._virtual = 0.0
        self._last = clock()
        self._active = 0

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            self._virtual += (now - self._last) / self._active
        self._last = now

    def enter(self) -> float:
        """A request starts; keep the returned mark for `leave`."""
        self._advance()
        self._active += 1
        return self._virtual

    def leave(self, mark: float) -> float:
        """The request that entered at `mark` ends: its share of the accelerator's time, in seconds."""
        self._advance()
        self._active -= 1
        return self._virtual - mark


class InferenceService:
    """Runs requests on the engine with a timeout, lets cancelled tasks abort them, and meters them."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: WorkerMetrics,
        *,
        request_timeout_seconds: float = 300.0,
        node_class: str | None = None,
        meter_gpu: bool = False,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._timeout = request_timeout_seconds
        self._node_class = node_class
        self._meter_gpu = meter_gpu
        self._gpu_clock = FairShareClock()
        self._in_flight: dict[str, asyncio.Task[Generation]] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()

    def healthy(self) -> bool:
        return self._engine.healthy()

    @property
    def in_flight(self) -> int:
        """Requests generating now."""
        return len(self._in_flight)

    def abort(self, request_id: str) -> bool:
        """Stop a request whose task was cancelled: now if it generates here, or as soon as it arrives.

        Abort notices go to every worker of the model, so each remembers recent ids: a request still
        queued when its notice came is answered `aborted` without generating. True if it was generating.
        """
        self._aborted[request_id] = None
        self._aborted.move_to_end(request_id)
        while len(self._aborted) > _REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)
        task = self._in_flight.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def generate(
        self,
        request: LlmRequest,
        *,
        final_attempt: bool,
        queued_seconds: float = 0.0,
        on_text: TextSink | None = None,
    ) -> StepOutcome:
        """Run the engine within the request timeout.

        A retryable engine error is raised for redelivery unless this is the final attempt; then, like a
        permanent error, it becomes an error result so the run can fail or fall back cleanly. A timeout
        is an error result at once (`timeout`): the runner's fallback is faster than a redelivery.
        """
        model = request.model
        self._metrics.queue_seconds.labels(model).observe(queued_seconds)
        if request.request_id in self._aborted:
            self._metrics.requests.labels(model, ABORTED).inc()
            return StepOutcome(self._error_result(request, ABORTED, "the task was cancelled", queued_seconds), None)
        self._metrics.in_flight.labels(model).inc()
        gpu_mark = self._gpu_clock.enter()
        started = time.perf_counter()
        generation_call = (
            self._engine.generate(request, on_text) if on_text is not None else self._engine.generate(request)
        )
        task = asyncio.create_task(generation_call, name=f"generate:{request.request_id}")
        self._in_flight[request.request_id] = task
        try:
            async with asyncio.timeout(self._timeout):
                generation = await task
        except TimeoutError:
            return self._failed(request, TIMEOUT, f"no answer within {self._timeout:g} s", queued_seconds, gpu_mark)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and request.request_id in self._aborted and not (current and current.cancelling()):
                return self._failed(request, ABORTED, "the task was cancelled", queued_seconds, gpu_mark)
            self._gpu_clock.leave(gpu_mark)
            raise
        except EngineError as exc:
            if exc.retryable and not final_attempt:
                self._gpu_clock.leave(gpu_mark)
                self._metrics.requests.labels(model, "retried").inc()
                raise RetryableError(f"{exc.code}: {exc.message}") from exc
            return self._failed(request, exc.code, exc.message, queued_seconds, gpu_mark, outcome="error")
        finally:
            self._in_flight.pop(request.request_id, None)
            self._metrics.in_flight.labels(model).dec()
        elapsed = time.perf_counter() - started
        gpu_seconds = self._gpu_clock.leave(gpu_mark)
        self._observe(request, generation, elapsed)
        result = LlmResult(
            request_id=request.request_id,
            task_id=request.task_id,
            tenant=request.tenant,
            model=model,
            step=request.step,
            message=generation.message,
            finish_reason=generation.finish_reason,
            usage=generation.usage,
            latency_ms=elapsed * 1000,
            queue_ms=queued_seconds * 1000,
            ttft_ms=generation.first_token_seconds * 1000 if generation.first_token_seconds is not None else None,
            gpu_seconds=gpu_seconds if self._meter_gpu else 0.0,
            node_class=self._node_class,
        )
        return StepOutcome.billed(result, self._usage(request, generation.usage, result.gpu_seconds))

    def interrupted(self, request: LlmRequest, queued_seconds: float = 0.0) -> StepOutcome:
        """The outcome of a final delivery that shutdown cut short: an error the runner can fall back on."""
        self._metrics.requests.labels(request.model, INTERRUPTED).inc()
        message = "the worker shut down while generating the last allowed attempt"
        return StepOutcome(self._error_result(request, INTERRUPTED, message, queued_seconds), None)

    def _observe(self, request: LlmRequest, generation: Generation, elapsed: float) -> None:
        model = request.model
        self._metrics.generation_seconds.labels(model).observe(elapsed)
        self._metrics.requests.labels(model, "ok").inc()
        self._metrics.tokens.labels(model, "prompt").inc(generation.usage.prompt_tokens)
        self._metrics.tokens.labels(model, "completion").inc(generation.usage.completion_tokens)
        if generation.first_token_seconds is not None:
            self._metrics.ttft_seconds.labels(model).observe(generation.first_token_seconds)
        if elapsed > 0 and generation.usage.completion_tokens:
            self._metrics.tokens_per_second.labels(model).observe(generation.usage.completion_tokens / elapsed)

    def _failed(
        self,
        request: LlmRequest,
        code: str,
        message: str,
        queued_seconds: float,
        gpu_mark: float,
        *,
        outcome: str | None = None,
    ) -> StepOutcome:
        share = self._gpu_clock.leave(gpu_mark)
        gpu_seconds = share if self._meter_gpu else 0.0
        self._metrics.requests.labels(request.model, outcome or code).inc()
        result = self._error_result(request, code, message, queued_seconds, gpu_seconds)
        # Tokens of a failed generation are unknown, but the accelerator time it held was spent.
        usage = self._usage(request, TokenUsage(), gpu_seconds) if gpu_seconds > 0 else None
        return StepOutcome.billed(result, usage)

    def _usage(self, request: LlmRequest, tokens: TokenUsage, gpu_seconds: float) -> UsageRecorded:
        record_id = usage_id(request.request_id)
        return UsageRecorded(
            usage_id=record_id,
            kind="llm",
            tenant=request.tenant,
            task_id=request.task_id,
            agent=request.agent,
            model=request.model,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            gpu_seconds=gpu_seconds,
            node_class=self._node_class,
            reservation_id=record_id,
        )

    def _error_result(
        self, request: LlmRequest, code: str, message: str, queued_seconds: float, gpu_seconds: float = 0.0
    ) -> LlmResult:
        return LlmResult(
            request_id=request.request_id,
            task_id=request.task_id,
            tenant=request.tenant,
            model=request.model,
            step=request.step,
            finish_reason="error",
            error=ErrorInfo(code=code, message=message),
            queue_ms=queued_seconds * 1000,
            gpu_seconds=gpu_seconds,
            node_class=self._node_class,
        )
