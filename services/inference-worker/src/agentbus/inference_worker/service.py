"""Generate one LLM step and say what to publish: the result for the runner and a usage record."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.llm import LlmRequest, LlmResult
from agentbus.contracts.usage import UsageRecorded
from agentbus.inference_worker.ports import EngineError, LLMEngine
from agentbus.runtime.errors import RetryableError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class StepOutcome:
    result: LlmResult
    usage: UsageRecorded | None


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge("agentbus_llm_in_flight", "LLM requests generating now.", ["model"], registry=registry)
        self.requests = Counter(
            "agentbus_llm_requests_total", "LLM requests finished, by outcome.", ["model", "outcome"], registry=registry
        )
        self.tokens = Counter(
            "agentbus_llm_tokens_total", "Tokens processed, by kind.", ["model", "kind"], registry=registry
        )
        self.generation_seconds = Histogram(
            "agentbus_llm_generation_seconds", "Engine time per request.", ["model"], registry=registry
        )


def usage_id(request_id: str) -> str:
    """One usage record per requested step: a regenerated step (after a redelivery) is billed once."""
    return f"llm:{request_id}"


class InferenceService:
    def __init__(self, engine: LLMEngine, metrics: WorkerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def healthy(self) -> bool:
        return self._engine.healthy()

    async def generate(self, request: LlmRequest, *, final_attempt: bool) -> StepOutcome:
        """Run the engine. A retryable engine error is raised for redelivery unless this is the final
        attempt; then, like a permanent error, it becomes an error result so the run can fail cleanly."""
        self._metrics.in_flight.labels(request.model).inc()
        started = time.perf_counter()
        try:
            generation = await self._engine.generate(request)
        except EngineError as exc:
            if exc.retryable and not final_attempt:
                self._metrics.requests.labels(request.model, "retried").inc()
                raise RetryableError(f"{exc.code}: {exc.message}") from exc
            self._metrics.requests.labels(request.model, "error").inc()
            return StepOutcome(self._error_result(request, exc.code, exc.message), None)
        finally:
            self._metrics.in_flight.labels(request.model).dec()
        elapsed = time.perf_counter() - started
        self._metrics.generation_seconds.labels(request.model).observe(elapsed)
        self._metrics.requests.labels(request.model, "ok").inc()
        self._metrics.tokens.labels(request.model, "prompt").inc(generation.usage.prompt_tokens)
        self._metrics.tokens.labels(request.model, "completion").inc(generation.usage.completion_tokens)
        result = LlmResult(
            request_id=request.request_id,
            task_id=request.task_id,
            tenant=request.tenant,
            model=request.model,
            step=request.step,
            message=generation.message,
            finish_reason=generation.finish_reason,
            usage=generation.usage,
            latency_ms=elapsed * 1000,
        )
        usage = UsageRecorded(
            usage_id=usage_id(request.request_id),
            kind="llm",
            tenant=request.tenant,
            task_id=request.task_id,
            agent=request.agent,
            model=request.model,
            prompt_tokens=generation.usage.prompt_tokens,
            completion_tokens=generation.usage.completion_tokens,
        )
        return StepOutcome(result, usage)

    @staticmethod
    def _error_result(request: LlmRequest, code: str, message: str) -> LlmResult:
        return LlmResult(
            request_id=request.request_id,
            task_id=request.task_id,
            tenant=request.tenant,
            model=request.model,
            step=request.step,
            finish_reason="error",
            error=ErrorInfo(code=code, message=message),
        )
