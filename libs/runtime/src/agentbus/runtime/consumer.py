"""Durable pull consumers with an explicit ack policy, bounded concurrency and a dead-letter path.

A handler returns normally when the message's effects are done. It raises `DependencyUnavailableError` when
something it needs is down: the message is redelivered with exponential backoff and jitter, for as long
as it takes, and never dead-lettered for it (a lost connection to NATS counts as such an outage too). It
raises `RetryableError` (or any unexpected exception) to have the message redelivered after a delay, and
`TerminalError` when the message can never succeed. After the consumer's `max_deliver` deliveries of a
message that keeps failing for other reasons, or on a `TerminalError`, the message is copied with its error
and origin to the dead-letter stream and then acked, so it is neither lost nor redelivered forever.
Nothing is ever terminated silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

import nats.errors
import nats.js.errors
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import ConsumerSpec, Header
from agentbus.runtime.deadletter import dead_letter
from agentbus.runtime.errors import DependencyUnavailableError, RetryableError, TerminalError
from agentbus.runtime.logging import bind_message_context, get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.tracing import TraceContext
from nats.aio.msg import Msg
from nats.js import JetStreamContext

_log = get_logger(__name__)

RETRIES_EXHAUSTED_CODE = "max_deliver_exceeded"

# Errors of nats-py that mean "NATS is not reachable right now", not "this message is bad".
NATS_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    # A JetStream publish that no stream answered (a replicated stream between leaders, in a cluster) and
    # the JetStream API's 503: the stream is there again once a leader is elected.
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
DUPLICATE_IN_PROCESS_ERR_CODE = 10158
"""JetStream's 409 to a publish whose message id an earlier publish is still storing: in a cluster, a publish
retried across a failover while the first is still being replicated. It is stored once either way."""


def is_nats_outage(error: BaseException) -> bool:
    """Whether an error of nats-py means NATS (or a stream's leader) is briefly unavailable, not a bad message."""
    if isinstance(error, NATS_OUTAGE_ERRORS):
        return True
    return isinstance(error, nats.js.errors.APIError) and error.err_code == DUPLICATE_IN_PROCESS_ERR_CODE


def dependency_retry_delay(spec: ConsumerSpec, deliveries: int, rng: random.Random | None = None) -> float:
    """The nak delay after the n-th delivery failed on an unavailable dependency: exponential from the spec's
    first delay up to its maximum, with full jitter in the upper half so that waiting consumers do not all
    come back at once."""
    growth = 2.0 ** min(max(deliveries - 1, 0), 30)
    ceiling = min(spec.dependency_retry_max_seconds, spec.dependency_retry_first_seconds * growth)
    return ceiling * (0.5 + 0.5 * (rng or random).random())


class AckPolicy(StrEnum):
    """When and how a consumer acknowledges. Every consumer names one; there is no default.

    Both ack only after the handler succeeded; a failure is a delayed nak, then a dead letter.
    """

    ACK = "ack"
    """Fire-and-forget ack. For handlers whose effects are idempotent, so a lost ack is harmless."""
    ACK_SYNC = "ack_sync"
    """Ack and wait for the server's confirmation: for effects a redelivery must not repeat."""


@dataclass(frozen=True)
class Delivery:
    """One delivered message, as a handler sees it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    deliveries: int
    stream_seq: int
    trace: TraceContext | None
    stored_at: datetime | None = None
    """When the stream stored the message (from the delivery's ack subject: no extra request to learn it)."""

    @property
    def msg_id(self) -> str | None:
        """The publisher's `Nats-Msg-Id`, if any."""
        return self.headers.get(Header.MSG_ID.value)


Handler = Callable[[Delivery], Awaitable[None]]


class ConsumerRunner:
    """Pulls from one durable consumer and runs a handler on each message, `concurrency` at a time."""

    def __init__(
        self,
        js: JetStreamContext,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        ack_policy: AckPolicy,
        metrics: ConsumerMetrics,
        concurrency: int = 64,
        batch: int = 64,
        fetch_timeout: float = 2.0,
        passes_over: Callable[[str], bool] | None = None,
    ) -> None:
        """`passes_over(subject)`: True for a message the handler has nothing to do with, told by its subject
        alone. Such a message is acked as it arrives, without a handler task: a consumer that must read a
        whole stream for the few messages it acts on (the orchestrator reads every task's events for its
        steps' tasks) then pays for the rest little more than their acks."""
        self._js = js
        self._spec = spec
        self._handler = handler
        self._passes_over = passes_over
        self._metrics = metrics
        self._concurrency = concurrency
        self._batch = batch
        self._fetch_timeout = fetch_timeout
        self._in_flight: set[asyncio.Task[None]] = set()
        self._handling_since: dict[int, tuple[Msg, float]] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._settlement = Settlement(js, spec, ack_policy, metrics)
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None

    @property
    def spec(self) -> ConsumerSpec:
        return self._spec

    @property
    def running(self) -> bool:
        """True while the pull loop is bound to its consumer and not stopping."""
        return self._sub is not None and self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Bind to the durable consumer (created by the bootstrap, never here) and start pulling."""
        self._sub = await self._js.pull_subscribe_bind(durable=self._spec.durable, stream=self._spec.stream)
        self._loop_task = asyncio.create_task(self._pull_loop(), name=f"pull:{self._spec.durable}")
        self._heartbeat_task = asyncio.create_task(self._keep_in_progress(), name=f"wip:{self._spec.durable}")

    async def stop(self, drain_timeout: float) -> None:
        """Stop pulling, let in-flight messages finish for up to `drain_timeout`, then unbind.

        Messages still unfinished are left unacked: the server redelivers them to another worker.
        """
        self._stopping.set()
        self._slot_freed.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _pull_loop(self) -> None:
        assert self._sub is not None
        while not self._stopping.is_set():
            free = self._concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(self._batch, free), timeout=self._fetch_timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # a reconnect or server hiccup: keep pulling
                _log.warning("fetch_failed", consumer=self._spec.durable, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                if self._passes_over is not None and self._passes_over(msg.subject):
                    await self._settlement.passed_over(msg)
                    continue
                task = asyncio.create_task(self._handle(msg))
                self._in_flight.add(task)
                task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()
        # Handler errors are handled inside _handle; what reaches here failed around it (an ack on a
        # dropped connection): the message is redelivered after ack_wait, and the failure must be seen.
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("message_handling_failed", consumer=self._spec.durable, error=repr(error))

    async def _handle(self, msg: Msg) -> None:
        delivery = delivery_of(msg)
        bind_message_context(
            consumer=self._spec.durable,
            trace_id=delivery.trace.trace_id if delivery.trace else None,
        )
        started = time.perf_counter()
        self._handling_since[id(msg)] = (msg, started)
        try:
            await self._handler(delivery)
        except Exception as exc:
            if not isinstance(exc, (TerminalError, RetryableError)) and not is_nats_outage(exc):
                _log.exception("handler_failed", consumer=self._spec.durable, subject=delivery.subject)
            await self._settlement.failed(msg, delivery, exc)
        else:
            await self._settlement.acked(msg)
        finally:
            del self._handling_since[id(msg)]
            self._metrics.handler_seconds.labels(self._spec.durable).observe(time.perf_counter() - started)

    async def _keep_in_progress(self) -> None:
        # A long handler (an LLM generation) must not be redelivered while it still works on its message.
        # One loop per consumer, not a timer per message: most handlers finish long before it looks.
        interval = max(self._spec.ack_wait_seconds / 3, 0.5)
        while True:
            await asyncio.sleep(interval / 2)
            now = time.perf_counter()
            for msg, since in list(self._handling_since.values()):
                if now - since >= interval:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()


def delivery_of(msg: Msg) -> Delivery:
    """A delivered message as handlers see it."""
    metadata = msg.metadata
    headers = dict(msg.headers or {})
    return Delivery(
        subject=msg.subject,
        data=msg.data,
        headers=headers,
        deliveries=metadata.num_delivered,
        stream_seq=metadata.sequence.stream,
        trace=TraceContext.parse(headers.get(Header.TRACEPARENT.value)),
        stored_at=metadata.timestamp,
    )


class Settlement:
    """What happens to a message once its handler is done with it: the one rule every consumer follows.

    Success: acked with the consumer's ack policy. `TerminalError`: dead-lettered at once. A dependency
    outage (`DependencyUnavailableError`, or NATS itself unreachable): redelivered with backoff and jitter,
    never dead-lettered. Anything else: redelivered after the spec's delay (or the error's own), and
    dead-lettered after `max_deliver` deliveries.
    """

    def __init__(
        self, js: JetStreamContext, spec: ConsumerSpec, ack_policy: AckPolicy, metrics: ConsumerMetrics
    ) -> None:
        self._js = js
        self._spec = spec
        self._ack_policy = ack_policy
        self._metrics = metrics

    async def passed_over(self, msg: Msg) -> None:
        """Ack a message there was nothing to do for. If the ack is lost (NATS away), it comes again after
        ack_wait and is passed over again."""
        with contextlib.suppress(*NATS_OUTAGE_ERRORS):
            await msg.ack()
        self._metrics.handled.labels(self._spec.durable, "passed_over").inc()

    async def acked(self, msg: Msg) -> None:
        await (msg.ack_sync() if self._ack_policy is AckPolicy.ACK_SYNC else msg.ack())
        self._metrics.handled.labels(self._spec.durable, "acked").inc()

    async def failed(self, msg: Msg, delivery: Delivery, error: Exception, *, quiet: bool = False) -> None:
        """`quiet`: the caller logs the outage itself (once for many messages)."""
        if isinstance(error, TerminalError):
            await self.give_up(msg, delivery, ErrorInfo(code=error.code, message=error.message))
        elif isinstance(error, DependencyUnavailableError):
            await self.wait_for_dependency(msg, delivery, str(error), quiet=quiet)
        elif is_nats_outage(error):
            await self.wait_for_dependency(msg, delivery, f"NATS: {error.__class__.__name__}", quiet=quiet)
        else:
            delay = error.delay_seconds if isinstance(error, RetryableError) else None
            await self.retry_or_give_up(msg, delivery, error, delay)

    async def wait_for_dependency(self, msg: Msg, delivery: Delivery, reason: str, *, quiet: bool = False) -> None:
        delay = dependency_retry_delay(self._spec, delivery.deliveries)
        if not quiet:
            # One line per failed attempt, no traceback: an outage is a state, not a bug.
            _log.warning(
                "dependency_unavailable",
                consumer=self._spec.durable,
                reason=reason,
                deliveries=delivery.deliveries,
                retry_in_seconds=round(delay, 2),
            )
        # The nak itself may fail while NATS is away: the server then redelivers after ack_wait.
        with contextlib.suppress(*NATS_OUTAGE_ERRORS):
            await msg.nak(delay=delay)
        self._metrics.handled.labels(self._spec.durable, "waiting").inc()

    async def retry_or_give_up(self, msg: Msg, delivery: Delivery, error: Exception, delay: float | None) -> None:
        if delivery.deliveries >= self._spec.max_deliver:
            message = f"gave up after {delivery.deliveries} deliveries; last error: {error!r}"
            await self.give_up(msg, delivery, ErrorInfo(code=RETRIES_EXHAUSTED_CODE, message=message))
            return
        await msg.nak(delay=delay if delay is not None else self._spec.retry_delay_seconds)
        self._metrics.handled.labels(self._spec.durable, "retried").inc()

    async def give_up(self, msg: Msg, delivery: Delivery, error: ErrorInfo) -> None:
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


class Inbound(NamedTuple):
    """A message of a fetch handled whole: what a batch handler reads."""

    subject: str
    data: bytes


BatchHandler = Callable[[list[Inbound]], Awaitable[list[Exception | None]]]
"""Handles a whole fetch: per message None (done: ack it) or the exception it would have raised alone."""


class BatchConsumerRunner:
    """A durable pull consumer whose handler takes each fetch whole, for messages written together anyway
    (usage records share one group commit): one decode pass, one operation and one wait per fetch, where a
    consumer handling messages one by one spends a task, a future and a context per message. Each message is
    then settled by the same rule as every consumer's (`Settlement`). Up to `in_flight` fetches at once.
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
        self._metrics = metrics
        self._settlement = Settlement(js, spec, ack_policy, metrics)
        self._ack_policy = ack_policy
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
        left unacked is redelivered (to another replica, or the next owner)."""
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
            outcomes = await self._handler([Inbound(msg.subject, msg.data) for msg in msgs])
        except Exception as exc:
            _log.exception("handler_failed", consumer=self._spec.durable)
            outcomes = [exc] * len(msgs)
        self._metrics.handler_seconds.labels(self._spec.durable).observe(time.perf_counter() - started)
        acked = 0
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if outcome is None:
                await (msg.ack_sync() if self._ack_policy is AckPolicy.ACK_SYNC else msg.ack())
                acked += 1
            else:
                # Only a message that failed is read whole (its delivery count and stream sequence).
                await self._settlement.failed(msg, delivery_of(msg), outcome, quiet=True)
        if acked:
            self._metrics.handled.labels(self._spec.durable, "acked").inc(acked)
        if waiting := [o for o in outcomes if isinstance(o, DependencyUnavailableError)]:
            # One line per fetch that waits, no traceback: an outage is a state, not a bug.
            _log.warning(
                "dependency_unavailable", consumer=self._spec.durable, reason=str(waiting[0]), messages=len(outcomes)
            )
