"""The stdio transport of MCP tool servers, sandboxed like `shell` tools and bounded like any untrusted peer.

The server runs in its own session and process group with `resource` limits (address space, file size, open
files, no core dumps), in a temporary working folder, with an environment built from scratch: nothing the
executor inherited (database URLs, NATS passwords, API keys) reaches it unless its file names it. When the
connection ends, its stdin is closed, then the whole process group is terminated, then killed.

What it writes is read line by line with a bound: a message longer than the server's `max_message_bytes`
is never held in memory. When the request it answers can be told from its first bytes, that request fails
with a clear error and the connection goes on; otherwise the connection ends. A line that is not JSON-RPC
fails the request it names the same way, and is otherwise dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from agentbus.runtime.logging import get_logger
from agentbus.tool_executor.adapters.sandbox import SAFE_PATH
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage
from mcp_types import ErrorData, JSONRPCError, jsonrpc_message_adapter
from pydantic import ValidationError

_log = get_logger(__name__)

OVERSIZED_MESSAGE = -32090
"""Error code of a request whose answer was larger than the server may send."""
MALFORMED_MESSAGE = -32091
"""Error code of a request whose answer was not a JSON-RPC message."""

_READ_CHUNK = 64 * 1024
_ID_SNIFF_BYTES = 4096
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.){0,200}")')
_STDIN_CLOSE_GRACE_SECONDS = 2.0
_TERMINATE_GRACE_SECONDS = 2.0
_STDERR_TAIL_BYTES = 2048


@dataclass(frozen=True)
class StdioLimits:
    max_memory_mb: int
    max_file_size_mb: int
    max_open_files: int
    max_message_bytes: int


def _limit_child(limits: StdioLimits) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work (setrlimit is).
    memory = limits.max_memory_mb * 1024 * 1024
    file_size = limits.max_file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def request_id_in(prefix: bytes) -> int | str | None:
    """The JSON-RPC id a message names in its first bytes, if it names one there."""
    match = _ID.search(prefix)
    if match is None:
        return None
    raw = match.group(1)
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, int | str) else None


def _failure(request_id: int | str, code: int, message: str) -> SessionMessage:
    return SessionMessage(JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message)))


class _Lines:
    """Splits what the server writes into lines of at most `cap` bytes; a longer one is skipped, its first
    bytes kept so that the request it answers can be named."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buffer = bytearray()
        self._skipping: bytearray | None = None
        self._skipping_size = 0

    def feed(self, chunk: bytes) -> list[bytes | tuple[bytes, int]]:
        """Complete lines, and `(first bytes, size)` for each line that was too long."""
        out: list[bytes | tuple[bytes, int]] = []
        while chunk:
            newline = chunk.find(b"\n")
            piece, chunk = (chunk, b"") if newline < 0 else (chunk[:newline], chunk[newline + 1 :])
            ended = newline >= 0
            if self._skipping is not None:
                self._skipping_size += len(piece)
                if ended:
                    out.append((bytes(self._skipping), self._skipping_size))
                    self._skipping = None
                continue
            self._buffer += piece
            if len(self._buffer) > self._cap:
                self._skipping = bytearray(self._buffer[:_ID_SNIFF_BYTES])
                self._skipping_size = len(self._buffer)
                self._buffer.clear()
                if ended:
                    out.append((bytes(self._skipping), self._skipping_size))
                    self._skipping = None
                continue
            if ended:
                out.append(bytes(self._buffer))
                self._buffer.clear()
        return out


def clean_environment(
    env: Mapping[str, str], secret_env: Mapping[str, str], environ: Mapping[str, str], workdir: str
) -> dict[str, str]:
    """The server's whole environment: a safe PATH, its own HOME and TMPDIR, the locale, then what its file
    names (`secret_env` values read from the executor's environment)."""
    clean = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    clean.update(env)
    clean.update({name: environ[variable] for name, variable in secret_env.items() if variable in environ})
    return clean


