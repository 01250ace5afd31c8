"""An MCP server for the executor's tests, built on the official `mcp` SDK: well-behaved tools, tools that
leave a trace in a file (so a test can count runs and kill the server mid-call), tools whose list changes at
run time, and tools that misbehave (huge answers, malformed messages, errors: over HTTP, `garbled` and
`misshapen` are answered by a wrapper of the server's app, as a broken server would).

    python mcp_test_server.py [--transport stdio|streamable-http] [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

server = MCPServer("testsrv")
_wire: list[int] = []
"""A duplicate of the stdio wire, taken before the SDK diverts file descriptor 1 to stderr while it serves."""


def _write_wire(line: str) -> None:
    os.write(_wire[0], line.encode("utf-8"))


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def echo(text: str) -> str:
    """Say the text back."""
    return f"echo: {text}"


def _append(path: str, key: str) -> bool:
    """Append `key` and this process's pid to the file; whether the key was not there before."""
    trace = Path(path)
    first = not trace.exists() or not any(line.split()[0] == key for line in trace.read_text().splitlines())
    with trace.open("a", encoding="utf-8") as lines:
        lines.write(f"{key} {os.getpid()}\n")
    return first


async def _record(path: str, key: str, sleep: float) -> str:
    if _append(path, key):
        await asyncio.sleep(sleep)
    return f"recorded {key}"


@server.tool()
async def record(path: str, key: str, sleep: float = 0.0) -> str:
    """Append a line to a file; the first time for this key, wait `sleep` seconds: not safe to run twice."""
    return await _record(path, key, sleep)


@server.tool()
async def record_again(path: str, key: str, sleep: float = 0.0) -> str:
    """Append a line to a file; the first time for this key, wait (its file declares it idempotent)."""
    return await _record(path, key, sleep)


@server.tool()
def huge(size: int) -> str:
    """Answer with `size` characters."""
    return "x" * size


@server.tool()
async def garbled(ctx: Context) -> str:
    """Write a malformed answer to this very request on stdout, then the real one follows (too late)."""
    broken = '{"jsonrpc": "2.0", "id": ' + json.dumps(_wire_id(ctx.request_id)) + ', "result": {"content": [\n'
    _write_wire(broken)
    await asyncio.sleep(0.2)
    return "too late"


@server.tool()
async def misshapen(ctx: Context) -> str:
    """Answer this very request with a JSON-RPC result that is not a tool result, then the real one (too late)."""
    wrong = {"jsonrpc": "2.0", "id": _wire_id(ctx.request_id), "result": {"content": "not a list", "isError": 3}}
    _write_wire(json.dumps(wrong) + "\n")
    await asyncio.sleep(0.2)
    return "too late"


@server.tool()
def fail(message: str) -> str:
    """Fail with the message."""
    raise ToolError(message)


def late_tool(text: str) -> str:
    """A tool that exists only once `enroll` ran."""
    return f"late: {text}"


@server.tool()
async def enroll(ctx: Context) -> str:
    """Add `late_tool` and say the tool list changed."""
    server.add_tool(late_tool, name="late_tool")
    await ctx.notify_tools_changed()
    return "enrolled late_tool"


@server.tool()
async def retire(name: str, ctx: Context) -> str:
    """Remove a tool and say the tool list changed."""
    server.remove_tool(name)
    await ctx.notify_tools_changed()
    return f"retired {name}"


def _wire_id(request_id: str) -> int | str:
    return int(request_id) if request_id.lstrip("-").isdigit() else request_id


_BROKEN_ANSWERS = {
    "garbled": lambda request_id: (
        b'{"jsonrpc": "2.0", "id": ' + json.dumps(request_id).encode() + b', "result": {"content": ['
    ),
    "misshapen": lambda request_id: json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "result": {"content": "not a list", "isError": 3}}
    ).encode(),
}


def _broken_answer(body: bytes) -> bytes | None:
    """Over HTTP, the answer a broken server gives a call of `garbled` or `misshapen`; None for any other."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("method") != "tools/call":
        return None
    answer = _BROKEN_ANSWERS.get(str((request.get("params") or {}).get("name")))
    return None if answer is None else answer(request.get("id"))


class _Misbehaving:
    """An ASGI wrapper of the server's HTTP app that answers calls of `garbled` and `misshapen` itself."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        answer = _broken_answer(body)
        if answer is not None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": answer})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                message: dict[str, Any] = await receive()
                return message
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    if arguments.transport == "stdio":
        _wire.append(os.dup(1))
        server.run("stdio")
    else:
        app = _Misbehaving(server.streamable_http_app(host="127.0.0.1"))
        uvicorn.run(app, host="127.0.0.1", port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
