"""The bus, as each identity's own NATS user: one connection per user, opened when first needed.

Nothing here decides what a person may do: nats-server does, from the user's permissions. A publish or
subscription the server refuses does not fail at the client (the server reports it asynchronously), so each
operation races its work against a refusal of its subject reported on the same connection, and a refusal
becomes ForbiddenError.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import nats.errors
import nats.js.errors
from agentbus.contracts.approvals import (
    ApprovalDecision,
    ApprovalDecisionVerdict,
    ApprovalRequested,
    ApprovalResolved,
    ApprovalsListReply,
    ApprovalsListRequest,
)
from agentbus.contracts.budget import CostReportReply, CostReportRequest
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS_LIST,
    COST_REPORT,
    TASK_CANCEL,
    TASK_EVENT,
    TASK_REPLAY,
    TASK_SUBMIT,
    ConsumerSpec,
    Header,
)
from agentbus.contracts.tasks import (
    TASK_EVENT_ADAPTER,
    TaskCancelRequested,
    TaskEvent,
    TaskReplayReply,
    TaskReplayRequest,
    TaskSubmitted,
)
from agentbus.gateway.adapters.identities import CredentialsFolder, nats_user
from agentbus.gateway.domain import Actor, ForbiddenError, UnavailableError
from agentbus.gateway.ports import ApprovalChange, ConsumerState, DecisionReceipt
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import get_logger
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

T = TypeVar("T")
_Reply = TypeVar("_Reply", bound=BaseModel)

_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)"?', re.IGNORECASE)
FEED_CAPACITY = 10_000

_log = get_logger(__name__)


class _Refusals:
    """Permission violations the server reports on one connection, handed to the operation waiting on that
    subject."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[str]]] = {}

    async def record(self, error: Exception) -> None:
        found = _VIOLATION.search(str(error))
        if found is None:
            return
        for waiter in self._waiting.get(found.group(2), []):
            if not waiter.done():
                waiter.set_result(str(error))

    async def guard(self, subject: str, work: Awaitable[T]) -> T:
        """`work`, unless the server refuses an operation on `subject` first: then ForbiddenError."""
        refusal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(subject, []).append(refusal)
        task: asyncio.Future[T] = asyncio.ensure_future(work)
        either: list[asyncio.Future[Any]] = [task, refusal]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting = self._waiting.get(subject, [])
            waiting.remove(refusal)
            if not waiting:
                self._waiting.pop(subject, None)
        if refusal.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ForbiddenError(f"refused by NATS: {refusal.result()}")
        refusal.cancel()
        return task.result()


class _UserConnection:
    def __init__(self, nc: NatsClient, refusals: _Refusals) -> None:
        self.nc = nc
        self.refusals = refusals


class _Feed(Generic[T]):
    """Messages of one or more core subscriptions, decoded, in arrival order."""

    def __init__(self, decode: Callable[[Msg], T | None]) -> None:
        self._decode = decode
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=FEED_CAPACITY)

    async def on_message(self, msg: Msg) -> None:
        decoded = self._decode(msg)
        if decoded is not None and not self._queue.full():
            # A follower that falls this far behind catches up from the stored events instead.
            self._queue.put_nowait(decoded)

    async def next(self, timeout: float) -> T | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None


def _task_event(msg: Msg) -> TaskEvent | None:
    try:
        return TASK_EVENT_ADAPTER.validate_json(msg.data)
    except (ValidationError, json.JSONDecodeError):
        return None


def _approval_change(msg: Msg) -> ApprovalChange | None:
    model: type[ApprovalRequested] | type[ApprovalResolved] = (
        ApprovalRequested if msg.subject.startswith(APPROVAL_PENDING.pattern.split("{")[0]) else ApprovalResolved
    )
    try:
        return model.model_validate_json(msg.data)
    except ValidationError:
        return None


