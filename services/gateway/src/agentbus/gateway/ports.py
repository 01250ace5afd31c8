"""What the gateway's use cases need from the outside world: the bus (acting as an identity's own NATS user),
the identities, and the services' readiness."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agentbus.contracts.approvals import (
    ApprovalDecision,
    ApprovalDecisionVerdict,
    ApprovalRequested,
    ApprovalResolved,
    ApprovalsListReply,
    ApprovalsListRequest,
)
from agentbus.contracts.budget import CostReportReply, CostReportRequest
from agentbus.contracts.tasks import TaskCancelRequested, TaskEvent, TaskReplayReply, TaskSubmitted
from agentbus.gateway.domain import Actor, Identity

T_co = TypeVar("T_co", covariant=True)


class LiveFeed(Protocol, Generic[T_co]):
    """Messages of a core subscription, as they arrive."""

    async def next(self, timeout: float) -> T_co | None:
        """The next message, or None when none came within `timeout` seconds."""
        ...


ApprovalChange = ApprovalRequested | ApprovalResolved


@dataclass(frozen=True)
class DecisionReceipt:
    """A published decision: its stream sequence, and the executor's verdict on it (None: none in time)."""

    decision_seq: int
    verdict: ApprovalDecisionVerdict | None


class TaskBus(Protocol):
    """Tasks on the bus, as an identity's submitter user."""

    async def submit(self, actor: Actor, submission: TaskSubmitted) -> None:
        """Publish the submission on the actor's own submit subject (JetStream, Nats-Msg-Id = task id)."""
        ...

    async def cancel(self, actor: Actor, request: TaskCancelRequested) -> None: ...

    async def replay(self, actor: Actor, tenant: str, task_id: str, from_seq: int, limit: int) -> TaskReplayReply:
        """The runner's answer to a replay request."""
        ...

    def task_events(self, actor: Actor, tenant: str, task_id: str) -> AbstractAsyncContextManager[LiveFeed[TaskEvent]]:
        """A core subscription to the task's event subject, open while the context is."""
        ...


class ApprovalBus(Protocol):
    """Approvals on the bus, as an identity's approver user."""

    async def list_approvals(self, actor: Actor, tenant: str, request: ApprovalsListRequest) -> ApprovalsListReply:
        """The tool-executor's answer to a list request."""
        ...

    def approval_changes(
        self, actor: Actor, tenants: Sequence[str]
    ) -> AbstractAsyncContextManager[LiveFeed[ApprovalChange]]:
        """Core subscriptions to the tenants' pending and resolved approvals."""
        ...

    async def decide(self, actor: Actor, tenant: str, decision: ApprovalDecision, timeout: float) -> DecisionReceipt:
        """Publish the decision on the actor's own decision subject under an unpredictable message id, having
        subscribed to the actor's verdicts first, and wait for the verdict on that decision."""
        ...


@dataclass(frozen=True)
class ConsumerState:
    """A durable consumer's backlog: what KEDA scales on."""

    stream: str
    consumer: str
    service: str
    pending: int | None
    ack_pending: int | None
    redelivered: int | None
    error: str | None = None


class OperatorBus(Protocol):
    """What the operator pages read, with the gateway's own NATS user."""

    async def cost_report(self, request: CostReportRequest) -> CostReportReply: ...

    async def consumer_states(self) -> list[ConsumerState]: ...


class GatewayBus(TaskBus, ApprovalBus, OperatorBus, Protocol):
    """The whole bus of the gateway, with its own connection's lifecycle."""

    async def start(self, user: str | None, password: str | None) -> None: ...

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True)
class ServiceReadiness:
    service: str
    url: str
    ready: bool
    detail: str


class ServiceProbe(Protocol):
    """Each service's /readyz."""

    async def readiness(self) -> list[ServiceReadiness]: ...


class Directory(Protocol):
    """The identities people log in as."""

    def identity(self, name: str) -> Identity | None:
        """The identity of that name, or None."""
        ...

    def verify_password(self, name: str, password: str) -> bool:
        """Whether `password` is the password of one of the identity's own NATS users."""
        ...
