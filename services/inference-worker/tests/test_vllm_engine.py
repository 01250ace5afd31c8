"""The vllm engine's logic against a fake AsyncLLM with vLLM's interface; a real small model when a GPU is here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall, ToolSpec
from agentbus.inference_worker.engines.vllm import VllmBackend, VllmEngine, template_messages
from agentbus.inference_worker.ports import EngineError

CALC = ToolSpec(name="calculator", description="math", parameters={"type": "object", "properties": {}})


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int] | None = None
    finished: bool = False


@dataclass
class FakeAsyncLLM:
    """AsyncLLM.generate's shape: an async generator of DELTA RequestOutputs, aborting when cancelled."""

    pieces: list[str]
    pause_seconds: float = 0.0
    prompts: list[Any] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    health_error: Exception | None = None
    shut_down: bool = False
    fail_with: Exception | None = None

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[FakeOutput]:
        self.prompts.append((prompt, sampling_params))
        self.request_ids.append(request_id)
        try:
            for index, piece in enumerate(self.pieces):
                if self.pause_seconds:
                    await asyncio.sleep(self.pause_seconds)
                if self.fail_with is not None and index == 1:
                    raise self.fail_with
                last = index == len(self.pieces) - 1
                yield FakeOutput(
                    outputs=[FakeCompletion(piece, [index] * len(piece.split()), "stop" if last else None)],
                    prompt_token_ids=[1, 2, 3, 4, 5] if index == 0 else None,
                    finished=last,
                )
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise

    async def check_health(self) -> None:
        if self.health_error is not None:
            raise self.health_error

    def shutdown(self) -> None:
        self.shut_down = True


class FakeToolParser:
    """A hermes-style parser: `<tool_call>{json}</tool_call>` blocks are calls, the rest is content."""

    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def stream_content(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> str | None:
        return None if "<tool_call>" in current_text else delta_text

    def extract(self, text: str) -> tuple[str, list[tuple[str | None, str, str]]]:
        calls = [json.loads(block) for block in self._CALL.findall(text)]
        content = self._CALL.sub("", text).strip()
        return content, [(None, c["name"], json.dumps(c["arguments"])) for c in calls]


def _request(tools: list[ToolSpec] | None = None) -> LlmRequest:
    return LlmRequest(
        request_id="t.step-2",
        task_id="t",
        tenant="acme",
        agent="a",
        model="small",
        step=2,
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", tool_calls=[ToolCall(id="c1", name="calculator", arguments={"x": 1})]),
            ChatMessage(role="tool", content="1", tool_call_id="c1", name="calculator"),
        ],
        tools=tools or [],
        max_tokens=32,
        temperature=0.0,
    )


async def _engine(llm: FakeAsyncLLM, with_parser: bool = False) -> VllmEngine:
    def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return f"PROMPT[{len(messages)}]"

    def factory(model: str, engine_args: Any, tool_parser: str | None) -> VllmBackend:
        assert (model, dict(engine_args), tool_parser) == ("org/small", {"max_model_len": 2048}, "hermes")
        return VllmBackend(
            llm=llm,
            render_prompt=render_prompt,
            sampling_params=lambda request: {"max_tokens": request.max_tokens, "temperature": request.temperature},
            tool_parser=(lambda messages, tools: FakeToolParser()) if with_parser else None,
        )

    engine = VllmEngine(
        "org/small",
        engine_args={"max_model_len": 2048},
        tool_parser="hermes",
        backend_factory=factory,
        health_interval_seconds=0.01,
    )
    await engine.start()
    return engine


async def test_accumulates_delta_outputs_into_text_usage_and_stream() -> None:
    llm = FakeAsyncLLM(pieces=["Hello", " wide", " world"])
    engine = await _engine(llm)
    pieces: list[str] = []
    generation = await engine.generate(_request(), pieces.append)
    await engine.aclose()
    assert generation.message.content == "Hello wide world"
    assert pieces == ["Hello", " wide", " world"]
    assert (generation.usage.prompt_tokens, generation.usage.completion_tokens) == (5, 3)
    assert generation.finish_reason == "stop"
    assert generation.first_token_seconds is not None
    prompt, params = llm.prompts[0]
    assert prompt == "PROMPT[3]"
    assert params == {"max_tokens": 32, "temperature": 0.0}
    assert llm.request_ids[0].startswith("t.step-2:")
    assert llm.shut_down


async def test_tool_calls_are_parsed_and_their_markup_is_not_streamed() -> None:
    llm = FakeAsyncLLM(
        pieces=["Let me compute.", '<tool_call>{"name": "calculator", ', '"arguments": {"x": 2}}</tool_call>']
    )
    engine = await _engine(llm, with_parser=True)
    pieces: list[str] = []
    generation = await engine.generate(_request([CALC]), pieces.append)
    await engine.aclose()
    assert pieces == ["Let me compute."]
    assert generation.finish_reason == "tool_calls"
    assert generation.message.content == "Let me compute."
    assert generation.message.tool_calls == [ToolCall(id="call_2_0", name="calculator", arguments={"x": 2})]


async def test_cancelling_generate_aborts_the_vllm_request() -> None:
    llm = FakeAsyncLLM(pieces=["tok"] * 1000, pause_seconds=0.01)
    engine = await _engine(llm)
    pieces: list[str] = []
    running = asyncio.create_task(engine.generate(_request(), pieces.append))
    while not pieces:
        await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await engine.aclose()
    assert llm.aborted == llm.request_ids


async def test_engine_failures_are_retryable_errors() -> None:
    llm = FakeAsyncLLM(pieces=["a", "b"], fail_with=RuntimeError("EngineDeadError"))
    engine = await _engine(llm)
    with pytest.raises(EngineError) as caught:
        await engine.generate(_request())
    await engine.aclose()
    assert caught.value.retryable
    assert caught.value.code == "engine_error"


async def test_health_follows_check_health() -> None:
    llm = FakeAsyncLLM(pieces=[])
    engine = await _engine(llm)
    assert engine.healthy()
    llm.health_error = RuntimeError("engine dead")
    for _ in range(200):
        if not engine.healthy():
            break
        await asyncio.sleep(0.01)
    assert not engine.healthy()
    await engine.aclose()
    assert not engine.healthy()


def test_template_messages_pass_tool_arguments_as_objects() -> None:
    converted = template_messages(_request().messages)
    assert converted[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"x": 1}}
    assert converted[2] == {"role": "tool", "content": "1", "tool_call_id": "c1", "name": "calculator"}


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (GPU machines only: uv sync --extra gpu)"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch  # type: ignore[import-not-found, unused-ignore]

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@pytest.mark.gpu
async def test_a_real_small_model_generates_and_streams() -> None:
    reason = _gpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    model = os.environ.get("AGENTBUS_TEST_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    engine = VllmEngine(model, engine_args={"max_model_len": 2048, "gpu_memory_utilization": 0.3})
    await engine.start()
    try:
        pieces: list[str] = []
        request = LlmRequest(
            request_id="gpu.step-1",
            task_id="gpu",
            tenant="acme",
            agent="a",
            model="small",
            step=1,
            messages=[ChatMessage(role="user", content="Say hello in five words.")],
            max_tokens=24,
        )
        generation = await engine.generate(request, pieces.append)
        assert engine.healthy()
        assert generation.message.content
        assert "".join(pieces) == generation.message.content
        assert generation.usage.prompt_tokens > 0
        assert 0 < generation.usage.completion_tokens <= 24
    finally:
        await engine.aclose()
