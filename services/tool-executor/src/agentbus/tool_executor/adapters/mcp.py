"""MCP tool servers: one connection per server, kept up in the background, and the runner of `mcp` tools.

A connection is made when the executor starts and made again, with exponential backoff and jitter, whenever
it ends (the server stopped, did not answer a ping, or sent what ends a connection). On connecting, and each
time the server says its tool list changed, the executor lists the server's tools and compares them with
the ones pinned in its file: a pinned tool the server no longer lists fails its calls clearly; a changed
input schema is logged, and arguments are checked against the server's own schema before each call.

Whether a call may have reached the server decides what an outage means for it:
- not connected when the call is about to start: nothing was sent, so the call waits for the server,
  whatever the tool (`ToolNotStartedError`, and the executor's gate before it even claims the call);
- the connection ended while the call ran: its outcome is unknown (`ToolInterruptedError`): an idempotent
  tool waits and runs again, any other ends `execution_interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import jsonschema
from agentbus.runtime.logging import get_logger
from agentbus.runtime.tool_registry import (
    McpHttpTransport,
    McpServerDefinition,
    McpStdioTransport,
    SecretHeader,
    ToolDefinition,
)
from agentbus.tool_executor.adapters.mcp_stdio import (
    MALFORMED_MESSAGE,
    OVERSIZED_MESSAGE,
    StdioLimits,
    sandboxed_stdio,
)
from agentbus.tool_executor.adapters.runners import clip_content
from agentbus.tool_executor.domain import argument_errors, argument_validator
from agentbus.tool_executor.ports import (
    EffectConnection,
    ToolInterruptedError,
    ToolInvocation,
    ToolNotStartedError,
    ToolOutput,
    TransientToolError,
)
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CONNECTION_CLOSED,
    PARSE_ERROR,
    REQUEST_TIMEOUT,
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    ResourceLink,
    ServerNotification,
    TextContent,
    Tool,
    ToolListChangedNotification,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

_log = get_logger(__name__)

_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 30.0
_MAX_LIST_PAGES = 50
_MAX_TEXT_BLOCK_CHARS = 200
_TOO_LARGE = "the server's answer is larger than"
"""How a JSON answer over HTTP cut off by its size is told from other parse errors (the SDK reports both so)."""


class McpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "agentbus_mcp_server_up",
            "1 while the executor is connected to the MCP server.",
            ["server"],
            registry=registry,
        )
        self.connects = Counter(
            "agentbus_mcp_server_connects_total",
            "Connection attempts to an MCP server, by outcome: connected or failed.",
            ["server", "outcome"],
            registry=registry,
        )
        self.tool_list_changes = Counter(
            "agentbus_mcp_tool_list_changes_total",
            "Times an MCP server said its tool list changed.",
            ["server"],
            registry=registry,
        )


def _one_line(exc: BaseException) -> str:
    """An error as one line; an exception group by its first leaf, which says what went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _backoff(failures: int) -> float:
    """Exponential backoff with jitter in its upper half (0.5 s doubling to 30 s)."""
    ceiling = min(_MAX_DELAY_SECONDS, _FIRST_DELAY_SECONDS * 2.0 ** min(failures, 16))
    return ceiling * (0.5 + 0.5 * random.random())


class NotConnectedError(Exception):
    """There is no connection to the server now: a call was not sent."""


class ConnectionLostError(Exception):
    """The connection ended while a call was in flight: the server may or may not have run it."""


class McpCallError(Exception):
    """The call got an answer that is not a tool result (a protocol error, a malformed or oversized answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LiveTool:
    """A tool as the server lists it now."""

    name: str
    description: str | None
    input_schema: dict[str, Any]
    arguments: jsonschema.Draft202012Validator | None
    """None when the server's schema is not a valid JSON Schema: then only the pinned one is checked."""


def _listing(tools: Mapping[str, LiveTool] | None) -> dict[str, tuple[str | None, dict[str, Any]]]:
    return {name: (tool.description, tool.input_schema) for name, tool in (tools or {}).items()}


def _live(tool: Tool) -> LiveTool:
    try:
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        validator: jsonschema.Draft202012Validator | None = argument_validator(tool.input_schema)
    except jsonschema.SchemaError:
        validator = None
    return LiveTool(tool.name, tool.description, tool.input_schema, validator)


