"""The `vllm` engine: vLLM's `AsyncLLM` in this process, fed by the worker's concurrent requests.

vLLM is an optional dependency for GPU images (the inference-worker's locked `gpu` extra:
`uv sync --extra gpu`): it is imported only when this engine starts, so nothing else in the worker needs
it. Every request the worker has in flight is a concurrent `AsyncLLM.generate()` call, which vLLM's
scheduler batches continuously.

What the engine takes from vLLM (`VllmBackend`): the engine itself, the model's chat template (rendered by
the model's tokenizer as vLLM loaded it), and vLLM's tool-call parser for the model family (`hermes`,
`llama3_json`, `mistral`, ... as for `vllm serve --tool-call-parser`), which also separates the text to
stream from tool-call markup while generating. Tests substitute a fake backend with the same interfaces.

Cancelling `generate()` makes vLLM abort the request and free its KV cache (AsyncLLM.generate aborts on
CancelledError).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall
from agentbus.inference_worker.engines.openai import openai_tools
from agentbus.inference_worker.ports import EngineError, Generation, TextSink
from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)

_FINISH_REASONS: dict[str, Literal["stop", "tool_calls", "length"]] = {"stop": "stop", "length": "length"}


class CompletionOutputLike(Protocol):
    """vllm.outputs.CompletionOutput, as much as the engine reads (DELTA outputs: only what is new)."""

    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def finish_reason(self) -> str | None: ...


class RequestOutputLike(Protocol):
    """vllm.outputs.RequestOutput, as much as the engine reads."""

    @property
    def prompt_token_ids(self) -> Sequence[int] | None: ...
    @property
    def outputs(self) -> Sequence[CompletionOutputLike]: ...
    @property
    def finished(self) -> bool: ...


class AsyncLlmLike(Protocol):
    """vllm.v1.engine.async_llm.AsyncLLM, as much as the engine calls."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[RequestOutputLike]: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


class ToolCallParser(Protocol):
    """One request's tool-call parsing, over vLLM's ToolParser for the model family."""

    def stream_content(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> str | None:
        """The plain text in this delta, without tool-call markup (None: nothing to show yet)."""
        ...

    def extract(self, text: str) -> tuple[str, list[tuple[str | None, str, str]]]:
        """The content and the tool calls (id or None, name, JSON arguments) of the whole output."""
        ...


@dataclass(frozen=True)
class VllmBackend:
    """What the engine needs from vLLM. `load_vllm_backend` builds the real one."""

    llm: AsyncLlmLike
    render_prompt: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]
    sampling_params: Callable[[LlmRequest], Any]
    tool_parser: Callable[[list[dict[str, Any]], list[dict[str, Any]]], ToolCallParser] | None = None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for a Hugging Face chat template: tool-call arguments as objects, as vLLM passes them."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
            if message.name:
                item["name"] = message.name
        converted.append(item)
    return converted


