"""What the runner's use cases need from the outside world."""

from __future__ import annotations

from typing import Protocol

from agentbus.agent_runner.domain import RunState
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest
from pydantic import BaseModel, ConfigDict, Field


class OutboxItem(BaseModel):
    """A message a transition must publish. Stored with the state, so a crash cannot lose it."""

    model_config = ConfigDict(frozen=True)

    subject: str
    msg_id: str
    payload: str
    traceparent: str | None = None
    core: bool = Field(default=False, description="A best-effort core NATS notice, not a stream message.")


class RunRecord(BaseModel):
    """The stored unit: a run's state and the messages of its last transition not yet confirmed sent."""

    model_config = ConfigDict(frozen=True)

    state: RunState
    trace_id: str
    parent_span_id: str | None = Field(default=None, description="The submitter's span, parent of the task span.")
    outbox: list[OutboxItem] = Field(default_factory=list)


class RunExistsError(Exception):
    """A record for that task already exists."""


class RevisionConflictError(Exception):
    """The record changed since it was read: re-read and re-apply."""


class RunStore(Protocol):
    """Run records by task id, with compare-and-set on a revision."""

    async def get(self, task_id: str) -> tuple[RunRecord, int] | None: ...

    async def create(self, task_id: str, record: RunRecord) -> int: ...

    async def update(self, task_id: str, record: RunRecord, revision: int) -> int: ...


class Publisher(Protocol):
    """Publishes outbox items; publishing the same msg_id twice must be harmless (deduplicated)."""

    async def publish(self, item: OutboxItem) -> None: ...


class BudgetUnavailableError(Exception):
    """The cost-accountant did not answer: retry the input later."""


class BudgetGate(Protocol):
    """The cost-accountant, as the runner sees it: reservations before calls, the priced cost at the end."""

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply: ...

    async def release(self, tenant: str, task_id: str) -> None: ...

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str]) -> float: ...
