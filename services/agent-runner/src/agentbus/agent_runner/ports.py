"""What the runner's use cases need from the outside world."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from agentbus.agent_runner.domain import MemoryCall, RunState
from agentbus.agent_runner.sessions import SessionKey, SessionRecord
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest
from agentbus.contracts.rag import RetrievedChunk
from agentbus.contracts.tasks import TaskEvent
from pydantic import BaseModel, ConfigDict, Field

OutboxKind = Literal["publish", "notice", "reserve", "close_budget", "session_leave", "memory"]


class OutboxItem(BaseModel):
    """Something a transition must do, stored with the state so that a crash cannot lose it. Done in order.

    publish: a JetStream message (deduplicated by `msg_id`). notice: a best-effort core NATS message.
    reserve: a budget reservation (`payload` is the request) that the items after it wait for: a denial ends
    the run instead. close_budget: release the run's reservations and refuse later ones. session_leave: the
    run leaves its session (`payload` is the SessionLeave), which goes to the next task waiting for it.
    memory: a memory tool call (`payload` is the MemoryCall), carried out last; its result advances the run.
    """

    model_config = ConfigDict(frozen=True)

    kind: OutboxKind = "publish"
    subject: str = ""
    msg_id: str = ""
    payload: str = ""
    traceparent: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers (a message schedule).")
    price: Literal["event", "span"] | None = Field(
        default=None, description="A terminal event (or the task span) whose cost is priced when published."
    )


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

    async def get(self, key: str) -> tuple[RunRecord, int] | None: ...

    async def create(self, key: str, record: RunRecord) -> int: ...

    async def update(self, key: str, record: RunRecord, revision: int) -> int: ...


class Publisher(Protocol):
    """Publishes outbox items; publishing the same msg_id twice must be harmless (deduplicated)."""

    async def publish(self, item: OutboxItem) -> None: ...


class BudgetUnavailableError(Exception):
    """The cost-accountant did not answer (or its store is down): wait for it, the input is retried later."""


class BudgetTaskClosedError(Exception):
    """The accountant already closed this task: the run ended under this reservation, so re-read it."""


class BudgetRefusedError(Exception):
    """The accountant refused the request as invalid (it can never succeed): the run fails with the reason."""


@dataclass(frozen=True)
class TaskCost:
    """A run's priced cost, and which of the usage records it asked for were not in the ledger yet."""

    cost_usd: float
    missing_usage_ids: list[str] = field(default_factory=list)
    closed: bool = False
    """The accountant closed the task in the same request (asked with `close`)."""


class BudgetGate(Protocol):
    """The cost-accountant, as the runner sees it: reservations before calls, the priced cost at the end."""

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply: ...

    async def close(self, tenant: str, task_id: str) -> None: ...

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str], *, close: bool = False) -> TaskCost:
        """The run's priced cost once every record of `usage_ids` is in the ledger (the accountant waits
        for them, briefly), or what it is so far with the records still missing. With `close`, a run priced
        on all of them is closed too, in the same request."""
        ...


class EventLog(Protocol):
    """A task's stored public events, for replays."""

    async def events(self, tenant: str, task_id: str, from_seq: int, limit: int) -> tuple[list[TaskEvent], bool]:
        """Stored events with `seq >= from_seq`, in order, at most `limit`; and whether more follow."""
        ...


class MemoryUnavailableError(Exception):
    """A memory store (or the retriever behind long-term memory) does not answer: wait for it."""


class SessionExistsError(Exception):
    """A session record was created meanwhile: re-read it."""


class SessionStore(Protocol):
    """The sessions of one memory store, written compare-and-set. Every write renews the store's TTL: a
    session nobody wrote for that long is gone. Raises MemoryUnavailableError while the store is down."""

    async def get(self, key: SessionKey) -> tuple[SessionRecord, int] | None: ...

    async def create(self, key: SessionKey, record: SessionRecord) -> int:
        """Raises SessionExistsError when the key exists."""
        ...

    async def update(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        """Raises RevisionConflictError when the record changed (or expired) since `revision`."""
        ...

    async def delete(self, key: SessionKey, revision: int) -> bool:
        """False when the record changed since `revision` (nothing deleted)."""
        ...

    async def owned(self, tenant: str, submitter: str, limit: int) -> list[SessionRecord]:
        """The submitter's sessions in the tenant, at most `limit` (in no particular order)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class MemoryOutcome:
    """What a memory tool call gave the model: its text, the memories it found, the usage it caused."""

    content: str
    ok: bool = True
    citations: list[RetrievedChunk] = field(default_factory=list)
    usage_ids: list[str] = field(default_factory=list)


class LongTermMemory(Protocol):
    """remember and recall, in a tenant's memory collection. Idempotent on the call's id; raises
    MemoryUnavailableError while the retriever does not answer."""

    async def run(self, call: MemoryCall, traceparent: str | None) -> MemoryOutcome: ...
