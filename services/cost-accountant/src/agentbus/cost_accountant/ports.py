"""What the accountant's use cases need from the outside: a store, a bus to publish alerts on, and a host that
serves a budget partition's requests and usage while this replica owns it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from agentbus.contracts.budget import BudgetAlert
from agentbus.contracts.usage import UsageRecorded

if TYPE_CHECKING:
    from agentbus.cost_accountant.book import MonthlySpend, Plan, StoredTask, TaskKey
    from agentbus.cost_accountant.limits import Admission

ReportKey = Literal["task", "agent", "model", "day", "tenant"]


@dataclass(frozen=True)
class ReservationInput:
    """A reservation to decide: who asks, for what, and what it is estimated to cost."""

    reservation_id: str
    tenant: str
    task_id: str
    agent: str
    user: str | None
    kind: str
    model: str | None
    tool: str | None
    amount_nano: int
    task_budget_nano: int | None
    tokens: int = 0
    """LLM calls: the estimated prompt and completion tokens, counted by tokens-per-minute limits."""


class PricedUsage(NamedTuple):
    """A valid usage record and its price. (A tuple: one is built for every record ingested.)"""

    usage: UsageRecorded
    cost_nano: int
    priced_by_default: bool


@dataclass(frozen=True)
class ReportLine:
    key: str
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    calls: int
    cost_nano: int


@dataclass(frozen=True)
class Loaded:
    """What a batch needed from the database before deciding: tasks not in memory, and which of its usage
    ids the ledger holds already."""

    tasks: dict[TaskKey, StoredTask]
    usage_in_ledger: set[tuple[str, str]]


@dataclass(frozen=True)
class Snapshot:
    """What rebuilding a partition's book reads: the ledger's monthly spend, and every task with an open
    reservation."""

    monthly: list[MonthlySpend]
    tasks: list[StoredTask]
    admissions: list[Admission] = field(default_factory=list)
    """LLM reservations admitted since the current rate window began (they count in its buckets)."""
    open_tasks: dict[str, int] = field(default_factory=dict)
    """Per tenant, tasks seen by a reservation and not closed (the concurrency cap counts them)."""


@dataclass(frozen=True)
class LeaseRow:
    """One budget partition's lease: its owner (None: free), its epoch, and until when it holds."""

    partition: int
    owner: str | None
    epoch: int
    expires_at: datetime | None


@dataclass(frozen=True)
class LeaseView:
    """The lease table after this replica's heartbeat and renewal, and how many replicas are alive."""

    leases: dict[int, LeaseRow]
    live_replicas: int


class AccountantStore(Protocol):
    """The ledger, reservations, tasks, alert outbox and partition leases.

    Every write goes through one writer connection. `commit` is one transaction and writes nothing of a
    partition whose lease epoch is no longer this replica's (the fence).
    """

    async def load(self, tasks: Sequence[TaskKey], usage: Sequence[tuple[str, str]]) -> Loaded: ...

    async def snapshot(
        self, partitions: Sequence[int], since: datetime, admitted_since: datetime | None = None
    ) -> Snapshot: ...

    async def commit(self, replica: str, epochs: Mapping[int, int], plans: Mapping[int, Plan]) -> set[int]:
        """Write the plans of every partition whose lease is still (replica, epoch); the partitions that
        were fenced out (nothing of theirs written)."""
        ...

    async def lease_round(self, replica: str, partitions: int, now: datetime, ttl_seconds: float) -> LeaseView: ...

    async def acquire(
        self, partition: int, replica: str, seen_epoch: int, now: datetime, ttl_seconds: float
    ) -> bool: ...

    async def release(self, partition: int, replica: str, epoch: int) -> None: ...

    async def leave(self, replica: str) -> None: ...

    async def report(self, tenant: str | None, by: ReportKey, since: datetime | None) -> list[ReportLine]: ...

    async def unpublished_alerts(self, limit: int) -> list[BudgetAlert]: ...

    async def mark_alerts_published(self, alert_ids: Sequence[str], now: datetime) -> None: ...


class AlertSink(Protocol):
    """Where soft-limit alerts go (the bus). Publishing the same alert id again must be harmless."""

    async def publish(self, alert: BudgetAlert) -> None: ...


class PartitionHost(Protocol):
    """Serves one budget partition on the bus: its request subjects and its usage consumer."""

    async def serve(self, partition: int) -> None: ...

    async def unserve(self, partition: int) -> None: ...
