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


SEARCH = ToolSpec(
    name="search_knowledge_base",
    description="search",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 40}, "top_k": {"type": "integer"}},
        "required": ["query"],
    },
)
RENDER = ToolSpec(
    name="render_manifest",
    description="render",
    parameters={"type": "object", "properties": {"name": {}, "image": {}}, "required": ["name", "image"]},
)
APPLY = ToolSpec(
    name="kubectl_apply",
    description="apply",
    parameters={"type": "object", "properties": {"manifest": {"type": "string"}}, "required": ["manifest"]},
)


async def test_a_question_without_calls_searches_when_a_search_tool_is_offered() -> None:
    engine = ScriptedEngine()
    question = "  how long does a refund take?  "
    conversation = [ChatMessage(role="user", content=question)]
    first = await engine.generate(_request(conversation, [SEARCH]))
    assert first.message.tool_calls == [
        ToolCall(id="call_1", name="search_knowledge_base", arguments={"query": "how long does a refund take?"})
    ]
    conversation += [
        first.message,
        ChatMessage(role="tool", content="[1] Refunds arrive in 5 days.", tool_call_id="call_1", name="x"),
    ]
    final = await engine.generate(_request(conversation, [SEARCH]))
    assert final.finish_reason == "stop"
    assert "[1] Refunds arrive in 5 days." in final.message.content
    # The query is cut to the parameter's maxLength; without a search tool the input is restated.
    assert planned_calls("x" * 100, [SEARCH]) == [("search_knowledge_base", {"query": "x" * 40})]
    assert planned_calls("how long does a refund take?", [CALC, COUNT]) == []
    assert planned_calls("   ", [SEARCH]) == []
    restated = await engine.generate(_request([ChatMessage(role="user", content="hello")], [CALC]))
    assert restated.message.content == f"{SCRIPTED_MODEL_NOTICE} You asked: hello"


async def test_a_written_call_wins_over_the_search_of_the_whole_input() -> None:
    text = 'search_knowledge_base(query="refunds") please'
    assert planned_calls(text, [SEARCH]) == [("search_knowledge_base", {"query": "refunds"})]


async def test_empty_parentheses_pass_the_previous_result_on() -> None:
    engine = ScriptedEngine()
    text = 'render_manifest(name="shop", image="shop:1.4"), then kubectl_apply() it'
    assert planned_calls(text, [RENDER, APPLY]) == [
        ("render_manifest", {"name": "shop", "image": "shop:1.4"}),
        ("kubectl_apply", {}),
    ]
    manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n" + "# padding\n" * 20
    conversation = [
        ChatMessage(role="user", content=text),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_1", name="render_manifest", arguments={"name": "shop", "image": "shop:1.4"})],
        ),
        ChatMessage(role="tool", content=manifest, tool_call_id="call_1", name="render_manifest"),
    ]
    second = await engine.generate(_request(conversation, [RENDER, APPLY]))
    assert second.message.tool_calls == [ToolCall(id="call_2", name="kubectl_apply", arguments={"manifest": manifest})]
    conversation += [
        second.message,
        ChatMessage(role="tool", content="validated", tool_call_id="call_2", name="kubectl_apply"),
    ]
    final = await engine.generate(_request(conversation, [RENDER, APPLY]))
    # A long argument is quoted short, with its length: the manifest is already in the answer once.
    assert final.message.content.count("# padding") == 20
    assert "characters)) = validated" in final.message.content
    # With nothing before it, an empty call has empty arguments: the tool's validation says what is missing.
    alone = await engine.generate(_request([ChatMessage(role="user", content="kubectl_apply()")], [APPLY]))
    assert alone.message.tool_calls[0].arguments == {}


async def test_a_sessions_earlier_turns_come_before_the_input_it_answers() -> None:
    """The task's input is the last user message; tool calls of earlier turns are not this task's."""
    messages = [
        ChatMessage(role="system", content="s"),
        ChatMessage(role="user", content="calculator(1+1)"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="calculator", arguments={})]),
        ChatMessage(role="tool", content="2", tool_call_id="c1", name="calculator"),
        ChatMessage(role="assistant", content="2"),
        ChatMessage(role="user", content="calculator(3*3)"),
    ]
    generation = await ScriptedEngine().generate(_request(messages, [CALC]))
    assert generation.message.tool_calls[0].arguments == {"expression": "3*3"}
    plain = await ScriptedEngine().generate(_request([*messages[:5], ChatMessage(role="user", content="hi")], []))
    assert plain.message.content == f"{SCRIPTED_MODEL_NOTICE} You asked: hi"


async def test_a_summary_request_keeps_the_users_lines_in_order() -> None:
    transcript = "Summary so far: Earlier, User: a\nUser: b\nAssistant: ok\nUser: c"
    request = _request(
        [ChatMessage(role="system", content="summarize"), ChatMessage(role="user", content=transcript)], []
    ).model_copy(update={"purpose": "summary"})
    generation = await ScriptedEngine().generate(request)
    assert generation.message.content == "Earlier, Summary so far: Earlier, User: a; User: b; User: c"
    assert generation.finish_reason == "stop"
    assert generation.usage.completion_tokens > 0
