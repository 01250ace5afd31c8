"""Following a task's events the way any NATS client can under `agentbus up`: with nothing but core NATS.

Live events arrive on a core subscription to the task's event subject (subscribed before anything can be
published on it); what came before, or what a reconnect let slip by, is asked of the runner with a
replay request on `agentbus.tasks.replay.<tenant>.<task_id>`. Events are told apart by their `seq` (and a
token event by its `chunk`), so an event seen twice is shown once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import nats.errors
from agentbus.contracts.registry import TASK_EVENT, TASK_REPLAY
from agentbus.contracts.tasks import (
    TASK_EVENT_ADAPTER,
    TERMINAL_EVENT_KINDS,
    TaskEvent,
    TaskReplayReply,
    TaskReplayRequest,
)
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from pydantic import ValidationError

CATCH_UP_SECONDS = 3.0
"""With no live event for this long, the follower asks the runner for what it may have missed."""
REPLAY_TIMEOUT_SECONDS = 5.0


class ReplayError(Exception):
    """The runner answered a replay with an error, or not at all."""


async def replay_events(
    nc: NatsClient, tenant: str, task_id: str, from_seq: int = 1, timeout: float = REPLAY_TIMEOUT_SECONDS
) -> list[TaskEvent]:
    """Every stored event of a task from `from_seq`, page by page."""
    events: list[TaskEvent] = []
    subject = TASK_REPLAY.format(tenant=tenant, task_id=task_id)
    while True:
        request = TaskReplayRequest(from_seq=from_seq)
        try:
            msg = await nc.request(subject, request.model_dump_json().encode(), timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise ReplayError("no agent-runner is serving replays") from exc
        except nats.errors.TimeoutError as exc:
            raise ReplayError(f"the agent-runner did not answer a replay within {timeout:g}s") from exc
        try:
            reply = TaskReplayReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise ReplayError(f"unreadable replay reply: {exc.errors()[0]['msg']}") from exc
        if reply.error is not None:
            raise ReplayError(f"{reply.error.code}: {reply.error.message}")
        events.extend(reply.events)
        if not reply.more:
            return events
        from_seq = reply.next_seq


def _identity(event: TaskEvent) -> tuple[int, str, int]:
    return event.seq, event.kind, getattr(event, "chunk", 0)


class TaskFollower:
    """Yields a task's events once each, in order, from seq 1 until its terminal event."""

    def __init__(self, nc: NatsClient, tenant: str, task_id: str) -> None:
        self._nc = nc
        self._tenant = tenant
        self._task_id = task_id
        self._subscription: Subscription | None = None
        self._seen: set[tuple[int, str, int]] = set()
        self._next_seq = 1

    async def __aenter__(self) -> TaskFollower:
        """Subscribe: do this before submitting, so no live event can be missed."""
        self._subscription = await self._nc.subscribe(TASK_EVENT.format(tenant=self._tenant, task_id=self._task_id))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    def _fresh(self, event: TaskEvent) -> bool:
        key = _identity(event)
        if key in self._seen or (event.kind != "token" and event.seq < self._next_seq):
            return False
        self._seen.add(key)
        if event.kind != "token":
            self._next_seq = event.seq + 1
        return True

    async def _stored(self) -> list[TaskEvent]:
        """What the runner has stored from the next expected seq; nothing while it cannot answer (it may be
        restarting): live events still arrive, and the next quiet spell asks again."""
        try:
            return await replay_events(self._nc, self._tenant, self._task_id, self._next_seq)
        except ReplayError:
            return []

    async def events(self, *, replay_first: bool = False) -> AsyncIterator[TaskEvent]:
        """The task's events until the terminal one. `replay_first`: the task may have started already."""
        assert self._subscription is not None, "use `async with TaskFollower(...)`"
        pending: list[TaskEvent] = []
        if replay_first:
            pending = await self._stored()
        while True:
            for event in pending:
                if self._fresh(event):
                    yield event
                    if event.kind in TERMINAL_EVENT_KINDS:
                        return
            try:
                msg = await self._subscription.next_msg(timeout=CATCH_UP_SECONDS)
            except (nats.errors.TimeoutError, TimeoutError):
                # Quiet for a while: a live event may have been lost (a reconnect), so ask what is stored.
                pending = await self._stored()
                continue
            try:
                pending = [TASK_EVENT_ADAPTER.validate_json(msg.data)]
            except (ValidationError, json.JSONDecodeError):
                pending = []
            if pending and pending[0].kind != "token" and pending[0].seq > self._next_seq:
                # A gap: events before this one were missed; the stored ones come first.
                pending = await self._stored()


async def follow_until_done(nc: NatsClient, tenant: str, task_id: str, timeout: float) -> list[TaskEvent]:
    """A task's events from seq 1 to its terminal event (TimeoutError after `timeout`)."""
    collected: list[TaskEvent] = []
    async with asyncio.timeout(timeout), TaskFollower(nc, tenant, task_id) as follower:
        async for event in follower.events(replay_first=True):
            collected.append(event)
    return collected
