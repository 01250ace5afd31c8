"""What the orchestrator's use cases need from the outside world."""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar

from agentbus.contracts.workflows import WorkflowEventKind
from agentbus.workflow_orchestrator.admission import SlotsState
from agentbus.workflow_orchestrator.domain import RunState
from pydantic import BaseModel, ConfigDict, Field

OutboxKind = Literal["publish", "index", "acquire", "release"]


class OutboxItem(BaseModel):
    """Something a transition must do, stored with the state so that a crash cannot lose it. Done in order.

    publish: a JetStream message (deduplicated by `msg_id`). index: record that a step's task (`msg_id`)
    belongs to this run, before the task is submitted. acquire: ask the workflow's concurrency limit for a
    slot; its answer replaces the rest of the outbox. release: give the run's slot (or queue place) back.
    """

    model_config = ConfigDict(frozen=True)

    kind: OutboxKind = "publish"
    subject: str = ""
    msg_id: str = ""
    payload: str = ""
    traceparent: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers (a message schedule).")


class RunRecord(BaseModel):
    """The stored unit of a run: its state and the effects of its last transition not yet confirmed done."""

    model_config = ConfigDict(frozen=True)

    state: RunState
    trace_id: str
    parent_span_id: str | None = Field(default=None, description="The submitter's span, parent of the run's span.")
    outbox: list[OutboxItem] = Field(default_factory=list)


class SlotsRecord(BaseModel):
    """The stored unit of a workflow's concurrency limit in one tenant, with the admissions it must announce."""

    model_config = ConfigDict(frozen=True)

    state: SlotsState
    outbox: list[OutboxItem] = Field(default_factory=list)


RecordT = TypeVar("RecordT", RunRecord, SlotsRecord)


class RecordExistsError(Exception):
    """A record under that key already exists."""


class RevisionConflictError(Exception):
    """The record changed since it was read: re-read and re-apply."""


class RecordStore(Protocol[RecordT]):
    """Records by key, with compare-and-set on a revision."""

    async def get(self, key: str) -> tuple[RecordT, int] | None: ...

    async def create(self, key: str, record: RecordT) -> int: ...

    async def update(self, key: str, record: RecordT, revision: int) -> int: ...


class StepIndex(Protocol):
    """Which run each step task belongs to: written before the task is submitted, never changed."""

    async def put(self, tenant: str, task_id: str, run_id: str) -> None:
        """Record it; writing the same again is harmless."""
        ...

    async def run_of(self, tenant: str, task_id: str) -> str | None: ...


class Publisher(Protocol):
    """Publishes outbox items; publishing the same msg_id twice must be harmless (deduplicated)."""

    async def publish(self, item: OutboxItem) -> None: ...


class EventLog(Protocol):
    """A run's stored public events, for replays."""

    async def events(self, tenant: str, run_id: str, from_seq: int, limit: int) -> tuple[list[WorkflowEventKind], bool]:
        """Stored events with `seq >= from_seq`, in order, at most `limit`; and whether more follow."""
        ...