class NatsBus:
    """TaskBus and ApprovalBus as each identity's own NATS user; OperatorBus with the gateway's own user."""

    def __init__(
        self,
        url: str,
        credentials: CredentialsFolder,
        request_timeout: float,
        consumers: Sequence[ConsumerSpec] = (),
    ) -> None:
        self._url = url
        self._credentials = credentials
        self._timeout = request_timeout
        self._consumers = tuple(consumers)
        self._connections: dict[str, _UserConnection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self.own: NatsClient | None = None

    async def start(self, user: str | None, password: str | None) -> None:
        """Connect as the gateway's own user (readiness, operator pages)."""
        self.own = await connect_nats(self._url, "agentbus-gateway", user=user, password=password)

    @property
    def connected(self) -> bool:
        return self.own is not None and self.own.is_connected

    async def close(self) -> None:
        clients = [c.nc for c in self._connections.values()] + ([self.own] if self.own else [])
        self._connections.clear()
        for nc in clients:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _connection(self, actor: Actor) -> _UserConnection:
        user = nats_user(actor)
        lock = self._opening.setdefault(user, asyncio.Lock())
        async with lock:
            existing = self._connections.get(user)
            if existing is not None and not existing.nc.is_closed:
                return existing
            credential = self._credentials.get(user)
            if credential is None:
                raise ForbiddenError(f"the gateway holds no credentials for NATS user {user}")
            refusals = _Refusals()
            try:
                nc = await connect_nats(
                    self._url,
                    f"agentbus-gateway:{user}",
                    user=credential.user,
                    password=credential.password,
                    reconnect_forever=False,
                    error_cb=refusals.record,
                )
            except (nats.errors.NoServersError, OSError, nats.errors.Error) as exc:
                raise UnavailableError(f"cannot connect to NATS as {user}: {exc}") from exc
            connection = _UserConnection(nc, refusals)
            self._connections[user] = connection
            return connection

    async def _request(
        self, actor: Actor, subject: str, request: BaseModel, reply: type[_Reply], answers: str
    ) -> _Reply:
        connection = await self._connection(actor)
        try:
            msg = await connection.refusals.guard(
                subject, connection.nc.request(subject, request.model_dump_json().encode(), timeout=self._timeout)
            )
        except nats.errors.NoRespondersError as exc:
            raise UnavailableError(f"no {answers} is running to answer") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise UnavailableError(f"the {answers} did not answer within {self._timeout:g}s") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise UnavailableError(f"the connection to NATS was lost: {exc}") from exc
        try:
            return reply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise UnavailableError(f"the {answers} sent an unreadable reply") from exc

    async def _publish(self, actor: Actor, subject: str, payload: BaseModel, msg_id: str | None) -> int:
        connection = await self._connection(actor)
        headers = {Header.MSG_ID.value: msg_id} if msg_id else None
        try:
            ack = await connection.refusals.guard(
                subject,
                connection.nc.jetstream().publish(
                    subject, payload.model_dump_json().encode(), timeout=self._timeout, headers=headers
                ),
            )
        except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            raise UnavailableError(f"NATS did not store the message on {subject} in time") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise UnavailableError(f"the connection to NATS was lost: {exc}") from exc
        return int(ack.seq)

    @contextlib.asynccontextmanager
    async def _feed(
        self, actor: Actor, subjects: Sequence[str], decode: Callable[[Msg], T | None]
    ) -> AsyncIterator[_Feed[T]]:
        connection = await self._connection(actor)
        feed: _Feed[T] = _Feed(decode)
        subscriptions = []
        try:
            for subject in subjects:
                subscriptions.append(await connection.nc.subscribe(subject, cb=feed.on_message))
                # The server answers a refused subscription before the flush's PONG.
                await connection.refusals.guard(subject, connection.nc.flush(timeout=max(int(self._timeout), 1)))
            yield feed
        finally:
            for subscription in subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    # --- TaskBus ----------------------------------------------------------------------------------------

    async def submit(self, actor: Actor, submission: TaskSubmitted) -> None:
        subject = TASK_SUBMIT.format(tenant=submission.tenant, submitter=actor.name)
        await self._publish(actor, subject, submission, submission.task_id)

    async def cancel(self, actor: Actor, request: TaskCancelRequested) -> None:
        await self._publish(actor, TASK_CANCEL.format(tenant=request.tenant, submitter=actor.name), request, None)

    async def replay(self, actor: Actor, tenant: str, task_id: str, from_seq: int, limit: int) -> TaskReplayReply:
        subject = TASK_REPLAY.format(tenant=tenant, task_id=task_id)
        request = TaskReplayRequest(from_seq=from_seq, limit=limit)
        return await self._request(actor, subject, request, TaskReplayReply, "agent-runner")

    def task_events(
        self, actor: Actor, tenant: str, task_id: str
    ) -> contextlib.AbstractAsyncContextManager[_Feed[TaskEvent]]:
        return self._feed(actor, [TASK_EVENT.format(tenant=tenant, task_id=task_id)], _task_event)

    # --- ApprovalBus ------------------------------------------------------------------------------------

    async def list_approvals(self, actor: Actor, tenant: str, request: ApprovalsListRequest) -> ApprovalsListReply:
        subject = APPROVALS_LIST.format(tenant=tenant)
        return await self._request(actor, subject, request, ApprovalsListReply, "tool-executor")

    def approval_changes(
        self, actor: Actor, tenants: Sequence[str]
    ) -> contextlib.AbstractAsyncContextManager[_Feed[ApprovalChange]]:
        subjects = [spec.format(tenant=t) for t in tenants for spec in (APPROVAL_PENDING, APPROVAL_RESOLVED)]
        return self._feed(actor, subjects, _approval_change)

    async def decide(self, actor: Actor, tenant: str, decision: ApprovalDecision, timeout: float) -> DecisionReceipt:
        verdicts = APPROVAL_VERDICT.format(tenant=tenant, approver=actor.name)

        def decode(msg: Msg) -> ApprovalDecisionVerdict | None:
            try:
                return ApprovalDecisionVerdict.model_validate_json(msg.data)
            except ValidationError:
                return None

        # Subscribed before publishing, so the verdict cannot come first.
        async with self._feed(actor, [verdicts], decode) as feed:
            subject = APPROVAL_DECISION.format(tenant=tenant, approver=actor.name)
            # Random: nobody else can predict it, so nobody can pre-empt this decision as a duplicate.
            seq = await self._publish(actor, subject, decision, f"decision:{uuid.uuid4().hex}")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                verdict = await feed.next(left)
                if verdict is not None and verdict.decision_seq == seq:
                    return DecisionReceipt(seq, verdict)
        return DecisionReceipt(seq, None)

    # --- OperatorBus ------------------------------------------------------------------------------------

    async def cost_report(self, request: CostReportRequest) -> CostReportReply:
        nc = self._own()
        try:
            msg = await nc.request(COST_REPORT.format(), request.model_dump_json().encode(), timeout=self._timeout)
        except nats.errors.NoRespondersError as exc:
            raise UnavailableError("no cost-accountant is running to answer") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise UnavailableError(f"the cost-accountant did not answer within {self._timeout:g}s") from exc
        try:
            return CostReportReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise UnavailableError("the cost-accountant sent an unreadable reply") from exc

    async def consumer_states(self) -> list[ConsumerState]:
        js = self._own().jetstream()
        states = []
        for spec in self._consumers:
            try:
                info = await js.consumer_info(spec.stream, spec.durable, timeout=self._timeout)
            except (nats.errors.Error, TimeoutError) as exc:
                states.append(
                    ConsumerState(spec.stream, spec.durable, spec.service, None, None, None, type(exc).__name__)
                )
                continue
            states.append(
                ConsumerState(
                    spec.stream,
                    spec.durable,
                    spec.service,
                    info.num_pending or 0,
                    info.num_ack_pending or 0,
                    info.num_redelivered or 0,
                )
            )
        return states

    def _own(self) -> NatsClient:
        if self.own is None or self.own.is_closed:
            raise UnavailableError("the gateway is not connected to NATS")
        return self.own
