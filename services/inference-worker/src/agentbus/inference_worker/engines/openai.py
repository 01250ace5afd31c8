"""The `openai` engine: any OpenAI-compatible chat completions server (`vllm serve`, Ollama, a hosted API).

Requests always stream (server-sent events): text reaches `on_text` as it is generated, the time to first
token is measured, and cancelling a generation closes the connection, which makes `vllm serve` abort the
request. Overload (429) and server errors (5xx, 408, dropped connections) are retried with exponential
backoff and jitter, honouring `Retry-After`, as long as no text of the attempt was handed out yet; after
that, or after `max_retries`, the error goes back to the worker as retryable (a delayed redelivery).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall, ToolSpec
from agentbus.inference_worker.ports import EngineError, Generation, TextSink

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "model_not_found", 429: "rate_limited"}
_FINISH_REASONS: dict[str, Literal["stop", "tool_calls", "length"]] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
_UNHEALTHY_AFTER_FAILURES = 3


def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages in the OpenAI wire format (tool-call arguments as JSON strings)."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
            if message.name:
                item["name"] = message.name
        converted.append(item)
    return converted


def openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs in the OpenAI wire format."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A `Retry-After` header in seconds: either delay-seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _RetryableHttpError(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass
class _PartialCall:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Accumulator:
    started: float
    on_text: TextSink | None
    content: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    deltas: int = 0
    first_token_seconds: float | None = None

    @property
    def emitted_text(self) -> bool:
        return bool(self.content)

    def add(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("error"), dict | str):
            error = chunk["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else error
            raise EngineError("upstream_error", f"the server reported an error mid-stream: {message}", retryable=True)
        if isinstance(chunk.get("usage"), dict):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content")
            if text:
                self._first_token()
                self.content.append(text)
                self.deltas += 1
                if self.on_text is not None:
                    self.on_text(text)
            for call in delta.get("tool_calls") or []:
                self._first_token()
                self.deltas += 1
                partial = self.calls.setdefault(int(call.get("index", len(self.calls))), _PartialCall())
                partial.id = call.get("id") or partial.id
                function = call.get("function") or {}
                partial.name += function.get("name") or ""
                arguments = function.get("arguments")
                if arguments:
                    partial.arguments.append(arguments if isinstance(arguments, str) else json.dumps(arguments))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _first_token(self) -> None:
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.started

    def generation(self, request: LlmRequest) -> Generation:
        calls = []
        for index, partial in sorted(self.calls.items()):
            raw = "".join(partial.arguments).strip()
            try:
                arguments = json.loads(raw) if raw else {}
            except json.JSONDecodeError as exc:
                raise EngineError(
                    "invalid_tool_arguments",
                    f"tool call {partial.name!r}: arguments are not JSON: {raw[:200]}",
                    retryable=False,
                ) from exc
            if not isinstance(arguments, dict) or not partial.name:
                raise EngineError(
                    "invalid_tool_arguments",
                    f"tool call {partial.name!r}: arguments must be an object",
                    retryable=False,
                )
            calls.append(
                ToolCall(id=partial.id or f"call_{request.step}_{index}", name=partial.name, arguments=arguments)
            )
        finish = "tool_calls" if calls else _FINISH_REASONS.get(self.finish_reason or "stop", "stop")
        # Servers that ignore stream_options.include_usage send no usage: count the deltas instead (about one
        # token each); the prompt is then unknown.
        usage = self.usage or TokenUsage(prompt_tokens=0, completion_tokens=self.deltas)
        message = ChatMessage(role="assistant", content="".join(self.content), tool_calls=calls)
        return Generation(
            message=message, usage=usage, finish_reason=finish, first_token_seconds=self.first_token_seconds
        )


def _usage(raw: dict[str, Any]) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0), completion_tokens=int(raw.get("completion_tokens") or 0)
    )


class OpenAIEngine:
    """Chat completions over HTTP against an OpenAI-compatible server."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model_name: str | None = None,
        timeout_seconds: float = 300.0,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._model_name = model_name
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._consecutive_failures = 0

    def healthy(self) -> bool:
        """False once several requests in a row found the server unreachable or failing, until one succeeds."""
        return self._client is not None and self._consecutive_failures < _UNHEALTHY_AFTER_FAILURES

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            # The read timeout applies between streamed chunks; the worker bounds the whole request.
            timeout=httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)),
            # Concurrency is bounded by the worker's max_concurrency, not by a pool that would queue requests.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=self._transport,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        if self._client is None:
            raise EngineError("engine_not_started", "the openai engine was not started", retryable=True)
        payload: dict[str, Any] = {
            "model": self._model_name or request.model,
            "messages": openai_messages(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            payload["tools"] = openai_tools(request.tools)
        started = time.perf_counter()
        attempt = 0
        while True:
            accumulator = _Accumulator(started=started, on_text=on_text)
            try:
                await self._stream(self._client, payload, accumulator)
            except _RetryableHttpError as exc:
                self._consecutive_failures += 1
                if attempt >= self._max_retries or accumulator.emitted_text:
                    raise EngineError(exc.code, exc.message, retryable=True) from exc
                await asyncio.sleep(self._delay(attempt, exc.retry_after))
                attempt += 1
                continue
            self._consecutive_failures = 0
            return accumulator.generation(request)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max_backoff)
        # Full jitter keeps many workers that failed together from retrying together.
        return random.uniform(0, min(self._max_backoff, self._backoff * 2**attempt))

    async def _stream(self, client: httpx.AsyncClient, payload: dict[str, Any], accumulator: _Accumulator) -> None:
        try:
            async with client.stream("POST", "/chat/completions", json=payload) as response:
                if response.status_code != 200:
                    await self._raise_for_status(response)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    # A server that answers with one JSON body despite stream=true.
                    accumulator.add(json.loads(await response.aread()))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    if data:
                        accumulator.add(json.loads(data))
        except httpx.TransportError as exc:
            raise _RetryableHttpError("upstream_unreachable", f"{type(exc).__name__}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise EngineError("bad_response", f"the server sent malformed JSON: {exc}", retryable=True) from exc

    @staticmethod
    async def _raise_for_status(response: httpx.Response) -> None:
        body = (await response.aread()).decode("utf-8", errors="replace")[:2000]
        try:
            detail = json.loads(body).get("error", body)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, AttributeError):
            detail = body
        status = response.status_code
        message = f"HTTP {status} from {response.request.url}: {detail}"
        if status in RETRY_STATUSES:
            code = _ERROR_CODES.get(status, "upstream_error")
            raise _RetryableHttpError(code, message, retry_after_seconds(response.headers.get("retry-after")))
        raise EngineError(_ERROR_CODES.get(status, "upstream_rejected"), message, retryable=False)
