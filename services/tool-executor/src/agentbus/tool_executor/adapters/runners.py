"""Tool runners, one per kind: python built-ins, sandboxed shell commands, HTTP endpoints, retrieval."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import nats.errors
from agentbus.contracts.rag import SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_SEARCH, Header
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.tool_registry import McpHttpTransport, McpServerDefinition, SecretHeader, ToolDefinition
from agentbus.tool_executor.adapters.sandbox import SandboxLimits, run_sandboxed
from agentbus.tool_executor.ports import (
    EffectConnection,
    ToolInvocation,
    ToolOutput,
    ToolUnavailableError,
    TransientToolError,
)
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError

MAX_CONTENT_CHARS = 16_000
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
RETRIEVER = "the retriever"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def clip_content(text: str) -> str:
    """At most MAX_CONTENT_CHARS of a tool's output, saying how much was cut."""
    if len(text) <= MAX_CONTENT_CHARS:
        return text
    return text[:MAX_CONTENT_CHARS] + f"\n... ({len(text) - MAX_CONTENT_CHARS} more characters cut)"


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def substitute(template: str, arguments: Mapping[str, Any]) -> tuple[str, set[str]]:
    """Replace each `{name}` by that argument's text (nothing else is interpreted); return the names used."""
    used: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        used.add(match.group(1))
        return _as_text(arguments.get(match.group(1)))

    return _PLACEHOLDER.sub(replace, template), used


# --- python ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonToolContext:
    """What a built-in callable gets besides its arguments."""

    invocation: ToolInvocation
    options: Mapping[str, Any]
    connection: EffectConnection | None
    """The ledger's open transaction, for `transactional: true` tools: write through it to commit with it."""
    timeout_seconds: float


PythonTool = Callable[[dict[str, Any], PythonToolContext], Awaitable[ToolOutput | str]]


class ToolFailedError(Exception):
    """Raised by a built-in to fail the call with a code and a message the model can read."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_callable(definition: ToolDefinition) -> PythonTool:
    """Import a python tool's callable. A ConfigurationError names the file and the field when it cannot."""
    assert definition.python is not None
    module_name, _, attribute = definition.python.callable.partition(":")
    where = f"{definition.source}: field 'python.callable'"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, attribute, None)
    if function is None or not inspect.iscoroutinefunction(function):
        raise ConfigurationError(f"{where}: {definition.python.callable!r} is not an async function")
    tool: PythonTool = function
    return tool


@dataclass
class PythonRunner:
    callables: dict[str, PythonTool] = field(default_factory=dict)

    def register(self, definition: ToolDefinition) -> None:
        self.callables[definition.name] = resolve_callable(definition)

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        assert definition.python is not None
        context = PythonToolContext(invocation, definition.python.options, connection, definition.timeout_seconds)
        try:
            output = await self.callables[definition.name](dict(invocation.arguments), context)
        except ToolFailedError as exc:
            return ToolOutput.failure(exc.code, exc.message)
        return output if isinstance(output, ToolOutput) else ToolOutput(True, clip_content(output))


# --- shell -----------------------------------------------------------------------------------------


