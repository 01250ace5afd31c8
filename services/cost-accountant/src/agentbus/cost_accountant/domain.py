"""Pure accounting rules: money in integer nano-dollars, budget periods, scopes, and the allow/deny decision.

Money is kept as integers of 1e-9 USD so that sums and limit comparisons are exact: a price of $0.15 per
million tokens is 150 nano-dollars per token, and nothing is lost to float rounding however many rows a
budget adds up.

The limit rule: spending exactly up to a hard limit is allowed. A reservation is denied when it would take
`spent + reserved + amount` strictly above the limit; `spent + reserved + amount == limit` is allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import NamedTuple

NANO_PER_USD = 1_000_000_000

TASK_PERIOD = "task"
"""Task budgets cover the task's whole life; every other budget is per UTC calendar month."""


def usd_to_nano(usd: Decimal | float | int) -> int:
    """Dollars to integer nano-dollars, rounding half up (through Decimal, never binary float maths)."""
    amount = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    return int((amount * NANO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nano_to_usd(nano: int) -> float:
    """Nano-dollars to dollars for the wire (exact for any amount below about $9 million)."""
    return nano / NANO_PER_USD


def month_period(at: datetime) -> str:
    """The monthly budget period an instant falls in: 'YYYY-MM' in UTC."""
    moment = at.astimezone(UTC) if at.tzinfo is not None else at
    return f"{moment.year:04d}-{moment.month:02d}"


def previous_period(period: str) -> str:
    """The month before a 'YYYY-MM' period."""
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def period_start(period: str) -> datetime:
    """The first instant of a 'YYYY-MM' period, as naive UTC (the ledger's time columns)."""
    return datetime(int(period[:4]), int(period[5:7]), 1)


class Scope:
    """Names of budget scopes, as replies, alerts and `budget_exceeded` events spell them."""

    @staticmethod
    def task(task_id: str) -> str:
        return f"task:{task_id}"

    @staticmethod
    def user(user: str) -> str:
        return f"user:{user}"

    @staticmethod
    def agent(agent: str) -> str:
        return f"agent:{agent}"

    @staticmethod
    def model(model: str) -> str:
        return f"model:{model}"

    @staticmethod
    def tenant(tenant: str) -> str:
        return f"tenant:{tenant}"


class Attribution(NamedTuple):
    """Who a cost belongs to: every scope it lands in is derived from this. (A tuple: one is built for every
    decision and every usage record.)"""

    tenant: str
    task_id: str | None
    agent: str | None
    user: str | None
    model: str | None


@dataclass(frozen=True)
class ScopeLimit:
    """One budget scope a cost lands in, in one period, with its limits (None: no such limit)."""

    scope: str
    period: str
    hard_nano: int | None = None
    soft_nano: int | None = None

    @functools.cached_property
    def key(self) -> tuple[str, str]:
        # Cached: the policy hands the same scope objects to every decision of a month.
        return (self.scope, self.period)


@dataclass(slots=True)
class Counter:
    """What a scope has spent (posted to the ledger) and holds reserved (pending) in one period.

    Mutable: the budget book changes its counters in place, once per decision.
    """

    spent_nano: int = 0
    reserved_nano: int = 0

    @property
    def committed_nano(self) -> int:
        return self.spent_nano + self.reserved_nano


@dataclass(frozen=True)
class Verdict:
    """The answer to a reservation. A denial names the budget, its limit and what it already holds."""

    allowed: bool
    amount_nano: int
    budget: str | None = None
    limit_nano: int | None = None
    committed_nano: int | None = None
    requested_nano: int | None = None
    """Denials: the estimate that was refused."""
    rate_limit: str | None = None
    """A rate limit held the call back (nothing reserved): the limit's name."""
    wait_seconds: float | None = None
    """Held back: how long until the limit allows the call."""
    rate_reject: bool = False
    """Held back by a limit whose policy refuses new tasks rather than queueing them."""


def decide(amount_nano: int, scopes: list[ScopeLimit], counters: Mapping[tuple[str, str], Counter]) -> Verdict:
    """Allow the amount only if every scope with a hard limit stays at or under it.

    Every applicable scope is checked (a user's budget binds even when the tenant's and the agent's allow
    the call); the first one, in the order given (narrowest first), that would go over is named.
    """
    for scope in scopes:
        if scope.hard_nano is None:
            continue
        committed = counters.get(scope.key, Counter()).committed_nano
        if committed + amount_nano > scope.hard_nano:
            return Verdict(False, 0, scope.scope, scope.hard_nano, committed, amount_nano)
    return Verdict(True, amount_nano)


def crossed_soft_limit(scope: ScopeLimit, spent_before: int, spent_after: int) -> bool:
    """True when this change of spend reached the scope's soft limit (at most once per period)."""
    return scope.soft_nano is not None and spent_before < scope.soft_nano <= spent_after


def alert_id(tenant: str, scope: ScopeLimit) -> str:
    """The idempotency key of a soft-limit alert: one per tenant, budget, period and threshold."""
    return f"alert:{tenant}:{scope.scope}:{scope.period}:soft:{scope.soft_nano}"
