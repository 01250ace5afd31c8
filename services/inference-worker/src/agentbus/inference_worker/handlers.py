"""Decode an LLM request, generate, publish the result and the usage record."""

from __future__ import annotations

from agentbus.contracts.llm import LlmRequest
from agentbus.contracts.registry import LLM_RESULT, USAGE_RECORDED, ConsumerSpec
from agentbus.inference_worker.service import InferenceService
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.publishing import publish_message
from nats.js import JetStreamContext
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"


class WorkerHandlers:
    def __init__(self, js: JetStreamContext, service: InferenceService, consumer: ConsumerSpec) -> None:
        self._js = js
        self._service = service
        self._consumer = consumer

    async def on_llm_request(self, delivery: Delivery) -> None:
        try:
            request = LlmRequest.model_validate_json(delivery.data)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        outcome = await self._service.generate(request, final_attempt=delivery.deliveries >= self._consumer.max_deliver)
        # Deterministic ids: a request regenerated after a redelivery publishes nothing new.
        if outcome.usage is not None:
            await publish_message(
                self._js,
                USAGE_RECORDED.format(tenant=request.tenant),
                outcome.usage,
                msg_id=outcome.usage.usage_id,
                trace=delivery.trace.child() if delivery.trace else None,
            )
        await publish_message(
            self._js,
            LLM_RESULT.format(tenant=request.tenant),
            outcome.result,
            msg_id=f"result:{request.request_id}",
            trace=delivery.trace.child() if delivery.trace else None,
        )
