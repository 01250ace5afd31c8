"""MiniLM forward passes in worker processes, and the workers' entry point.

The forward pass is numpy: its matrix products release the interpreter lock, but the many small steps
between them hold it, and on threads of the service they competed with the event loop, NATS and result
decoding. OpenBLAS' helper threads also cost more than they give on a short query's small products (one
query: 16 ms of CPU for 8 ms of wall time with two BLAS threads, 13 ms of CPU with one). Each worker is a
process of its own with one BLAS thread (set before numpy loads), so embeddings never take the service's
lock, and `workers` processes use that many cores.

Protocol on the worker's standard input and output: a request is a 4-byte big-endian length and a UTF-8
JSON list of texts; a reply is a status byte (0 ok, 1 error), a 4-byte length, then the float32 matrix
(rows of `dimension`) or an error message. The worker ends when its input closes.

    python -m agentbus.retriever.adapters.embedding_workers
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from agentbus.retriever.ports import EmbeddingError
from agentbus.runtime.logging import get_logger
from numpy.typing import NDArray

Matrix = NDArray[np.float32]
READY = b"ready\n"
OK, FAILED = 0, 1
QUERY_PRIORITY, DOCUMENT_PRIORITY = 0, 1
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_HEADER = struct.Struct(">I")
_log = get_logger(__name__)


@dataclass(order=True)
class _Job:
    priority: int
    sequence: int
    texts: list[str] = field(compare=False)
    done: asyncio.Future[Matrix] = field(compare=False)


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def embed(self, texts: list[str], dimension: int) -> Matrix:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        body = json.dumps(texts).encode()
        self.process.stdin.write(_HEADER.pack(len(body)) + body)
        await self.process.stdin.drain()
        status = (await self.process.stdout.readexactly(1))[0]
        (length,) = _HEADER.unpack(await self.process.stdout.readexactly(_HEADER.size))
        payload = await self.process.stdout.readexactly(length)
        if status != OK:
            raise EmbeddingError(f"embedding worker failed: {payload.decode(errors='replace')}", retryable=False)
        return np.frombuffer(payload, dtype=np.float32).reshape(len(texts), dimension)


class EmbeddingWorkers:
    """`workers` processes taking jobs from one queue; queries go before documents."""

    def __init__(self, workers: int, *, dimension: int, batch_size: int) -> None:
        self._count = workers
        self._dimension = dimension
        self._batch_size = batch_size
        self._queue: list[_Job] = []
        self._ready = asyncio.Condition()
        self._sequence = itertools.count()
        self._workers: list[_Worker] = []
        self._loops: list[asyncio.Task[None]] = []
        self._alive = 0

    async def start(self) -> None:
        for _ in range(self._count):
            worker = await self._spawn()
            self._alive += 1
            self._loops.append(asyncio.create_task(self._serve(worker)))

    async def _spawn(self) -> _Worker:
        env = {**os.environ, **SINGLE_THREAD_ENV, "AGENTBUS_EMBEDDING_BATCH_SIZE": str(self._batch_size)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Its own session, so signals sent to the service's process group leave it to the service,
            # which still needs it while draining; the worker ends when its input closes.
            start_new_session=True,
        )
        assert process.stdout is not None
        if await process.stdout.readline() != READY:
            process.kill()
            await process.wait()
            raise EmbeddingError("an embedding worker did not start", retryable=False)
        worker = _Worker(process)
        self._workers.append(worker)
        return worker

    async def embed(self, texts: Sequence[str], priority: int) -> Matrix:
        if not self._alive:
            raise EmbeddingError("no embedding worker is running", retryable=True)
        job = _Job(priority, next(self._sequence), list(texts), asyncio.get_running_loop().create_future())
        async with self._ready:
            heapq.heappush(self._queue, job)
            self._ready.notify()
        return await job.done

    async def _serve(self, worker: _Worker) -> None:
        while True:
            async with self._ready:
                await self._ready.wait_for(lambda: bool(self._queue))
                job = heapq.heappop(self._queue)
            if job.done.cancelled():
                continue
            try:
                result = await worker.embed(job.texts, self._dimension)
            except (EmbeddingError, OSError, asyncio.IncompleteReadError) as exc:
                if not job.done.done():
                    job.done.set_exception(
                        exc if isinstance(exc, EmbeddingError) else EmbeddingError(repr(exc), retryable=True)
                    )
                if not isinstance(exc, EmbeddingError):
                    # The process is gone (killed, out of memory): replace it, or stop serving if that fails.
                    self._workers.remove(worker)
                    try:
                        worker = await self._spawn()
                    except (EmbeddingError, OSError):
                        _log.exception("embedding_worker_not_replaced")
                        self._worker_gone()
                        return
                continue
            if not job.done.done():
                job.done.set_result(result)

    def _worker_gone(self) -> None:
        """A worker could not be replaced: when none is left, queued jobs fail instead of waiting for ever."""
        self._alive -= 1
        if not self._alive:
            self._fail_queued()

    def _fail_queued(self) -> None:
        for job in self._queue:
            if not job.done.done():
                job.done.set_exception(EmbeddingError("no embedding worker is running", retryable=True))
        self._queue.clear()

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
        for worker in self._workers:
            if worker.process.stdin is not None:
                worker.process.stdin.close()
        for worker in self._workers:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout=10)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        self._workers.clear()
        self._alive = 0
        self._fail_queued()


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The worker: load the model, then answer requests until the input closes."""
    from agentbus.retriever.adapters.minilm import MiniLmEmbedder

    embedder = MiniLmEmbedder(batch_size=int(os.environ.get("AGENTBUS_EMBEDDING_BATCH_SIZE", "16")))
    embedder.load()
    stdout.write(READY)
    stdout.flush()
    while (header := _read_exactly(stdin, _HEADER.size)) is not None:
        body = _read_exactly(stdin, _HEADER.unpack(header)[0])
        if body is None:
            return
        try:
            payload, status = embedder.embed_sync(json.loads(body)).astype(np.float32).tobytes(), OK
        except Exception as exc:  # the parent gets every failure as a reply, and the worker goes on
            payload, status = repr(exc).encode(), FAILED
        stdout.write(bytes([status]) + _HEADER.pack(len(payload)) + payload)
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
