"""The cost-accountant over NATS request/reply, and a gate that allows everything when budgets are off."""

from __future__ import annotations

import asyncio

from agentbus.agent_runner.ports import BudgetUnavailableError
from agentbus.contracts.budget import (
    BudgetReleaseRequest,
    BudgetReserveReply,
    BudgetReserveRequest,
    TaskCostReply,
    TaskCostRequest,
)
from agentbus.contracts.registry import BUDGET_RELEASE, BUDGET_RESERVE, TASK_COST
from agentbus.runtime.logging import get_logger
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

_log = get_logger(__name__)


class NatsBudgetGate:
    def __init__(
        self,
        nc: NatsClient,
        *,
        timeout_seconds: float = 2.0,
        cost_wait_seconds: float = 5.0,
        cost_poll_seconds: float = 0.1,
    ) -> None:
        self._nc = nc
        self._timeout = timeout_seconds
        self._cost_wait = cost_wait_seconds
        self._cost_poll = cost_poll_seconds

    async def _ask(self, subject: str, request: BaseModel) -> bytes:
        try:
            reply = await self._nc.request(subject, request.model_dump_json().encode(), timeout=self._timeout)
        except (TimeoutError, NatsTimeoutError, NoRespondersError) as exc:
            raise BudgetUnavailableError(f"the cost-accountant did not answer on {subject}") from exc
        return reply.data

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        data = await self._ask(BUDGET_RESERVE.format(tenant=request.tenant), request)
        try:
            verdict = BudgetReserveReply.model_validate_json(data)
        except ValidationError as exc:
            raise BudgetUnavailableError(f"unreadable reservation reply: {exc}") from exc
        if verdict.error is not None:
            raise BudgetUnavailableError(
                f"reservation refused as invalid: {verdict.error.code}: {verdict.error.message}"
            )
        return verdict

    async def release(self, tenant: str, task_id: str) -> None:
        await self._ask(BUDGET_RELEASE.format(tenant=tenant), BudgetReleaseRequest(tenant=tenant, task_id=task_id))

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str]) -> float:
        """The task's priced cost, waiting briefly for usage records still on their way to the ledger."""
        request = TaskCostRequest(tenant=tenant, task_id=task_id, usage_ids=usage_ids)
        deadline = asyncio.get_running_loop().time() + self._cost_wait
        while True:
            data = await self._ask(TASK_COST.format(tenant=tenant), request)
            try:
                reply = TaskCostReply.model_validate_json(data)
            except ValidationError as exc:
                raise BudgetUnavailableError(f"unreadable cost reply: {exc}") from exc
            if reply.error is not None:
                raise BudgetUnavailableError(f"cost refused: {reply.error.code}: {reply.error.message}")
            if not reply.missing_usage_ids or asyncio.get_running_loop().time() >= deadline:
                if reply.missing_usage_ids:
                    _log.warning("task_cost_without_late_usage", missing=reply.missing_usage_ids)
                return reply.cost_usd
            await asyncio.sleep(self._cost_poll)


class UnlimitedBudgetGate:
    """Budgets switched off: every reservation is allowed and costs are not priced (reported as 0)."""

    async def reserve(self, request: BudgetReserveRequest) -> BudgetReserveReply:
        return BudgetReserveReply(reservation_id=request.reservation_id, allowed=True)

    async def release(self, tenant: str, task_id: str) -> None:
        return None

    async def task_cost(self, tenant: str, task_id: str, usage_ids: list[str]) -> float:
        return 0.0