@asynccontextmanager
async def sandboxed_stdio(
    argv: list[str],
    env: Mapping[str, str],
    secret_env: Mapping[str, str],
    environ: Mapping[str, str],
    limits: StdioLimits,
    *,
    on_closed: Callable[[str], None],
) -> AsyncIterator[TransportStreams]:
    """Start the server and yield the session's streams; `on_closed(why)` is called once when its output ends."""
    with tempfile.TemporaryDirectory(prefix="agentbus-mcp-") as workdir:
        stderr_path = Path(workdir) / ".stderr"
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=workdir,
                env=clean_environment(env, secret_env, environ, workdir),
                start_new_session=True,
                preexec_fn=lambda: _limit_child(limits),
                close_fds=True,
            )
        pgid = process.pid  # start_new_session: the child leads its own session and process group
        read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_read, process, read_writer, limits.max_message_bytes, on_closed, stderr_path)
                tasks.start_soon(_write, process, write_reader)
                try:
                    yield read_stream, write_stream
                finally:
                    with anyio.CancelScope(shield=True):
                        await _stop(process, pgid)
                    tasks.cancel_scope.cancel()
        finally:
            _signal_group(pgid, signal.SIGKILL)
            for stream in (read_stream, write_stream, read_writer, write_reader):
                stream.close()


async def _read(
    process: asyncio.subprocess.Process,
    out: Any,
    cap: int,
    on_closed: Callable[[str], None],
    stderr_path: Path,
) -> None:
    assert process.stdout is not None
    lines = _Lines(cap)
    why = "the server closed its output"
    try:
        async with out:
            while chunk := await process.stdout.read(_READ_CHUNK):
                for line in lines.feed(chunk):
                    message = _message(line, cap)
                    if message is None:
                        continue
                    if isinstance(message, str):
                        why = message
                        return
                    await out.send(message)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        why = "the connection was closed"
    finally:
        on_closed(f"{why}{_stderr_tail(stderr_path)}")


def _message(line: bytes | tuple[bytes, int], cap: int) -> SessionMessage | str | None:
    """The session message of one line; a failure for the request a bad line names; None to drop it; a
    reason (str) to end the connection."""
    if isinstance(line, tuple):
        prefix, size = line
        request_id = request_id_in(prefix)
        if request_id is None:
            return f"the server sent a message of {size} bytes (more than {cap}) naming no request"
        _log.warning("mcp_message_too_large", size=size, limit=cap, request_id=request_id)
        return _failure(
            request_id, OVERSIZED_MESSAGE, f"the server's answer was {size} bytes, more than the {cap} it may send"
        )
    if not line.strip():
        return None
    try:
        return SessionMessage(jsonrpc_message_adapter.validate_json(line, by_name=False))
    except (ValidationError, ValueError) as exc:
        request_id = request_id_in(line[:_ID_SNIFF_BYTES])
        _log.warning("mcp_message_malformed", request_id=request_id, error=str(exc)[:200])
        if request_id is None:
            return None
        return _failure(request_id, MALFORMED_MESSAGE, "the server's answer is not a valid JSON-RPC message")


async def _write(process: asyncio.subprocess.Process, messages: Any) -> None:
    assert process.stdin is not None
    try:
        async with messages:
            async for message in messages:
                data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                process.stdin.write(data.encode("utf-8"))
                await process.stdin.drain()
    except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError, OSError):
        return


async def _stop(process: asyncio.subprocess.Process, pgid: int) -> None:
    """MCP's shutdown: close stdin, give the server a moment, then terminate and kill its whole group."""
    if process.stdin is not None:
        with contextlib.suppress(OSError, RuntimeError):
            process.stdin.close()
    for signum, grace in ((None, _STDIN_CLOSE_GRACE_SECONDS), (signal.SIGTERM, _TERMINATE_GRACE_SECONDS)):
        if signum is not None:
            _signal_group(pgid, signum)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await process.wait()
                break
    _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_TERMINATE_GRACE_SECONDS):
            await process.wait()


def _stderr_tail(path: Path) -> str:
    try:
        with path.open("rb") as stderr:
            stderr.seek(0, os.SEEK_END)
            size = stderr.tell()
            stderr.seek(max(0, size - _STDERR_TAIL_BYTES))
            tail = stderr.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f"; its last words: {tail[-500:]}" if tail else ""
