"""The scripted offline engine drives a multi-step run deterministically."""

from __future__ import annotations

from typing import Any

import pytest
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall, ToolSpec
from agentbus.inference_worker.engines.scripted import SCRIPTED_MODEL_NOTICE, ScriptedEngine, planned_calls
from agentbus.inference_worker.ports import EngineError, Generation, TextSink
from agentbus.inference_worker.service import InferenceService, WorkerMetrics
from agentbus.runtime.errors import RetryableError
from prometheus_client import CollectorRegistry

CALC = ToolSpec(
    name="calculator",
    description="math",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
COUNT = ToolSpec(
    name="word_count",
    description="count",
    parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
)


def _request(messages: list[ChatMessage], tools: list[ToolSpec]) -> LlmRequest:
    return LlmRequest(
        request_id="t.step-1",
        task_id="t",
        tenant="acme",
        agent="a",
        model="scripted",
        step=1,
        messages=messages,
        tools=tools,
    )


def test_planned_calls_reads_nested_parentheses_and_json_arguments() -> None:
    text = 'First calculator((2+3)*4), then word_count({"text": "a b"}), and unknown(1).'
    assert planned_calls(text, [CALC, COUNT]) == [
        ("calculator", {"expression": "(2+3)*4"}),
        ("word_count", {"text": "a b"}),
    ]
    assert planned_calls(text, []) == []


async def test_calls_one_tool_per_step_then_answers_from_the_results() -> None:
    engine = ScriptedEngine()
    conversation = [ChatMessage(role="user", content="calculator(6*7) and word_count(a b c)")]
    first = await engine.generate(_request(conversation, [CALC, COUNT]))
    assert first.finish_reason == "tool_calls"
    assert first.message.tool_calls == [ToolCall(id="call_1", name="calculator", arguments={"expression": "6*7"})]

    conversation += [first.message, ChatMessage(role="tool", content="42", tool_call_id="call_1", name="calculator")]
    second = await engine.generate(_request(conversation, [CALC, COUNT]))
    assert second.message.tool_calls[0].name == "word_count"

    conversation += [second.message, ChatMessage(role="tool", content="3", tool_call_id="call_2", name="word_count")]
    final = await engine.generate(_request(conversation, [CALC, COUNT]))
    assert final.finish_reason == "stop"
    assert final.message.content.startswith(SCRIPTED_MODEL_NOTICE)
    assert "calculator(expression='6*7') = 42" in final.message.content
    assert "word_count(text='a b c') = 3" in final.message.content
    assert final.usage.prompt_tokens > first.usage.prompt_tokens > 0


class _FailingEngine:
    def __init__(self, retryable: bool) -> None:
        self.retryable = retryable

    def healthy(self) -> bool:
        return True

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        raise EngineError("overloaded", "busy", retryable=self.retryable)


@pytest.mark.parametrize(
    ("retryable", "final", "retried"), [(True, False, True), (True, True, False), (False, False, False)]
)
async def test_engine_errors_are_retried_until_the_final_attempt_then_reported(
    retryable: bool, final: bool, retried: bool
) -> None:
    service = InferenceService(_FailingEngine(retryable), WorkerMetrics(CollectorRegistry()))
    request = _request([ChatMessage(role="user", content="hi")], [])
    if retried:
        with pytest.raises(RetryableError):
            await service.generate(request, final_attempt=final)
        return
    outcome: Any = await service.generate(request, final_attempt=final)
    assert outcome.usage is None
    assert outcome.result.error.code == "overloaded"
    assert outcome.result.finish_reason == "error"


def test_keyword_arguments_with_literal_values_become_the_call_arguments() -> None:
    from agentbus.contracts.llm import ToolSpec
    from agentbus.inference_worker.engines.scripted import planned_calls

    ticket = ToolSpec(name="create_ticket", description="", parameters={"required": ["title"]})
    text = 'please create_ticket(title="db down", priority="high", pages=2) now'
    assert planned_calls(text, [ticket]) == [("create_ticket", {"title": "db down", "priority": "high", "pages": 2})]
    # Not keyword arguments with literals: the text becomes the first required parameter.
    assert planned_calls("create_ticket(a == b)", [ticket]) == [("create_ticket", {"title": "a == b"})]
    assert planned_calls("create_ticket(x=open('f'))", [ticket]) == [("create_ticket", {"title": "x=open('f')"})]
