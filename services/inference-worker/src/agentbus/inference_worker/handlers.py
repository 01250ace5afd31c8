"""Decode an LLM request, generate (streaming tokens when asked), publish the result and the usage record."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from agentbus.contracts.llm import LlmAbort, LlmRequest
from agentbus.contracts.registry import (
    LLM_RESULT,
    TASK_EVENT,
    TASK_EVENTS,
    USAGE_RECORDED,
    ConsumerSpec,
    budget_subject,
)
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TaskToken
from agentbus.inference_worker.service import InferenceService, StepOutcome
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.inference_worker.streaming import StreamedSoFar, TokenStream, contiguous_prefix, token_msg_id
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import RetryableError, TerminalError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.publishing import publish_message
from agentbus.runtime.spans import NullSpanEmitter, SpanAttribute, SpanEmitter
from agentbus.runtime.tracing import TraceContext
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
_REPLAY_TIMEOUT_SECONDS = 5.0

_log = get_logger(__name__)


class WorkerHandlers:
    def __init__(
        self,
        js: JetStreamContext,
        service: InferenceService,
        consumer: ConsumerSpec,
        settings: WorkerSettings,
        spans: SpanEmitter | None = None,
    ) -> None:
        self._js = js
        self._service = service
        self._consumer = consumer
        self._settings = settings
        self._spans = spans or NullSpanEmitter()

    async def on_llm_request(self, delivery: Delivery) -> None:
        try:
            request = LlmRequest.model_validate_json(delivery.data)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        final_attempt = delivery.deliveries >= self._consumer.max_deliver
        queued = await self._queued_seconds(delivery)
        ctx = delivery.trace.child() if delivery.trace else TraceContext.new()
        with self._spans.span(
            f"generate {request.model}",
            "generation",
            ctx,
            parent_span_id=delivery.trace.span_id if delivery.trace else None,
            task_id=request.task_id,
            tenant=request.tenant,
            attributes={
                SpanAttribute.MODEL: request.model,
                SpanAttribute.INPUT: [m.model_dump(exclude_defaults=True) for m in request.messages],
            },
        ) as span:
            outcome = await self._generate(request, delivery, final_attempt, queued)
            result = outcome.result
            span.update(
                {
                    SpanAttribute.INPUT_TOKENS: result.usage.prompt_tokens,
                    SpanAttribute.OUTPUT_TOKENS: result.usage.completion_tokens,
                    # An output the task's guardrails check is traced by the runner once checked, never here whole.
                    SpanAttribute.OUTPUT: result.message.model_dump(exclude_defaults=True)
                    if result.message and not request.output_checked
                    else None,
                }
            )
            if result.error is not None:
                span.fail(f"{result.error.code}: {result.error.message}")
        # Deterministic ids: a request regenerated after a redelivery publishes nothing new.
        if outcome.usage is not None:
            await publish_message(
                self._js,
                budget_subject(USAGE_RECORDED, request.tenant),
                outcome.usage,
                msg_id=outcome.usage.usage_id,
                trace=ctx,
            )
        await publish_message(
            self._js,
            LLM_RESULT.format(tenant=request.tenant),
            result,
            msg_id=f"result:{request.request_id}",
            trace=ctx,
        )

    async def _generate(
        self, request: LlmRequest, delivery: Delivery, final_attempt: bool, queued: float
    ) -> StepOutcome:
        stream = await self._token_stream(request, delivery) if request.stream else None
        if stream is not None:
            stream.start()
        try:
            return await self._service.generate(
                request,
                final_attempt=final_attempt,
                queued_seconds=queued,
                on_text=stream.write if stream is not None else None,
            )
        except asyncio.CancelledError:
            # The consumer is draining (SIGTERM) and its time is up. Hand the request back now, rather than
            # leave it to ack_wait; the last allowed delivery would never come back, so it gets an error.
            current = asyncio.current_task()
            if current is None or not current.cancelling():
                raise
            current.uncancel()
            if not final_attempt:
                raise RetryableError("the worker is shutting down: handed back", delay_seconds=0) from None
            return self._service.interrupted(request, queued)
        finally:
            if stream is not None:
                await stream.close()

    async def _token_stream(self, request: LlmRequest, delivery: Delivery) -> TokenStream:
        subject = TASK_EVENT.format(tenant=request.tenant, task_id=request.task_id)
        seq = request.event_seq or 1

        async def publish(chunk: int, text: str) -> None:
            event = TaskToken(
                task_id=request.task_id, tenant=request.tenant, seq=seq, step=request.step, chunk=chunk, text=text
            )
            await publish_message(self._js, subject, event, msg_id=token_msg_id(request.request_id, chunk))

        resume = await self._streamed_so_far(request, subject, seq) if delivery.deliveries > 1 else None
        return TokenStream(
            publish,
            flush_chars=self._settings.token_flush_chars,
            flush_interval_seconds=self._settings.token_flush_interval_seconds,
            resume=resume,
        )

    async def _streamed_so_far(self, request: LlmRequest, subject: str, seq: int) -> StreamedSoFar:
        """The chunks an earlier attempt of this request published, read back from the task's event stream."""
        chunks: dict[int, str] = {}
        try:
            await self._js.get_last_msg(TASK_EVENTS.name, subject)
        except NotFoundError:
            return StreamedSoFar()
        except Exception as exc:
            _log.warning("token_replay_failed", error=repr(exc))
            return StreamedSoFar()
        try:
            sub = await self._js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        except Exception as exc:
            _log.warning("token_replay_failed", error=repr(exc))
            return StreamedSoFar()
        try:
            while True:
                try:
                    msg: Msg = await sub.next_msg(timeout=_REPLAY_TIMEOUT_SECONDS)
                except TimeoutError:
                    break
                with contextlib.suppress(ValidationError):
                    event = TASK_EVENT_ADAPTER.validate_json(msg.data)
                    if isinstance(event, TaskToken) and event.step == request.step and event.seq == seq:
                        chunks[event.chunk] = event.text
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return contiguous_prefix(chunks)

    async def _queued_seconds(self, delivery: Delivery) -> float:
        """How long the request waited in its stream: now minus the stream's timestamp of the message."""
        if delivery.stored_at is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - delivery.stored_at).total_seconds())

    async def on_llm_abort(self, msg: Msg) -> None:
        """Core NATS, best effort: a malformed notice is logged and dropped, there is nothing to redeliver."""
        try:
            abort = LlmAbort.model_validate_json(msg.data)
        except ValidationError as exc:
            _log.warning("llm_abort_malformed", subject=msg.subject, error=str(exc))
            return
        if self._service.abort(abort.request_id):
            _log.info("llm_request_aborted", request_id=abort.request_id, task_id=abort.task_id)
