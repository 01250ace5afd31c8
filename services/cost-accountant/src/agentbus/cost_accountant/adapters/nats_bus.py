"""The accountant on NATS: its alerts onto JetStream, request/reply subscriptions that may stay silent, and a
consumer that hands whole fetches of usage records to their handler."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from agentbus.contracts.budget import BudgetAlert
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import BUDGET_ALERT, ConsumerSpec, Header
from agentbus.cost_accountant.ports import InboundMessage
from agentbus.runtime.consumer import (
    NATS_OUTAGE_ERRORS,
    RETRIES_EXHAUSTED_CODE,
    AckPolicy,
    Delivery,
    dependency_retry_delay,
)
from agentbus.runtime.deadletter import dead_letter
from agentbus.runtime.errors import DependencyUnavailableError, RetryableError, TerminalError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.publishing import publish_message
from agentbus.runtime.replies import Request
from agentbus.runtime.tracing import TraceContext
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from pydantic import BaseModel

_log = get_logger(__name__)

OptionalReplyHandler = Callable[[Request], Awaitable[BaseModel | None]]


class JetStreamAlertSink:
    """Publishes budget alerts with `Nats-Msg-Id` = alert id, so a repeat is dropped by the stream."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, alert: BudgetAlert) -> None:
        await publish_message(self._js, BUDGET_ALERT.format(tenant=alert.tenant), alert, msg_id=alert.alert_id)


