"""The `scripted` engine: a deterministic OFFLINE engine for demos and tests. It is not a language model.

It follows a fixed script that is enough to drive real multi-step runs without a GPU or network:

1. It reads the user's input for calls written as `tool_name(arguments)`, naming tools the request
   offers, in order of appearance. `arguments` is a JSON object, keyword arguments with literal values
   (`create_ticket(title="db down", priority="high")`), or plain text, which becomes the tool's first
   required parameter, e.g. `calculator((2+3)*4)` or `word_count(to be or not)`. Empty parentheses,
   `kubectl_apply()`, pass the previous call's result as that first required parameter.
2. With no calls written, a search tool offered (one whose only required parameter is `query`) is
   called with the whole input: a support agent searches its knowledge base for the question asked.
3. Each step it asks for the next call not yet made (one call per step).
4. When every call has a result, it answers by quoting them; with no calls, it restates the input.

The input is the request's last user message (a session's earlier turns come before it). A summary request
(`purpose: summary`) is answered with the user's lines of the transcript it was given, in order.

Token counts are words and punctuation marks, an approximation labelled as such in the docs.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time
from typing import Any

from agentbus.contracts.common import TokenUsage
from agentbus.contracts.llm import ChatMessage, LlmRequest, ToolCall, ToolSpec
from agentbus.inference_worker.ports import Generation, TextSink

SCRIPTED_MODEL_NOTICE = "[scripted offline engine, not an LLM]"
SEARCH_PARAMETER = "query"
SHOWN_ARGUMENT_CHARS = 60
"""An argument longer than this is shortened where the answer quotes a call."""
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\S*\s*")  # a word and the whitespace after it: the pieces join back into the text


def count_tokens(text: str) -> int:
    """Approximate tokens: words and punctuation marks."""
    return len(_TOKEN.findall(text))


def _closing_paren(text: str, open_index: int) -> int | None:
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    return None


def _keyword_arguments(raw: str) -> dict[str, Any] | None:
    """`key="value", n=3` as a dict, when the text is exactly keyword arguments with literal values."""
    if "=" not in raw:
        return None
    try:
        call = ast.parse(f"f({raw})", mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or call.args or not call.keywords:
        return None
    arguments: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            return None
    return arguments


def _first_required(tool: ToolSpec) -> str | None:
    required = tool.parameters.get("required") or list(tool.parameters.get("properties", {}))
    return str(required[0]) if required else None


def _arguments(tool: ToolSpec, raw: str) -> dict[str, Any]:
    raw = raw.strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    keywords = _keyword_arguments(raw)
    if keywords is not None:
        return keywords
    first = _first_required(tool)
    return {first: raw} if first else {}


def _is_search(tool: ToolSpec) -> bool:
    return tool.parameters.get("required") == [SEARCH_PARAMETER]


def planned_calls(text: str, tools: list[ToolSpec]) -> list[tuple[str, dict[str, Any]]]:
    """The `tool(arguments)` calls written in `text`, for the offered tools, in order of appearance; with
    none written, a search of the whole text when a search tool is offered. A call written with empty
    parentheses has empty arguments here: `generate` fills them from the previous call's result."""
    if not tools:
        return []
    by_name = {tool.name: tool for tool in tools}
    pattern = re.compile(r"\b(" + "|".join(re.escape(name) for name in by_name) + r")\(")
    calls = []
    position = 0
    while match := pattern.search(text, position):
        close = _closing_paren(text, match.end() - 1)
        if close is None:
            break
        calls.append((match.group(1), _arguments(by_name[match.group(1)], text[match.end() : close])))
        position = close + 1
    if not calls and text.strip():
        search = next((tool for tool in tools if _is_search(tool)), None)
        if search is not None:
            limit = search.parameters.get("properties", {}).get(SEARCH_PARAMETER, {}).get("maxLength")
            calls.append((search.name, {SEARCH_PARAMETER: text.strip()[:limit]}))
    return calls


def _with_previous_result(
    tool: ToolSpec | None, arguments: dict[str, Any], messages: list[ChatMessage]
) -> dict[str, Any]:
    """`tool()`: the previous call's result as the tool's first required parameter."""
    first = _first_required(tool) if tool is not None else None
    results = [m.content for m in messages if m.role == "tool"]
    if arguments or first is None or not results:
        return arguments
    return {first: results[-1]}


