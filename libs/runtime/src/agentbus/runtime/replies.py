"""Core-NATS request/reply: subscriptions shared by a service's replicas, answered `concurrency` at a time."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agentbus.contracts.registry import Header
from agentbus.runtime.logging import get_logger
from agentbus.runtime.tracing import TraceContext
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

_log = get_logger(__name__)


@dataclass(frozen=True)
class Request:
    """A core-NATS request as a handler sees it."""

    subject: str
    data: bytes
    trace: TraceContext | None


ReplyHandler = Callable[[Request], Awaitable[BaseModel | None]]


class ReplyServer:
    """Answers core-NATS requests in a queue group, at most `concurrency` at a time.

    A handler may answer None: then nothing is sent, and the requester times out and asks again (a budget
    partition's owner must not answer what it has not committed; a replica that just lost a partition has
    nothing it may say, and the next request reaches the new owner).

    A handler returns an awaitable. A coroutine runs in a task of its own; a future (the hot path, which
    queues its work when called) is only waited for: when it completes, its reply joins the outbox, which one
    task publishes in order. Thousands of requests a second then cost no task each.
    """

    def __init__(self, nc: NatsClient, queue_group: str, *, concurrency: int) -> None:
        self._nc = nc
        self._queue_group = queue_group
        self._slots = asyncio.Semaphore(concurrency)
        self._subscriptions: list[Subscription] = []
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return bool(self._subscriptions) and self._nc.is_connected

    async def serve(self, subject: str, handler: ReplyHandler) -> None:
        if self._publisher is None:
            self._publisher = asyncio.create_task(self._publish_outbox(), name=f"replies:{subject}")

        async def dispatch(msg: Msg) -> None:
            await self._slots.acquire()
            headers = msg.headers
            trace = TraceContext.parse(headers.get(Header.TRACEPARENT.value)) if headers else None
            try:
                answer = handler(Request(msg.subject, msg.data, trace))
            except Exception:
                self._slots.release()
                _log.exception("request_failed", subject=msg.subject)
                return
            future = answer if isinstance(answer, asyncio.Future) else asyncio.ensure_future(answer)
            self._in_flight.add(future)
            future.add_done_callback(functools.partial(self._answered, msg.reply, msg.subject))

        self._subscriptions.append(await self._nc.subscribe(subject, queue=self._queue_group, cb=dispatch))
        # Serving means the server routes requests here: until it has the subscription, a request sent the
        # moment the service reports ready finds no responders. A flush that fails (a connection lost) is
        # no loss: the client subscribes again when it reconnects.
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=5)

    def _answered(self, reply_to: str, subject: str, future: asyncio.Future[BaseModel | None]) -> None:
        self._in_flight.discard(future)
        self._slots.release()
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            # Handlers answer every expected failure with an error reply; what reaches here is a bug. The
            # requester times out and asks again.
            _log.error("request_failed", subject=subject, error=repr(error))
            return
        reply = future.result()
        if reply is not None and reply_to:
            self._outbox.append((reply_to, reply.model_dump_json().encode()))
            self._outbox_ready.set()

    async def _publish_outbox(self) -> None:
        outbox = self._outbox
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                reply_to, data = outbox.popleft()
                try:
                    await self._nc.publish(reply_to, data)
                except Exception as exc:  # a lost connection: the requester times out and asks again
                    _log.warning("reply_failed", error=repr(exc))

    async def stop(self, timeout: float) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout`, and send their replies."""
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        if self._publisher is not None:
            while self._outbox and self._nc.is_connected:
                await asyncio.sleep(0.01)
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