class Responder:
    """Answers core-NATS requests in a queue group, at most `concurrency` at a time.

    Unlike the runtime's `ReplyServer`, a handler may answer None: then nothing is sent. A budget partition's
    owner must not answer what it has not committed, and a replica that just lost a partition has nothing
    it may say; the requester times out and asks again, reaching the new owner.

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

    async def serve(self, subject: str, handler: OptionalReplyHandler) -> None:
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


BatchHandler = Callable[[list[InboundMessage]], Awaitable[list[Exception | None]]]
"""Handles a whole fetch: per message None (done: ack it) or the exception it would have raised alone."""


class BatchConsumer:
    """A durable pull consumer whose handler takes each fetch whole, for messages that are written together
    anyway (usage records share one group commit): one decode pass, one operation and one wait per fetch,
    where a consumer handling messages one by one spends a task, a future and a context per message.

    What happens to each message is the runtime consumer's rule (agentbus.runtime.consumer): acked with
    `ack_policy` once handled; a `TerminalError` is dead-lettered at once; a `DependencyUnavailableError` is
    redelivered with backoff for as long as it takes; any other failure is retried after the spec's delay and
    dead-lettered after `max_deliver`. Up to `in_flight` fetches are handled at once.
    """

    def __init__(
        self,
        js: JetStreamContext,
        spec: ConsumerSpec,
        handler: BatchHandler,
        *,
        ack_policy: AckPolicy,
        metrics: ConsumerMetrics,
        batch: int,
        in_flight: int,
        fetch_timeout: float = 2.0,
    ) -> None:
        self._js = js
        self._spec = spec
        self._handler = handler
        self._ack_policy = ack_policy
        self._metrics = metrics
        self._batch = batch
        self._slots = asyncio.Semaphore(in_flight)
        self._fetch_timeout = fetch_timeout
        self._sub: JetStreamContext.PullSubscription | None = None
        self._loop: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def spec(self) -> ConsumerSpec:
        return self._spec

    @property
    def running(self) -> bool:
        return self._sub is not None and self._loop is not None and not self._loop.done()

    async def start(self) -> None:
        """Bind to the durable consumer (created by the bootstrap, never here) and start pulling."""
        self._sub = await self._js.pull_subscribe_bind(durable=self._spec.durable, stream=self._spec.stream)
        self._loop = asyncio.create_task(self._pull(), name=f"pull:{self._spec.durable}")

    async def stop(self, drain_timeout: float) -> None:
        """Stop pulling, let the fetches in hand finish for up to `drain_timeout`, then unbind. Whatever is
        left unacked is redelivered to the next owner."""
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _pull(self) -> None:
        assert self._sub is not None
        while not self._stopping:
            await self._slots.acquire()
            try:
                msgs = await self._sub.fetch(self._batch, timeout=self._fetch_timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                self._slots.release()
                continue
            except nats.errors.ConnectionClosedError:
                self._slots.release()
                return
            except Exception as exc:  # a reconnect or a server hiccup: keep pulling
                self._slots.release()
                _log.warning("fetch_failed", consumer=self._spec.durable, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._handle(msgs))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("batch_handling_failed", consumer=self._spec.durable, error=repr(error))

    async def _handle(self, msgs: list[Msg]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._handler([InboundMessage(msg.subject, msg.data) for msg in msgs])
        except Exception as exc:
            _log.exception("handler_failed", consumer=self._spec.durable)
            outcomes = [exc] * len(msgs)
        self._metrics.handler_seconds.labels(self._spec.durable).observe(time.perf_counter() - started)
        durable = self._spec.durable
        acked = 0
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if outcome is None:
                await (msg.ack_sync() if self._ack_policy is AckPolicy.ACK_SYNC else msg.ack())
                acked += 1
                continue
            # Only a message that failed is read whole (its delivery count and stream sequence).
            delivery = _delivery(msg)
            if isinstance(outcome, TerminalError):
                await self._give_up(msg, delivery, ErrorInfo(code=outcome.code, message=outcome.message))
            elif isinstance(outcome, DependencyUnavailableError):
                with contextlib.suppress(*NATS_OUTAGE_ERRORS):
                    await msg.nak(delay=dependency_retry_delay(self._spec, delivery.deliveries))
                self._metrics.handled.labels(durable, "waiting").inc()
            else:
                delay = outcome.delay_seconds if isinstance(outcome, RetryableError) else None
                await self._retry_or_give_up(msg, delivery, outcome, delay)
        if acked:
            self._metrics.handled.labels(durable, "acked").inc(acked)
        if any(isinstance(outcome, DependencyUnavailableError) for outcome in outcomes):
            # One line per fetch that waits, no traceback: an outage is a state, not a bug.
            reason = next(str(o) for o in outcomes if isinstance(o, DependencyUnavailableError))
            _log.warning("dependency_unavailable", consumer=durable, reason=reason, messages=len(outcomes))

    async def _retry_or_give_up(self, msg: Msg, delivery: Delivery, error: Exception, delay: float | None) -> None:
        if delivery.deliveries >= self._spec.max_deliver:
            message = f"gave up after {delivery.deliveries} deliveries; last error: {error!r}"
            await self._give_up(msg, delivery, ErrorInfo(code=RETRIES_EXHAUSTED_CODE, message=message))
            return
        await msg.nak(delay=delay if delay is not None else self._spec.retry_delay_seconds)
        self._metrics.handled.labels(self._spec.durable, "retried").inc()

    async def _give_up(self, msg: Msg, delivery: Delivery, error: ErrorInfo) -> None:
        try:
            await dead_letter(self._js, self._spec, delivery, error)
        except Exception:
            # The dead letter was not stored: keep the message and try again later rather than lose it.
            _log.exception("dead_letter_failed", consumer=self._spec.durable)
            await msg.nak(delay=self._spec.retry_delay_seconds)
            return
        await msg.ack_sync()
        _log.warning("dead_lettered", consumer=self._spec.durable, code=error.code, reason=error.message)
        self._metrics.handled.labels(self._spec.durable, "dead_lettered").inc()
        self._metrics.dead_letters.labels(self._spec.durable, error.code).inc()


def _delivery(msg: Msg) -> Delivery:
    metadata = msg.metadata
    headers = dict(msg.headers or {})
    return Delivery(
        subject=msg.subject,
        data=msg.data,
        headers=headers,
        deliveries=metadata.num_delivered,
        stream_seq=metadata.sequence.stream,
        trace=TraceContext.parse(headers.get(Header.TRACEPARENT.value)),
    )
