"""Budgets: per tenant (monthly), per agent, per end user and per model within a tenant (monthly), per task.

Every scope a cost belongs to is checked and charged: a call by user `bob` of agent `assistant` in tenant
`acme` on model `m` lands in `task:<id>`, `user:bob`, `agent:assistant`, `model:m` and `tenant:acme`. A
hard limit denies reservations that would go over it; a soft limit publishes one alert per period.
"""

from __future__ import annotations

from datetime import datetime
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
    """Which scopes a cost lands in, and their limits."""

    def __init__(self, config: BudgetConfig) -> None:
        self._config = config

    def scopes(self, attribution: Attribution, at: datetime, task_budget_nano: int | None) -> list[ScopeLimit]:
        """Every scope of `attribution`, narrowest first; scopes without limits are listed too, since spend is
        tracked in all of them."""
        month = month_period(at)
        tenant = self._config.tenants.get(attribution.tenant)
        defaults = self._config.defaults
        scopes: list[ScopeLimit] = []
        if attribution.task_id is not None:
            scopes.append(ScopeLimit(Scope.task(attribution.task_id), TASK_PERIOD, hard_nano=task_budget_nano))
        if attribution.user is not None:
            user_limit = tenant.users.get(attribution.user) if tenant else None
            if user_limit is None:
                user_limit = (tenant.default_user if tenant else None) or defaults.user
            scopes.append(_limit(Scope.user(attribution.user), month, user_limit))
        if attribution.agent is not None:
            agent_limit = tenant.agents.get(attribution.agent) if tenant else None
            scopes.append(_limit(Scope.agent(attribution.agent), month, agent_limit or defaults.agent))
        if attribution.model is not None:
            model_limit = tenant.models.get(attribution.model) if tenant else None
            scopes.append(_limit(Scope.model(attribution.model), month, model_limit))
        tenant_limit = tenant.monthly if tenant and tenant.monthly else defaults.tenant
        scopes.append(_limit(Scope.tenant(attribution.tenant), month, tenant_limit))
        return scopes
