"""In-memory fakes of the runner's ports, for unit tests of the use cases."""

from __future__ import annotations

from agentbus.agent_runner.ports import (
    BudgetTaskClosedError,
    BudgetUnavailableError,
    OutboxItem,
    RevisionConflictError,
    RunExistsError,
    RunRecord,
    TaskCost,
)
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest


class FakeRunStore:
    def __init__(self) -> None:
        self.records: dict[str, tuple[RunRecord, int]] = {}
        self._revision = 0

    async def get(self, task_id: str) -> tuple[RunRecord, int] | None:
        return self.records.get(task_id)

    async def create(self, task_id: str, record: RunRecord) -> int:
        if task_id in self.records:
            raise RunExistsError(task_id)
        self._revision += 1
        self.records[task_id] = (record, self._revision)
        return self._revision

    async def update(self, task_id: str, record: RunRecord, revision: int) -> int:
        if task_id not in self.records or self.records[task_id][1] != revision:
            raise RevisionConflictError(task_id)
        self._revision += 1
        self.records[task_id] = (record, self._revision)
        return self._revision


class CrashError(Exception):
    """Stands for the process dying at this point."""


class FakePublisher:
    """Keeps what was published; deduplicates by msg id like JetStream; can crash after N publishes."""

    def __init__(self) -> None:
        self.published: list[OutboxItem] = []
        self.attempts = 0
        self.crash_after: int | None = None

    async def publish(self, item: OutboxItem) -> None:
        if self.crash_after is not None and self.attempts >= self.crash_after:
            raise CrashError
        self.attempts += 1
        if item.msg_id not in {p.msg_id for p in self.published}:
            self.published.append(item)


class FakeBudgetGate:
    """The accountant: can be down (no answer), deny every reservation, and remembers what it was asked."""

    def __init__(self, cost_usd: float = 0.0) -> None:
        self.down = False
        self.deny = False
        self.cost_usd = cost_usd
        self.reserved: list[str] = []
        self.closed: list[str] = []
        self.cost_queries: list[list[str]] = []
        self.unpriced: set[str] = set()
        """Usage ids the ledger does not have yet."""

    def _check(self) -> None:
        if self.down:
            raise BudgetUnavailableError("the cost-accountant did not answer")

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        self._check()
        if request.task_id in self.closed:
            raise BudgetTaskClosedError(request.task_id)
        if self.deny:
            return BudgetReserveReply(
                reservation_id=request.reservation_id,
                allowed=False,
                budget=f"task:{request.task_id}",
                limit_usd=0.01,
                spent_usd=0.01,
                requested_usd=0.002,
            )
        if request.reservation_id not in self.reserved:
            self.reserved.append(request.reservation_id)
        return BudgetReserveReply(reservation_id=request.reservation_id, allowed=True)

    async def close(self, tenant: str, task_id: str) -> None:
        self._check()
        if task_id not in self.closed:
            self.closed.append(task_id)

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str], *, close: bool = False) -> TaskCost:
        self._check()
        self.cost_queries.append(list(usage_ids))
        missing = [u for u in usage_ids if u in self.unpriced]
        if close and not missing:
            await self.close(tenant, task_id)
        return TaskCost(self.cost_usd, missing, close and not missing)