class ShellRunner:
    """Runs `shell.command` with the arguments substituted, in the sandbox."""

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        assert definition.shell is not None
        config = definition.shell
        argv = [substitute(part, invocation.arguments)[0] for part in config.command]
        limits = SandboxLimits(
            timeout_seconds=definition.timeout_seconds,
            max_memory_mb=config.max_memory_mb,
            max_output_bytes=config.max_output_bytes,
            max_file_size_mb=config.max_file_size_mb,
        )
        try:
            result = await run_sandboxed(argv, limits, env=config.env)
        except OSError as exc:
            return ToolOutput.failure("cannot_start", f"cannot start {argv[0]!r}: {exc}")
        if result.timed_out:
            return ToolOutput.failure(
                "timeout", f"the command ran longer than {definition.timeout_seconds:g} s and was killed"
            )
        cut = " (output cut)" if result.truncated else ""
        content = clip_content(
            f"exit status {result.exit_code}{cut}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        if result.exit_code != 0:
            return ToolOutput(False, content, "exit_status", f"the command exited with status {result.exit_code}")
        return ToolOutput(True, content)


# --- http ------------------------------------------------------------------------------------------


def missing_secrets(definition: ToolDefinition, environ: Mapping[str, str]) -> list[str]:
    """Header fields whose secret variable is not set, as `http.headers.<name>`."""
    assert definition.http is not None
    return [
        f"http.headers.{name} (${value.secret_env})"
        for name, value in definition.http.headers.items()
        if isinstance(value, SecretHeader) and value.secret_env not in environ
    ]


def missing_server_secrets(server: McpServerDefinition, environ: Mapping[str, str]) -> list[str]:
    """An MCP server's secret variables that are not set, as the fields that name them."""
    transport = server.transport
    if isinstance(transport, McpHttpTransport):
        return [
            f"transport.headers.{name} (${value.secret_env})"
            for name, value in transport.headers.items()
            if isinstance(value, SecretHeader) and value.secret_env not in environ
        ]
    return [
        f"transport.secret_env.{name} (${variable})"
        for name, variable in transport.secret_env.items()
        if variable not in environ
    ]


class HttpRunner:
    """Calls an HTTP endpoint. Secrets are read from the executor's environment when the call runs."""

    def __init__(self, client: httpx.AsyncClient, environ: Mapping[str, str] | None = None) -> None:
        self._client = client
        self._environ = environ if environ is not None else os.environ

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        assert definition.http is not None
        config = definition.http
        used: set[str] = set()

        def url_part(match: re.Match[str]) -> str:
            used.add(match.group(1))
            return quote(_as_text(invocation.arguments.get(match.group(1))), safe="")

        url = _PLACEHOLDER.sub(url_part, config.url)
        rest = {k: v for k, v in invocation.arguments.items() if k not in used}
        headers = {}
        for name, value in config.headers.items():
            if isinstance(value, SecretHeader):
                secret = self._environ.get(value.secret_env)
                if secret is None:
                    return ToolOutput.failure("missing_secret", f"${value.secret_env} is not set on the executor")
                headers[name] = value.prefix + secret
            else:
                headers[name] = value
        if config.send_idempotency_key:
            headers[IDEMPOTENCY_KEY_HEADER] = invocation.call_id
        if invocation.traceparent:
            headers[Header.TRACEPARENT.value] = invocation.traceparent
        query = {k: _as_text(v) for k, v in rest.items()} if config.method in ("GET", "DELETE") else None
        body = rest if config.method not in ("GET", "DELETE") else None
        try:
            response = await self._client.request(
                config.method, url, params=query, json=body, headers=headers, timeout=definition.timeout_seconds
            )
        except httpx.TimeoutException as exc:
            raise TransientToolError("timeout", f"{config.method} {url} timed out") from exc
        except httpx.TransportError as exc:
            raise TransientToolError("unreachable", f"{config.method} {url} failed: {exc}") from exc
        text = clip_content(response.text)
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientToolError(f"http_{response.status_code}", f"{config.method} {url}: {text[:500]}")
        if response.status_code >= 400:
            return ToolOutput(
                False,
                f"HTTP {response.status_code}\n{text}",
                f"http_{response.status_code}",
                f"{config.method} {url} answered {response.status_code}",
            )
        return ToolOutput(True, text)


# --- retrieval -------------------------------------------------------------------------------------


def format_citations(chunks: list[dict[str, Any]]) -> str:
    """Numbered passages the model can cite as [1], [2], ..."""
    if not chunks:
        return "No matching passages were found in the knowledge base."
    lines = []
    for number, chunk in enumerate(chunks, start=1):
        source = f"{chunk['document_id']}#{chunk['chunk_index']}"
        lines.append(f"[{number}] ({source}, score {chunk['score']:.3f})\n{chunk['text'].strip()}")
    return "\n\n".join(lines)


class RetrievalRunner:
    """Searches the tenant's knowledge base through the retriever (core NATS request/reply).

    The search is billed by the retriever once per call id (its `request_id`), so asking again after a search
    that got no answer bills nothing twice. A retriever that is not serving, or does not answer in time, is
    reported as unavailable: the executor waits for it.
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        assert definition.retrieval is not None
        config = definition.retrieval
        query = invocation.arguments.get(config.query_argument)
        if not isinstance(query, str) or not query.strip():
            return ToolOutput.failure("invalid_arguments", f"{config.query_argument!r} must be a non-empty string")
        top_k = invocation.arguments.get("top_k", config.top_k)
        try:
            request = SearchRequest(
                tenant=invocation.tenant,
                query=query,
                top_k=top_k if isinstance(top_k, int) else config.top_k,
                mode=config.mode,
                request_id=invocation.call_id,
                task_id=invocation.task_id,
            )
        except ValidationError as exc:
            return ToolOutput.failure("invalid_arguments", str(exc.errors()[0]["msg"]))
        headers = {Header.TRACEPARENT.value: invocation.traceparent} if invocation.traceparent else None
        try:
            msg = await self._nc.request(
                RAG_SEARCH.format(tenant=invocation.tenant),
                request.model_dump_json().encode(),
                timeout=definition.timeout_seconds,
                headers=headers,
            )
        except nats.errors.NoRespondersError as exc:
            raise ToolUnavailableError(
                "retriever_unavailable", "no retriever is serving searches", waiting_for=RETRIEVER
            ) from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise ToolUnavailableError(
                "timeout", "the retriever did not answer in time", waiting_for=RETRIEVER
            ) from exc
        try:
            reply = SearchReply.model_validate_json(msg.data)
        except ValidationError as exc:
            return ToolOutput.failure("bad_reply", f"the retriever's reply is not a SearchReply: {exc.errors()[0]}")
        if reply.error is not None:
            return ToolOutput.failure(reply.error.code, reply.error.message)
        chunks = [chunk.model_dump(mode="json") for chunk in reply.chunks]
        usage = (reply.usage_id,) if reply.usage_id else ()
        return ToolOutput(True, clip_content(format_citations(chunks)), citations=tuple(chunks), usage_ids=usage)