class McpConnection:
    """The executor's connection to one MCP server."""

    def __init__(
        self,
        server: McpServerDefinition,
        environ: Mapping[str, str],
        metrics: McpMetrics,
        *,
        python: str = sys.executable,
    ) -> None:
        self.server = server
        self._environ = environ
        self._metrics = metrics
        self._python = python
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._relist = False
        self._broken: str | None = None
        self._tools: dict[str, LiveTool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._made = False
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def connected(self) -> bool:
        return self._client is not None and self._broken is None

    def live_tool(self, tool: str) -> LiveTool | None:
        return None if self._tools is None else self._tools.get(tool)

    @property
    def listed(self) -> bool:
        """Whether the server's tools have been listed on this connection."""
        return self._tools is not None and self.connected

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name=f"mcp:{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self.connected

    # --- calls -------------------------------------------------------------------------------------------

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> CallToolResult:
        client = self._client
        if client is None or self._broken is not None:
            raise NotConnectedError(self.last_error or "not connected yet")
        try:
            return await client.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self._mark_broken(f"the connection closed during a call: {exc.message}")
                raise ConnectionLostError(self._broken or exc.message) from exc
            if exc.code == REQUEST_TIMEOUT:
                raise TimeoutError(exc.message) from exc
            if exc.code == OVERSIZED_MESSAGE or (exc.code == PARSE_ERROR and _TOO_LARGE in exc.message):
                raise McpCallError("result_too_large", exc.message) from exc
            if exc.code in (MALFORMED_MESSAGE, PARSE_ERROR):
                # PARSE_ERROR is what the SDK's HTTP transport reports for an answer it could not read.
                raise McpCallError("malformed_result", f"the server's answer is not valid: {exc.message}") from exc
            raise McpCallError("server_error", f"the server refused the call ({exc.code}): {exc.message}") from exc
        except ValidationError as exc:
            raise McpCallError(
                "malformed_result", f"the server's answer is not a tool result: {exc.errors()[0]['msg']}"
            ) from exc
        except RuntimeError as exc:
            # The SDK's own checks of an answer: structured content against the tool's output schema, or a
            # request for input the executor cannot give.
            raise McpCallError("malformed_result", str(exc)[:500]) from exc

    def _mark_broken(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
            self.last_error = why
            self._wake.set()

    # --- the connection's life ---------------------------------------------------------------------------

    async def _maintain(self) -> None:
        failures = 0
        while True:
            self._made = False
            try:
                await self._connection()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = self._broken or _one_line(exc)
            finally:
                self._client = None
                self._tools = None
                self._connected.clear()
                self._metrics.up.labels(self.name).set(0)
            if self._made:
                failures = 0
            else:
                self._metrics.connects.labels(self.name, "failed").inc()
            delay = _backoff(failures)
            failures += 1
            # One line per attempt, no traceback: an outage is a state, not a bug.
            _log.warning(
                "mcp_server_unavailable", server=self.name, error=self.last_error, retry_in_seconds=round(delay, 2)
            )
            await asyncio.sleep(delay)

    async def _connection(self) -> None:
        """Connect, list the tools, and serve until the connection ends."""
        self._broken = None
        self._relist = False
        # One cancel scope around the connection's whole life (its task groups open and close inside it): its
        # deadline bounds the handshake and the first listing, and is lifted once they are done.
        with anyio.CancelScope(deadline=anyio.current_time() + self.server.connect_timeout_seconds) as scope:
            async with AsyncExitStack() as stack:
                client = Client(self._transport(stack), mode="auto", cache=None, message_handler=self._on_message)
                await stack.enter_async_context(client)
                tools = await self._list(client)
                scope.deadline = math.inf
                self._serve(client, tools)
                async with anyio.create_task_group() as tasks:
                    capabilities = client.server_capabilities.tools
                    if (
                        client.protocol_version in MODERN_PROTOCOL_VERSIONS
                        and capabilities
                        and capabilities.list_changed
                    ):
                        tasks.start_soon(self._listen, client)
                    await self._watch(client)
                    tasks.cancel_scope.cancel()
        if scope.cancelled_caught and not self._made:
            raise TimeoutError(f"no answer to the handshake within {self.server.connect_timeout_seconds:g} s")

    def _serve(self, client: Client, tools: dict[str, LiveTool]) -> None:
        self._tools = tools
        self._client = client
        self._made = True
        self._connected.set()
        self._metrics.up.labels(self.name).set(1)
        self._metrics.connects.labels(self.name, "connected").inc()
        _log.info("mcp_server_connected", server=self.name, protocol=client.protocol_version, tools=sorted(tools))
        self._compare(tools)

    def _transport(self, stack: AsyncExitStack) -> Any:
        transport = self.server.transport
        if isinstance(transport, McpStdioTransport):
            folder = str(self.server.source.parent) if self.server.source is not None else "."

            def expand(text: str) -> str:
                return text.replace("{python}", self._python).replace("{dir}", folder)

            limits = StdioLimits(
                transport.max_memory_mb,
                transport.max_file_size_mb,
                transport.max_open_files,
                self.server.max_message_bytes,
            )
            return sandboxed_stdio(
                [expand(transport.command), *(expand(arg) for arg in transport.args)],
                transport.env,
                transport.secret_env,
                self._environ,
                limits,
                on_closed=self._mark_broken,
            )
        assert isinstance(transport, McpHttpTransport)
        http = httpx2.AsyncClient(
            headers=self._headers(transport),
            timeout=httpx2.Timeout(self.server.connect_timeout_seconds, read=None),
            transport=_CappedTransport(httpx2.AsyncHTTPTransport(), self.server.max_message_bytes),
        )
        stack.push_async_callback(http.aclose)
        return streamable_http_client(transport.url, http_client=http, max_sse_event_size=self.server.max_message_bytes)

    def _headers(self, transport: McpHttpTransport) -> dict[str, str]:
        headers = {}
        for name, value in transport.headers.items():
            if isinstance(value, SecretHeader):
                headers[name] = value.prefix + self._environ.get(value.secret_env, "")
            else:
                headers[name] = value
        return headers

    async def _list(self, client: Client) -> dict[str, LiveTool]:
        tools: dict[str, LiveTool] = {}
        cursor: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.update((tool.name, _live(tool)) for tool in page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return tools

    def _compare(self, tools: Mapping[str, LiveTool]) -> None:
        """Log how the server's tools differ from those pinned in its file."""
        for name in self.server.exposed:
            pinned = self.server.tools[name]
            live = tools.get(name)
            if live is None:
                _log.error("mcp_tool_missing", server=self.name, tool=name, listed=sorted(tools))
            elif live.input_schema != pinned.parameters:
                _log.warning(
                    "mcp_tool_schema_changed",
                    server=self.name,
                    tool=name,
                    pinned=pinned.parameters,
                    listed=live.input_schema,
                )
        unpinned = sorted(set(tools) - set(self.server.tools))
        if unpinned:
            _log.info("mcp_tools_not_pinned", server=self.name, tools=unpinned)

    async def _watch(self, client: Client) -> None:
        """Until the connection ends: list the tools again when the server says they changed, and every
        `probe_every_seconds` while idle, which also finds a server that stopped answering (MCP's ping is gone
        from the current protocol version, and listing tools works in every version)."""
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.server.probe_every_seconds):
                    await self._wake.wait()
            if self._broken is not None:
                return
            try:
                with anyio.fail_after(self.server.connect_timeout_seconds):
                    announced, self._relist = self._relist, False
                    tools = await self._list(client)
            except MCPError as exc:
                if exc.code != CONNECTION_CLOSED:
                    raise
                self._mark_broken(f"the connection closed: {exc.message}")
                return
            if announced:
                self._metrics.tool_list_changes.labels(self.name).inc()
            previous, self._tools = self._tools, tools
            if announced or _listing(previous) != _listing(tools):
                _log.info("mcp_tools_changed", server=self.name, tools=sorted(tools), announced=announced)
                self._compare(tools)

    async def _listen(self, client: Client) -> None:
        async with client.listen(tools_list_changed=True) as subscription:
            async for _ in subscription:
                self._relisten()

    async def _on_message(self, message: ServerNotification | Exception) -> None:
        if isinstance(message, ToolListChangedNotification):
            self._relisten()
        elif isinstance(message, Exception):
            _log.warning("mcp_transport_error", server=self.name, error=str(message)[:300])

    def _relisten(self) -> None:
        self._relist = True
        self._wake.set()


class _ResponseTooLargeError(httpx2.StreamError):
    pass


class _CappedTransport(httpx2.AsyncBaseTransport):
    """Refuses a JSON answer larger than the server may send (SSE events are bounded by the SDK itself)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, cap: int) -> None:
        self._inner = inner
        self._cap = cap

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if not response.headers.get("content-type", "").lower().startswith("application/json"):
            return response
        response.stream = _CappedStream(response.stream, self._cap)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, cap: int) -> None:
        self._inner = inner
        self._cap = cap

    async def __aiter__(self) -> Any:
        size = 0
        async for chunk in self._inner:
            size += len(chunk)
            if size > self._cap:
                raise _ResponseTooLargeError(f"{_TOO_LARGE} the {self._cap} bytes it may send")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- the runner --------------------------------------------------------------------------------------


def _describe(block: Any) -> str:
    """One content block as text the model can read; binary data is named, never inlined."""
    if isinstance(block, TextContent):
        return block.text
    if isinstance(block, ImageContent | AudioContent):
        kind = "image" if isinstance(block, ImageContent) else "audio"
        return f"[{kind} {block.mime_type}, about {len(block.data) * 3 // 4} bytes, not shown]"
    if isinstance(block, ResourceLink):
        return f"[resource {block.uri}{f' ({block.name})' if block.name else ''}]"
    if isinstance(block, EmbeddedResource):
        resource = block.resource
        text = getattr(resource, "text", None)
        if isinstance(text, str):
            return text
        return f"[resource {resource.uri}, {resource.mime_type or 'binary'}]"
    return f"[{getattr(block, 'type', 'unknown')} content]"


def result_text(result: CallToolResult) -> str:
    """What the model reads of a tool result: its content blocks, or its structured content as JSON."""
    parts = [_describe(block) for block in result.content]
    text = "\n".join(part for part in parts if part)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, ensure_ascii=False, sort_keys=True)
    return clip_content(text)


def server_unavailable(server: str) -> str:
    return f"the MCP server {server!r}"


class McpRunner:
    """Runs `mcp` tools over the connections to their servers, and gates calls on those connections."""

    def __init__(self, connections: Mapping[str, McpConnection]) -> None:
        self.connections = connections

    def _connection(self, definition: ToolDefinition) -> McpConnection:
        assert definition.mcp is not None
        return self.connections[definition.mcp.server]

    def unavailable(self, definition: ToolDefinition) -> str | None:
        """What the tool waits for when its server is not connected now (nothing is sent then)."""
        connection = self._connection(definition)
        return None if connection.listed else server_unavailable(connection.name)

    async def wait(self, definition: ToolDefinition, timeout: float) -> bool:
        """Wait up to `timeout` for the tool's server; whether it is connected now."""
        return await self._connection(definition).wait_connected(timeout)

    async def run(
        self, definition: ToolDefinition, invocation: ToolInvocation, connection: EffectConnection | None
    ) -> ToolOutput:
        assert definition.mcp is not None
        server = self._connection(definition)
        tool = definition.mcp.tool
        waiting_for = server_unavailable(server.name)
        if not server.listed:
            raise ToolNotStartedError("server_unavailable", f"{waiting_for} is not connected", waiting_for=waiting_for)
        live = server.live_tool(tool)
        if live is None:
            return ToolOutput.failure(
                "tool_unavailable",
                f"{waiting_for} does not offer the tool {tool!r} now; the call was not sent",
            )
        if live.arguments is not None and (errors := argument_errors(live.arguments, invocation.arguments)):
            content = (
                f"The call to {definition.name!r} was not run: the server's current schema for the tool rejects "
                "its arguments.\n" + "\n".join(f"- {line}" for line in errors)
            )
            return ToolOutput(False, content, "invalid_arguments", "; ".join(errors))
        try:
            result = await server.call(tool, dict(invocation.arguments), definition.timeout_seconds)
        except NotConnectedError as exc:
            raise ToolNotStartedError("server_unavailable", str(exc), waiting_for=waiting_for) from exc
        except ConnectionLostError as exc:
            raise ToolInterruptedError("server_unavailable", str(exc), waiting_for=waiting_for) from exc
        except TimeoutError as exc:
            raise TransientToolError(
                "timeout", f"{definition.name!r} did not answer within {definition.timeout_seconds:g} s"
            ) from exc
        except McpCallError as exc:
            return ToolOutput.failure(exc.code, exc.message)
        text = result_text(result)
        if result.is_error:
            first = text.strip().splitlines()[0][:_MAX_TEXT_BLOCK_CHARS] if text.strip() else "no message"
            return ToolOutput(False, text or "The tool reported an error.", "tool_error", first)
        return ToolOutput(True, text)
