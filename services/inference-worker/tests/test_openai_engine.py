"""The openai engine against a local OpenAI-compatible server: streaming, tool calls, retries, timeouts, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall, ToolSpec
from agentbus.inference_worker.engines.openai import OpenAIEngine, retry_after_seconds
from agentbus.inference_worker.ports import EngineError
from agentbus.inference_worker.service import TIMEOUT, InferenceService, WorkerMetrics
from openai_test_server import OpenAITestServer, Reply, text_events
from prometheus_client import CollectorRegistry

CALC = ToolSpec(
    name="calculator",
    description="math",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)


def _request(**overrides: Any) -> LlmRequest:
    fields: dict[str, Any] = {
        "request_id": "t1.step-1",
        "task_id": "t1",
        "tenant": "acme",
        "agent": "a",
        "model": "small",
        "step": 1,
        "messages": [
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="what is 6*7?"),
            ChatMessage(
                role="assistant", tool_calls=[ToolCall(id="call_0", name="calculator", arguments={"expression": "6*7"})]
            ),
            ChatMessage(role="tool", content="42", tool_call_id="call_0", name="calculator"),
        ],
        "tools": [CALC],
        "max_tokens": 64,
    }
    fields.update(overrides)
    return LlmRequest(**fields)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    server = OpenAITestServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def engine(server: OpenAITestServer) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(
        server.base_url, api_key="sk-test", model_name="served-name", max_retries=2, backoff_seconds=0.01
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


async def test_streams_text_as_it_comes_and_reports_usage(server: OpenAITestServer, engine: OpenAIEngine) -> None:
    server.replies.append(Reply(events=text_events(["The answer ", "is ", "42."], usage=(31, 4))))
    pieces: list[str] = []
    generation = await engine.generate(_request(), pieces.append)
    assert pieces == ["The answer ", "is ", "42."]
    assert generation.message.content == "The answer is 42."
    assert generation.finish_reason == "stop"
    assert (generation.usage.prompt_tokens, generation.usage.completion_tokens) == (31, 4)
    assert generation.first_token_seconds is not None

    sent = server.requests[0]
    assert sent["model"] == "served-name"
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 64
    assert sent["tools"][0]["function"]["name"] == "calculator"
    assistant = sent["messages"][2]
    assert assistant["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "6*7"}'}
    assert sent["messages"][3] == {"role": "tool", "content": "42", "tool_call_id": "call_0", "name": "calculator"}
    assert server.request_headers[0]["authorization"] == "Bearer sk-test"


async def test_assembles_tool_calls_streamed_in_fragments(server: OpenAITestServer, engine: OpenAIEngine) -> None:
    def call_delta(**fields: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [fields]}}]}

    events = [
        call_delta(index=0, id="call_a", type="function", function={"name": "calculator", "arguments": ""}),
        call_delta(index=0, function={"arguments": '{"expr'}),
        call_delta(index=0, function={"arguments": 'ession": "1+1"}'}),
        call_delta(index=1, id="call_b", function={"name": "calculator", "arguments": '{"expression": "2"}'}),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9}},
    ]
    server.replies.append(Reply(events=events))
    generation = await engine.generate(_request())
    assert generation.finish_reason == "tool_calls"
    assert generation.message.tool_calls == [
        ToolCall(id="call_a", name="calculator", arguments={"expression": "1+1"}),
        ToolCall(id="call_b", name="calculator", arguments={"expression": "2"}),
    ]


async def test_malformed_tool_arguments_are_a_permanent_error(server: OpenAITestServer, engine: OpenAIEngine) -> None:
    events = [
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "x", "arguments": "{"}}]}}
            ]
        }
    ]
    server.replies.append(Reply(events=events))
    with pytest.raises(EngineError) as caught:
        await engine.generate(_request())
    assert caught.value.code == "invalid_tool_arguments"
    assert not caught.value.retryable


async def test_retries_429_and_500_then_succeeds(server: OpenAITestServer, engine: OpenAIEngine) -> None:
    server.replies += [
        Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0"}),
        Reply(status=503, body={"error": "overloaded"}),
        Reply(events=text_events(["ok"])),
    ]
    generation = await engine.generate(_request())
    assert generation.message.content == "ok"
    assert len(server.requests) == 3
    assert engine.healthy()


async def test_gives_up_after_max_retries_with_a_retryable_error(
    server: OpenAITestServer, engine: OpenAIEngine
) -> None:
    server.replies += [Reply(status=500, body={"error": {"message": "boom"}}) for _ in range(3)]
    with pytest.raises(EngineError) as caught:
        await engine.generate(_request())
    assert caught.value.retryable
    assert caught.value.code == "upstream_error"
    assert "boom" in caught.value.message
    assert len(server.requests) == 3  # the first try and max_retries=2 more
    assert not engine.healthy()  # three failures in a row


async def test_client_errors_are_not_retried(server: OpenAITestServer, engine: OpenAIEngine) -> None:
    server.replies.append(Reply(status=404, body={"error": {"message": "model 'served-name' not found"}}))
    with pytest.raises(EngineError) as caught:
        await engine.generate(_request())
    assert (caught.value.code, caught.value.retryable) == ("model_not_found", False)
    assert len(server.requests) == 1


async def test_a_server_without_usage_in_its_stream_gets_counted_deltas(
    server: OpenAITestServer, engine: OpenAIEngine
) -> None:
    server.replies.append(Reply(events=text_events(["a", "b", "c"], usage=None)))
    generation = await engine.generate(_request())
    assert generation.usage.completion_tokens == 3


async def test_a_hanging_server_times_out_into_an_error_result_and_the_connection_is_closed(
    server: OpenAITestServer, engine: OpenAIEngine
) -> None:
    server.replies.append(Reply(hang=True))
    service = InferenceService(engine, WorkerMetrics(CollectorRegistry()), request_timeout_seconds=0.2)
    outcome = await service.generate(_request(), final_attempt=False)
    assert outcome.result.error is not None
    assert outcome.result.error.code == TIMEOUT
    await asyncio.wait_for(server.disconnected.wait(), timeout=10)


async def test_cancelling_a_streaming_generation_hangs_up_on_the_server(
    server: OpenAITestServer, engine: OpenAIEngine
) -> None:
    server.replies.append(Reply(events=text_events(["x"] * 100), pause_seconds=0.05))
    pieces: list[str] = []
    running = asyncio.create_task(engine.generate(_request(), pieces.append))
    while not pieces:
        await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.wait_for(server.disconnected.wait(), timeout=10)
    assert len(pieces) < 100


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("Sun, 01 Nov 2026 12:00:07 GMT", now=now) == 7.0
    assert retry_after_seconds("Sun, 01 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
