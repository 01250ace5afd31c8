"""Core-NATS request/reply: subscriptions shared by a service's replicas, each request answered in its own task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agentbus.contracts.registry import Header
from agentbus.runtime.logging import bind_message_context, get_logger
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


ReplyHandler = Callable[[Request], Awaitable[BaseModel]]


class ReplyServer:
    """Answers core-NATS requests in a queue group, `concurrency` at a time.

    nats-py runs a subscription's callback one message at a time, so each request is answered in its own
    task: a slow request does not hold up the others.
    """

    def __init__(self, nc: NatsClient, queue_group: str, *, concurrency: int) -> None:
        self._nc = nc
        self._queue_group = queue_group
        self._slots = asyncio.Semaphore(concurrency)
        self._subscriptions: list[Subscription] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def serving(self) -> bool:
        return bool(self._subscriptions) and self._nc.is_connected

    async def serve(self, subject: str, handler: ReplyHandler) -> None:
        async def dispatch(msg: Msg) -> None:
            await self._slots.acquire()
            task = asyncio.create_task(self._answer(msg, handler))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

        self._subscriptions.append(await self._nc.subscribe(subject, queue=self._queue_group, cb=dispatch))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _answer(self, msg: Msg, handler: ReplyHandler) -> None:
        trace = TraceContext.parse((msg.headers or {}).get(Header.TRACEPARENT.value))
        bind_message_context(subject=msg.subject, trace_id=trace.trace_id if trace else None)
        try:
            reply = await handler(Request(msg.subject, msg.data, trace))
            if msg.reply:
                await msg.respond(reply.model_dump_json().encode())
        except Exception:
            # Handlers answer every expected failure with an error reply; what reaches here is a bug or a
            # lost connection. The requester times out and asks again.
            _log.exception("request_failed", subject=msg.subject)

    async def stop(self, timeout: float) -> None:
        """Stop taking requests, then let those in flight finish for up to `timeout`."""
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
