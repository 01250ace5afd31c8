"""Budgets: per tenant (monthly), per agent, per end user and per model within a tenant (monthly), per task.

Every scope a cost belongs to is checked and charged: a call by user `bob` of agent `assistant` in tenant
`acme` on model `m` lands in `task:<id>`, `user:bob`, `agent:assistant`, `model:m` and `tenant:acme`. A
hard limit denies reservations that would go over it; a soft limit publishes one alert per period.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from agentbus.contracts.common import Identifier
from agentbus.cost_accountant.domain import TASK_PERIOD, Attribution, Scope, ScopeLimit, month_period, usd_to_nano
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Limit(BaseModel):
    """A budget's limits in USD. Soft: alert once per period. Hard: deny what would go over."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hard_usd: Decimal | None = Field(default=None, ge=0)
    soft_usd: Decimal | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _soft_not_above_hard(self) -> Limit:
        if self.hard_usd is None and self.soft_usd is None:
            raise ValueError("a limit needs hard_usd, soft_usd or both")
        if self.hard_usd is not None and self.soft_usd is not None and self.soft_usd > self.hard_usd:
            raise ValueError("soft_usd must not be above hard_usd")
        return self


class TenantBudgets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    monthly: Limit | None = Field(default=None, description="The tenant's own monthly budget.")
    agents: dict[Identifier, Limit] = Field(default_factory=dict, description="Monthly, per agent in this tenant.")
    users: dict[Identifier, Limit] = Field(default_factory=dict, description="Monthly, per end user (submitted_by).")
    default_user: Limit | None = Field(default=None, description="Users of this tenant without their own budget.")
    models: dict[str, Limit] = Field(default_factory=dict, description="Monthly, per model in this tenant.")


class DefaultBudgets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: Limit | None = Field(default=None, description="Monthly budget of tenants not listed.")
    agent: Limit | None = Field(default=None, description="Monthly budget of agents not listed.")
    user: Limit | None = Field(default=None, description="End-user default: users with no budget of their own.")


class BudgetConfig(BaseModel):
    """config/budgets.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: DefaultBudgets = Field(default_factory=DefaultBudgets)
    tenants: dict[Identifier, TenantBudgets] = Field(default_factory=dict)


def _limit(scope: str, period: str, limit: Limit | None) -> ScopeLimit:
    if limit is None:
        return ScopeLimit(scope, period)
    return ScopeLimit(
        scope,
        period,
        hard_nano=usd_to_nano(limit.hard_usd) if limit.hard_usd is not None else None,
        soft_nano=usd_to_nano(limit.soft_usd) if limit.soft_usd is not None else None,
    )


class BudgetPolicy:
    """Which scopes a cost lands in, and their limits.

    Scopes are computed for every decision, so each (scope, period) is built once and kept: the limits come
    from the configuration, which does not change while the service runs. The cache grows with the users,
    agents and models seen per month; `forget_before` drops past months.
    """

    def __init__(self, config: BudgetConfig) -> None:
        self._config = config
        self._cache: dict[tuple[str, str, str, str], ScopeLimit] = {}
        self._months: dict[tuple[int, int], str] = {}

    def _month(self, at: datetime) -> str:
        moment = at.astimezone(UTC) if at.tzinfo is not None else at
        key = (moment.year, moment.month)
        month = self._months.get(key)
        if month is None:
            self._months[key] = month = month_period(moment)
        return month

    def scopes(self, attribution: Attribution, at: datetime, task_budget_nano: int | None) -> list[ScopeLimit]:
        """Every scope of `attribution`, narrowest first; scopes without limits are listed too, since spend is
        tracked in all of them."""
        month = self._month(at)
        tenant = attribution.tenant
        scopes: list[ScopeLimit] = []
        if attribution.task_id is not None:
            scopes.append(ScopeLimit(Scope.task(attribution.task_id), TASK_PERIOD, hard_nano=task_budget_nano))
        cache = self._cache
        if attribution.user is not None:
            key = (tenant, "user", attribution.user, month)
            scopes.append(cache.get(key) or self._build(key))
        if attribution.agent is not None:
            key = (tenant, "agent", attribution.agent, month)
            scopes.append(cache.get(key) or self._build(key))
        if attribution.model is not None:
            key = (tenant, "model", attribution.model, month)
            scopes.append(cache.get(key) or self._build(key))
        key = (tenant, "tenant", tenant, month)
        scopes.append(cache.get(key) or self._build(key))
        return scopes

    def _build(self, key: tuple[str, str, str, str]) -> ScopeLimit:
        tenant_id, kind, name, month = key
        tenant = self._config.tenants.get(tenant_id)
        defaults = self._config.defaults
        if kind == "user":
            limit = tenant.users.get(name) if tenant else None
            if limit is None:
                limit = (tenant.default_user if tenant else None) or defaults.user
            scope = _limit(Scope.user(name), month, limit)
        elif kind == "agent":
            limit = tenant.agents.get(name) if tenant else None
            scope = _limit(Scope.agent(name), month, limit or defaults.agent)
        elif kind == "model":
            scope = _limit(Scope.model(name), month, tenant.models.get(name) if tenant else None)
        else:
            scope = _limit(Scope.tenant(name), month, tenant.monthly if tenant and tenant.monthly else defaults.tenant)
        self._cache[key] = scope
        return scope

    def forget_before(self, period: str) -> None:
        """Drop the scopes of months before `period` (no decision reads them any more)."""
        for key in [key for key in self._cache if key[3] < period]:
            del self._cache[key]