class ScriptedEngine:
    """Deterministic offline engine (see the module docstring). Documented as such wherever it appears.

    `token_delay_seconds` simulates generation time per completion token (for benchmarks and tests of
    long generations); the answer's text is then handed to `on_text` piece by piece as it is "generated".
    """

    def __init__(self, token_delay_seconds: float = 0.0) -> None:
        self._token_delay = token_delay_seconds

    def healthy(self) -> bool:
        return True

    async def generate(self, request: LlmRequest, on_text: TextSink | None = None) -> Generation:
        started = time.perf_counter()
        if request.purpose == "summary":
            return await self._summary(request, on_text, started)
        # The task's own input is the last user message: a session's earlier turns come before it.
        last = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=-1)
        user_input = request.messages[last].content if last >= 0 else ""
        calls = planned_calls(user_input, request.tools)
        made = sum(len(m.tool_calls) for m in request.messages[last + 1 :] if m.role == "assistant")
        if made < len(calls):
            name, arguments = calls[made]
            offered = next((tool for tool in request.tools if tool.name == name), None)
            arguments = _with_previous_result(offered, arguments, request.messages)
            message = ChatMessage(
                role="assistant",
                content="",
                tool_calls=[ToolCall(id=f"call_{made + 1}", name=name, arguments=arguments)],
            )
            finish: Any = "tool_calls"
        else:
            message = ChatMessage(role="assistant", content=self._answer(user_input, request.messages[last + 1 :]))
            finish = "stop"
        completion_text = message.content + "".join(c.name + json.dumps(c.arguments) for c in message.tool_calls)
        usage = TokenUsage(
            prompt_tokens=sum(count_tokens(m.content) for m in request.messages)
            + sum(count_tokens(json.dumps(t.parameters)) for t in request.tools),
            completion_tokens=count_tokens(completion_text),
        )
        first_token = await self._emit(message.content, usage.completion_tokens, on_text, started)
        return Generation(message=message, usage=usage, finish_reason=finish, first_token_seconds=first_token)

    async def _summary(self, request: LlmRequest, on_text: TextSink | None, started: float) -> Generation:
        """A session's oldest turns, summarized deterministically: the user's lines of the transcript, in order
        (and the summary they extend)."""
        transcript = request.messages[-1].content if request.messages else ""
        kept = [line for line in transcript.splitlines() if line.startswith(("Summary so far: ", "User: "))]
        content = "Earlier, " + "; ".join(kept) if kept else "Nothing was said earlier."
        prompt = sum(count_tokens(m.content) for m in request.messages)
        usage = TokenUsage(prompt_tokens=prompt, completion_tokens=count_tokens(content))
        first_token = await self._emit(content, usage.completion_tokens, on_text, started)
        message = ChatMessage(role="assistant", content=content)
        return Generation(message=message, usage=usage, finish_reason="stop", first_token_seconds=first_token)

    async def _emit(self, content: str, tokens: int, on_text: TextSink | None, started: float) -> float:
        pieces = [piece for piece in _PIECE.findall(content) if piece] if on_text is not None else []
        if not pieces:
            if self._token_delay and tokens:
                await asyncio.sleep(self._token_delay)
                first_token = time.perf_counter() - started
                await asyncio.sleep(self._token_delay * (tokens - 1))
                return first_token
            return time.perf_counter() - started
        assert on_text is not None
        per_piece = self._token_delay * tokens / len(pieces)
        first_token = 0.0
        for index, piece in enumerate(pieces):
            if per_piece:
                await asyncio.sleep(per_piece)
            if index == 0:
                first_token = time.perf_counter() - started
            on_text(piece)
        return first_token

    @staticmethod
    def _answer(user_input: str, messages: list[ChatMessage]) -> str:
        results = [m for m in messages if m.role == "tool"]
        if not results:
            return f"{SCRIPTED_MODEL_NOTICE} You asked: {user_input.strip()}"
        calls = {c.id: c for m in messages if m.role == "assistant" for c in m.tool_calls}
        lines = []
        for result in results:
            call = calls.get(result.tool_call_id or "")
            shown = ", ".join(f"{k}={_shown(v)}" for k, v in call.arguments.items()) if call else ""
            lines.append(f"{result.name}({shown}) = {result.content}")
        return f"{SCRIPTED_MODEL_NOTICE} " + "; ".join(lines)


def _shown(value: Any) -> str:
    """An argument as the answer quotes it: its repr, a long one cut short with its length."""
    text = repr(value)
    if len(text) <= SHOWN_ARGUMENT_CHARS:
        return text
    return f"{text[: SHOWN_ARGUMENT_CHARS - 1]}… ({len(text)} characters)"
