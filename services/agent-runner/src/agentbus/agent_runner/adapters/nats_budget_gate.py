"""The cost-accountant over NATS request/reply, and a gate that allows everything when budgets are off."""

from __future__ import annotations

from agentbus.agent_runner.ports import (
    BudgetRefusedError,
    BudgetTaskClosedError,
    BudgetUnavailableError,
    TaskCost,
)
from agentbus.contracts.budget import (
    BudgetErrorCode,
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.registry import BUDGET_RELEASE, BUDGET_RESERVE, TASK_COST, SubjectSpec, budget_subject
from agentbus.runtime.logging import get_logger
from nats.aio.client import Client as NatsClient
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

_log = get_logger(__name__)


class NatsBudgetGate:
    """Asks the owner of the tenant's budget partition. No answer (nobody serving the partition, a timeout,
    NATS away) or an answer that its store is down is `BudgetUnavailableError`: the runner waits for it."""

    def __init__(self, nc: NatsClient, *, timeout_seconds: float = 2.0, cost_wait_seconds: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout_seconds
        self._cost_wait = cost_wait_seconds

    async def _ask(self, spec: SubjectSpec, tenant: str, request: BaseModel, timeout: float) -> bytes:
        subject = budget_subject(spec, tenant)
        try:
            reply = await self._nc.request(subject, request.model_dump_json().encode(), timeout=timeout)
        except (
            TimeoutError,
            NatsTimeoutError,
            NoRespondersError,
            ConnectionClosedError,
            ConnectionReconnectingError,
        ) as exc:
            raise BudgetUnavailableError(f"the cost-accountant did not answer on {subject}") from exc
        return reply.data

    @staticmethod
    def _check(error: ErrorInfo | None) -> None:
        if error is None:
            return
        if error.code == BudgetErrorCode.STORE_UNAVAILABLE:
            raise BudgetUnavailableError(f"the cost-accountant's store is unavailable: {error.message}")
        if error.code == BudgetErrorCode.TASK_CLOSED:
            raise BudgetTaskClosedError(error.message)
        raise BudgetRefusedError(f"{error.code}: {error.message}")

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        data = await self._ask(BUDGET_RESERVE, request.tenant, request, self._timeout)
        try:
            verdict = BudgetReserveReply.model_validate_json(data)
        except ValidationError as exc:
            raise BudgetUnavailableError(f"unreadable reservation reply: {exc}") from exc
        if verdict.error is not None and verdict.error.code == BudgetErrorCode.RATE_LIMITED:
            return verdict  # a rate limit refusing a new task: the run rejects it
        self._check(verdict.error)
        return verdict

    async def close(self, tenant: str, task_id: str) -> None:
        data = await self._ask(
            BUDGET_RELEASE, tenant, BudgetReleaseRequest(tenant=tenant, task_id=task_id), self._timeout
        )
        try:
            reply = BudgetReserveReply.model_validate_json(data)
        except ValidationError as exc:
            raise BudgetUnavailableError(f"unreadable release reply: {exc}") from exc
        self._check(reply.error)

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str], *, close: bool = False) -> TaskCost:
        """The run's priced cost; the accountant answers once every record of `usage_ids` is in its ledger,
        or after `cost_wait_seconds` with what it has and the records still missing."""
        request = TaskCostRequest(
            tenant=tenant, task_id=task_id, usage_ids=usage_ids, wait_seconds=self._cost_wait, close=close
        )
        data = await self._ask(TASK_COST, tenant, request, self._cost_wait + self._timeout)
        try:
            reply = TaskCostReply.model_validate_json(data)
        except ValidationError as exc:
            raise BudgetUnavailableError(f"unreadable cost reply: {exc}") from exc
        self._check(reply.error)
        return TaskCost(reply.cost_usd, list(reply.missing_usage_ids), reply.closed)


class UnlimitedBudgetGate:
    """Budgets switched off: every reservation is allowed and costs are not priced (reported as 0)."""

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        return BudgetReserveReply(reservation_id=request.reservation_id, allowed=True)

    async def close(self, tenant: str, task_id: str) -> None:
        return None

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str], *, close: bool = False) -> TaskCost:
        return TaskCost(0.0, closed=close)
