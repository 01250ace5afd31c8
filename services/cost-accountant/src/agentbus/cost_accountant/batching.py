"""Group concurrent writes into shared transactions without adding latency.

Each caller submits one item and awaits its own result. A single writer task takes everything queued (up
to `max_batch`) and writes it in one call; while that transaction commits, the next items queue up, so
batches grow with load and a lone item is written at once. If a batch fails, its items are written again
one by one, so one bad item cannot fail the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatchWriter(Generic[ItemT, ResultT]):
    """Calls `write(items) -> results` (same length, same order) on batches of submitted items."""

    def __init__(self, write: Callable[[list[ItemT]], Awaitable[list[ResultT]]], *, max_batch: int) -> None:
        self._write = write
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[ItemT, asyncio.Future[ResultT]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batch-writer")

    async def stop(self) -> None:
        """Stop after writing what is already queued."""
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, item: ItemT) -> ResultT:
        """Queue `item` and wait until it is written; raises what writing it raised."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batch writer is not running")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write_batch(self, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0][1], exc)
                return
            for pending in batch:
                await self._write_batch([pending])
            return
        for (_, future), result in zip(batch, results, strict=True):
            _resolve(future, result)


def _resolve(future: asyncio.Future[ResultT], result: ResultT) -> None:
    if not future.done():  # a cancelled submitter (a drain timeout) waits for nothing
        future.set_result(result)


def _fail(future: asyncio.Future[ResultT], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
