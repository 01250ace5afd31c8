"""Generated text out in small chunks while a step runs: flushed by size or every interval.

One message per token would cost a JetStream publish per token (tens per second per request, times
the requests in flight); one chunk every ~75 ms or every few dozen characters keeps the stream live for a
reader and the publish rate bounded.

Chunks are numbered 1, 2, 3, ... within a step and published with `Nats-Msg-Id: token:<request_id>:<chunk>`.
After a redelivery the handler passes what the earlier attempt already published (`resume`): the new
attempt skips that much text and numbers on from the next chunk, so a deterministic engine's stream reads
as one uninterrupted text. A non-deterministic engine (sampling, or a batched GPU engine whose numerics
vary with the batch) may generate different text the second time: the stream then continues at the right
offset but with the new attempt's words. Token events are a live preview; the step's result is the text
of record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agentbus.runtime.logging import get_logger

_log = get_logger(__name__)

PublishChunk = Callable[[int, str], Awaitable[None]]
"""Publishes chunk number `chunk` with `text`."""


def token_msg_id(request_id: str, chunk: int) -> str:
    """The dedupe id of a token chunk: a regenerated request republishing chunk n is dropped."""
    return f"token:{request_id}:{chunk}"


@dataclass(frozen=True)
class StreamedSoFar:
    """What earlier attempts of a request already published: chunks 1..last_chunk holding `text`."""

    last_chunk: int = 0
    text: str = ""


def contiguous_prefix(chunks: dict[int, str]) -> StreamedSoFar:
    """Chunks 1, 2, ... up to the first gap, joined: what a reader of the stream has seen in order."""
    text: list[str] = []
    chunk = 1
    while chunk in chunks:
        text.append(chunks[chunk])
        chunk += 1
    return StreamedSoFar(chunk - 1, "".join(text))


class TokenStream:
    """Buffers text from the engine (`write`, never blocking) and publishes it from a background task."""

    def __init__(
        self,
        publish: PublishChunk,
        *,
        flush_chars: int,
        flush_interval_seconds: float,
        resume: StreamedSoFar | None = None,
    ) -> None:
        self._publish = publish
        self._flush_chars = flush_chars
        self._interval = flush_interval_seconds
        resume = resume or StreamedSoFar()
        self._next_chunk = resume.last_chunk + 1
        self._skip = len(resume.text)
        self._buffer: list[str] = []
        self._buffered = 0
        self._full = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.published_chunks = 0

    def start(self) -> None:
        """Start the flusher. Text written before is kept."""
        self._task = asyncio.create_task(self._flush_loop(), name="token-stream")

    def write(self, text: str) -> None:
        """Take the next piece of generated text. Called by the engine on its hot path."""
        if self._skip:
            skipped = min(self._skip, len(text))
            self._skip -= skipped
            text = text[skipped:]
        if not text:
            return
        self._buffer.append(text)
        self._buffered += len(text)
        if self._buffered >= self._flush_chars:
            self._full.set()

    async def close(self) -> None:
        """Publish what is buffered, then stop the flusher."""
        self._closing = True
        self._full.set()
        if self._task is not None:
            await self._task
            self._task = None
        else:
            await self._flush()

    async def _flush_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self._interval)
            self._full.clear()
            await self._flush()
        await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        chunk = self._next_chunk
        self._next_chunk += 1
        try:
            await self._publish(chunk, text)
            self.published_chunks += 1
        except Exception as exc:
            # Token events are a preview: a lost chunk leaves a gap a reader can see, never a failed step.
            _log.warning("token_chunk_not_published", chunk=chunk, error=repr(exc))
