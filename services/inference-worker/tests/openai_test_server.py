"""A small OpenAI-compatible chat completions server for tests: asyncio streams, one scripted reply per request.

Each incoming POST takes the next `Reply` from the queue: a status with a JSON body (and headers, such
as Retry-After), or a server-sent event stream of chunks with a pause between them. It records every
request body and whether the client hung up before the reply was complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] | None = None
    pause_seconds: float = 0.0
    hang: bool = False


def text_events(
    pieces: list[str], usage: tuple[int, int] | None = (7, 3), finish: str = "stop"
) -> list[dict[str, Any]]:
    """SSE chunks streaming `pieces` as content deltas, then the finish reason and usage."""
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        events.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
    return events


class OpenAITestServer:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(json.loads(body) if body else {})
            self.request_headers.append(headers)
            reply = self.replies.pop(0) if self.replies else Reply(status=500, body={"error": "no reply scripted"})
            await self._reply(reader, writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            self._hung_up()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _hung_up(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply) -> None:
        if reply.hang:
            # Wait for the client to give up: reading returns b"" when it closes the connection.
            await reader.read()
            self._hung_up()
            return
        if reply.events is None:
            payload = json.dumps(reply.body or {}).encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
            head = (
                f"HTTP/1.1 {reply.status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"{extra}Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        await writer.drain()
        for event in reply.events:
            if reply.pause_seconds:
                closed = asyncio.create_task(reader.read())
                done, _ = await asyncio.wait({closed}, timeout=reply.pause_seconds)
                if done:
                    self._hung_up()
                    return
                closed.cancel()
            writer.write(f"data: {json.dumps(event)}\n\n".encode())
            await writer.drain()
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