class VllmEngine:
    """Generates with an in-process vLLM AsyncLLM (see the module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        engine_args: Mapping[str, Any] | None = None,
        tool_parser: str | None = None,
        backend_factory: Callable[[str, Mapping[str, Any], str | None], Any] | None = None,
        health_interval_seconds: float = 5.0,
    ) -> None:
        self._model = model
        self._engine_args = dict(engine_args or {})
        self._tool_parser = tool_parser
        self._factory = backend_factory or load_vllm_backend
        self._health_interval = health_interval_seconds
        self._backend: VllmBackend | None = None
        self._healthy = False
        self._health_task: asyncio.Task[None] | None = None

    def healthy(self) -> bool:
        """The last `check_health()` passed (checked every few seconds in the background)."""
        return self._backend is not None and self._healthy

    async def start(self) -> None:
        backend = self._factory(self._model, self._engine_args, self._tool_parser)
        self._backend = await backend if inspect.isawaitable(backend) else backend
        self._healthy = True
        self._health_task = asyncio.create_task(self._watch_health(), name="vllm-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._backend is not None:
            await asyncio.to_thread(self._backend.llm.shutdown)
            self._backend = None

    async def _watch_health(self) -> None:
        assert self._backend is not None
        while True:
            try:
                await self._backend.llm.check_health()
                self._healthy = True
            except Exception as exc:
                if self._healthy:
                    _log.error("vllm_unhealthy", error=repr(exc))
                self._healthy = False
            await asyncio.sleep(self._health_interval)

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        backend = self._backend
        if backend is None:
            raise EngineError("engine_not_started", "the vllm engine was not started", retryable=True)
        started = time.perf_counter()
        messages = template_messages(request.messages)
        tools = openai_tools(request.tools) or None
        try:
            prompt = backend.render_prompt(messages, tools)
        except Exception as exc:
            raise EngineError(
                "bad_request", f"the chat template cannot render this conversation: {exc}", retryable=False
            ) from exc
        parser = backend.tool_parser(messages, tools) if backend.tool_parser is not None and tools else None
        # vLLM refuses a request id it already runs: a redelivered request may still run here.
        engine_request_id = f"{request.request_id}:{uuid.uuid4().hex[:8]}"
        text, token_ids = "", list[int]()
        prompt_tokens = 0
        finish_reason: str | None = None
        first_token: float | None = None
        try:
            async for output in backend.llm.generate(prompt, backend.sampling_params(request), engine_request_id):
                if output.prompt_token_ids:
                    prompt_tokens = len(output.prompt_token_ids)
                if not output.outputs:
                    continue
                completion = output.outputs[0]
                delta_ids = list(completion.token_ids)
                if delta_ids and first_token is None:
                    first_token = time.perf_counter() - started
                previous_text, previous_ids = text, list(token_ids)
                text += completion.text
                token_ids.extend(delta_ids)
                if on_text is not None and completion.text:
                    shown = (
                        parser.stream_content(previous_text, text, completion.text, previous_ids, token_ids, delta_ids)
                        if parser is not None
                        else completion.text
                    )
                    if shown:
                        on_text(shown)
                finish_reason = completion.finish_reason or finish_reason
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Engine failures (EngineDeadError, EngineGenerateError): another attempt, maybe on another worker.
            raise EngineError("engine_error", f"{type(exc).__name__}: {exc}", retryable=True) from exc
        content, calls = text, []
        if parser is not None:
            content, raw_calls = parser.extract(text)
            calls = [_tool_call(request, index, raw) for index, raw in enumerate(raw_calls)]
        finish = "tool_calls" if calls else _FINISH_REASONS.get(finish_reason or "stop", "stop")
        return Generation(
            message=ChatMessage(role="assistant", content=content, tool_calls=calls),
            usage=TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=len(token_ids)),
            finish_reason=finish,
            first_token_seconds=first_token,
        )


def _tool_call(request: LlmRequest, index: int, raw: tuple[str | None, str, str]) -> ToolCall:
    call_id, name, arguments = raw
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise EngineError(
            "invalid_tool_arguments", f"tool call {name!r}: arguments are not JSON: {arguments[:200]}", retryable=False
        ) from exc
    if not isinstance(parsed, dict):
        raise EngineError("invalid_tool_arguments", f"tool call {name!r}: arguments must be an object", retryable=False)
    return ToolCall(id=call_id or f"call_{request.step}_{index}", name=name, arguments=parsed)


# --- the real vLLM backend (imported only on GPU images) ------------------------------------------


class _VllmToolCallParser:
    """vLLM's ToolParser for one request, with the ChatCompletionRequest it expects."""

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser = parser
        self._request = request

    def stream_content(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> str | None:
        delta = self._parser.extract_tool_calls_streaming(
            previous_text,
            current_text,
            delta_text,
            previous_token_ids,
            current_token_ids,
            delta_token_ids,
            self._request,
        )
        content = getattr(delta, "content", None) if delta is not None else None
        return content if isinstance(content, str) else None

    def extract(self, text: str) -> tuple[str, list[tuple[str | None, str, str]]]:
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return text, []
        calls = [(call.id, call.function.name, call.function.arguments or "") for call in info.tool_calls]
        return info.content or "", calls


async def load_vllm_backend(model: str, engine_args: Mapping[str, Any], tool_parser: str | None) -> VllmBackend:
    """Start vLLM's AsyncLLM for `model` (weights from the local cache, `engine_args` as AsyncEngineArgs)."""
    try:
        from vllm import SamplingParams  # type: ignore[import-not-found, unused-ignore]
        from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found, unused-ignore]
        from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found, unused-ignore]
        from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        from agentbus.runtime.errors import ConfigurationError

        raise ConfigurationError(
            "AGENTBUS_WORKER_ENGINE=vllm needs vLLM installed "
            f"(the locked gpu extra: uv sync --extra gpu, on a CUDA machine): {exc}"
        ) from exc

    # Loading weights and compiling take minutes: off the event loop, so /healthz keeps answering.
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(model=model, **engine_args))
    tokenizer = llm.get_tokenizer()
    if inspect.isawaitable(tokenizer):
        tokenizer = await tokenizer

    def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        rendered = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return str(rendered)

    def sampling_params(request: LlmRequest) -> Any:
        return SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, output_kind=RequestOutputKind.DELTA
        )

    parser_factory = None
    if tool_parser:
        parser_class, request_class = _vllm_tool_parsing(tool_parser)

        def parser_factory(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> ToolCallParser:
            request = request_class(model=model, messages=messages, tools=tools)
            return _VllmToolCallParser(parser_class(tokenizer), request)

    return VllmBackend(
        llm=llm, render_prompt=render_prompt, sampling_params=sampling_params, tool_parser=parser_factory
    )


def _vllm_tool_parsing(name: str) -> tuple[Any, Any]:
    # Module paths moved between vLLM releases; these are the 0.33 ones first, then the older ones.
    try:
        from vllm.tool_parsers import ToolParserManager  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        from vllm.entrypoints.openai.tool_parsers import (  # type: ignore[import-not-found, unused-ignore, no-redef]
            ToolParserManager,
        )
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import (  # type: ignore[import-not-found, unused-ignore]
            ChatCompletionRequest,
        )
    except ImportError:
        from vllm.entrypoints.openai.protocol import (  # type: ignore[import-not-found, unused-ignore, no-redef]
            ChatCompletionRequest,
        )
    try:
        parser_class = ToolParserManager.get_tool_parser(name)
    except KeyError as exc:
        from agentbus.runtime.errors import ConfigurationError

        raise ConfigurationError(
            f"AGENTBUS_WORKER_VLLM_TOOL_PARSER={name!r} is not a vLLM tool parser; known: "
            f"{', '.join(ToolParserManager.list_registered())}"
        ) from exc
    return parser_class, ChatCompletionRequest
