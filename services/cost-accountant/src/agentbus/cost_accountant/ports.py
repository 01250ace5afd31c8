"""What the accountant's use cases need from the outside: a store for the ledger and budgets, an alert sink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from agentbus.contracts.budget import BudgetAlert
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.domain import Counter, Verdict

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


@dataclass(frozen=True)
class PricedUsage:
    """A valid usage record and its price."""

    usage: UsageRecorded
    cost_nano: int
    priced_by_default: bool


@dataclass(frozen=True)
class UsageWrite:
    """What writing a batch of usage records did: per record, whether it was new (not a repeat), and how
    many soft-limit alerts it queued."""

    inserted: list[bool]
    alerts_queued: int


@dataclass(frozen=True)
class ReportLine:
    key: str
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    calls: int
    cost_nano: int


class AccountantStore(Protocol):
    """The ledger and budget state. Every method is one transaction; writes are idempotent on their ids."""

    async def reserve_many(self, batch: Sequence[ReservationInput], now: datetime) -> list[Verdict]: ...

    async def record_usage(self, entries: Sequence[PricedUsage], now: datetime) -> UsageWrite: ...

    async def release_task(self, tenant: str, task_id: str, now: datetime) -> int: ...

    async def expire_reservations(self, now: datetime) -> int: ...

    async def task_cost(self, tenant: str, task_id: str, usage_ids: Sequence[str]) -> tuple[int, list[str]]: ...

    async def report(self, tenant: str | None, by: ReportKey, since: datetime | None) -> list[ReportLine]: ...

    async def counter(self, tenant: str, scope: str, period: str) -> Counter: ...

    async def unpublished_alerts(self, limit: int) -> list[BudgetAlert]: ...

    async def mark_alerts_published(self, alert_ids: Sequence[str], now: datetime) -> None: ...


class AlertSink(Protocol):
    """Where soft-limit alerts go (the bus). Publishing the same alert id again must be harmless."""

    async def publish(self, alert: BudgetAlert) -> None: ...
