"""The budgets of one partition, in memory: counters, reservations and the tasks they belong to.

A replica holds the book of each partition it owns and is the only writer of those budgets, so it decides
a reservation against its own counters at once, without reading the database. The discipline is a two-phase
ledger's: a reservation is a pending transfer (status `open`, its amount held in the `reserved` counter of
every scope it touches); the usage record that names it posts it (`settled`: the actual cost goes to
`spent`, the hold is voided); closing the task or the expiry sweep voids it (`released`, `expired`). A
denial is recorded as well, so that the same reservation id gets the same verdict again.

Nothing here does I/O or reads a clock. Every change adds what makes it durable to the current batch's
`Plan`; the group commit writes the plan in one transaction, and nobody is answered before that commit. A
failed commit throws the book away (it is rebuilt from the database), so the book never keeps a change the
database does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from agentbus.contracts.budget import BudgetAlert
from agentbus.cost_accountant.budgets import BudgetPolicy
from agentbus.cost_accountant.domain import (
    TASK_PERIOD,
    Attribution,
    Counter,
    Scope,
    ScopeLimit,
    Verdict,
    alert_id,
    crossed_soft_limit,
    decide,
    nano_to_usd,
    period_start,
)
from agentbus.cost_accountant.limits import Admission, LimitsConfig, RateBook, RatePolicy
from agentbus.cost_accountant.ports import PricedUsage, ReservationInput

OPEN, SETTLED, RELEASED, EXPIRED, DENIED = "open", "settled", "released", "expired", "denied"

TaskKey = tuple[str, str]
"""(tenant, task_id)."""
ScopeKey = tuple[str, str]
"""(scope, period) within a tenant."""


@dataclass(slots=True, eq=False)
class Hold:
    """One reservation: what it holds (while open), in which scopes, and the verdict it was given."""

    tenant: str
    task_id: str
    reservation_id: str
    agent: str
    user: str | None
    kind: str
    model: str | None
    tool: str | None
    amount_nano: int
    """Held while open, then what was held; for a denial, the estimate that was refused."""
    status: str
    keys: tuple[ScopeKey, ...]
    verdict: Verdict
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None = None
    batch: int = 0
    """The batch that last changed it (0: as loaded from the database)."""
    tokens: int = 0
    """An admitted LLM call: its estimated tokens (what the rate limits counted)."""


@dataclass(slots=True, eq=False)
class TaskBook:
    """A task: who it belongs to (from its first reservation), whether it is closed, its reservations and
    the usage ids of its ledger rows."""

    tenant: str
    task_id: str
    agent: str | None = None
    user: str | None = None
    budget_nano: int | None = None
    closed_at: datetime | None = None
    stored: bool = False
    """Its row is in the database, or in the batch being written."""
    first_seen_at: datetime | None = None
    holds: dict[str, Hold] = field(default_factory=dict)
    usage: set[str] = field(default_factory=set)
    open_holds: int = 0
    batch: int = 0
    touched_at: datetime | None = None

    @property
    def key(self) -> TaskKey:
        return (self.tenant, self.task_id)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def counter_key(self) -> ScopeKey:
        return (Scope.task(self.task_id), TASK_PERIOD)


class LedgerEntry(NamedTuple):
    """A priced usage record as the ledger keeps it: attributed to the task's agent and user."""

    priced: PricedUsage
    agent: str | None
    user: str | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class StoredHold:
    """A reservation row as read from the database."""

    tenant: str
    task_id: str
    reservation_id: str
    agent: str
    user: str | None
    kind: str
    model: str | None
    tool: str | None
    amount_nano: int
    status: str
    keys: tuple[ScopeKey, ...]
    denied_budget: str | None
    limit_nano: int | None
    committed_nano: int | None
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None


@dataclass(frozen=True, slots=True)
class StoredTask:
    """What the database knows of a task: its row (if any), its ledger rows' ids and costs, its reservations."""

    tenant: str
    task_id: str
    row: tuple[str | None, str | None, int | None, datetime | None, datetime | None] | None
    """(agent, user, budget_nano, first_seen_at, closed_at), or None when the task has no row."""
    usage: dict[str, int]
    holds: list[StoredHold]


@dataclass(frozen=True, slots=True)
class MonthlySpend:
    """The ledger's spend of one attribution in one month (a row of the rebuild's aggregate)."""

    tenant: str
    user: str | None
    agent: str | None
    model: str | None
    period: str
    spent_nano: int


@dataclass(slots=True)
class Plan:
    """What one batch changed in one partition, to be written in the group commit's transaction."""

    ledger: list[LedgerEntry] = field(default_factory=list)
    new_holds: dict[tuple[str, str, str], Hold] = field(default_factory=dict)
    changed_holds: list[Hold] = field(default_factory=list)
    new_tasks: dict[TaskKey, TaskBook] = field(default_factory=dict)
    closed_tasks: list[TaskBook] = field(default_factory=list)
    alerts: list[BudgetAlert] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.ledger or self.new_holds or self.changed_holds or self.new_tasks or self.closed_tasks or self.alerts
        )


class PartitionBook:
    """The book of one partition at one lease epoch. Every method is a decision in memory."""

    def __init__(
        self,
        partition: int,
        epoch: int,
        policy: BudgetPolicy,
        *,
        since_period: str,
        reservation_ttl: timedelta,
        rates: RatePolicy | None = None,
    ) -> None:
        self.partition = partition
        self.epoch = epoch
        self._policy = policy
        self._ttl = reservation_ttl
        self.since_period = since_period
        """Monthly counters are exact from this period on (the rebuild reads the ledger from its start)."""
        self.counters: dict[str, dict[ScopeKey, Counter]] = {}
        self.tasks: dict[TaskKey, TaskBook] = {}
        self.open: dict[tuple[str, str, str], Hold] = {}
        self.plan = Plan()
        self.batch = 0
        self.committed = 0
        self._batch_usage: set[tuple[str, str]] = set()
        self.rates = RateBook(rates or RatePolicy(LimitsConfig()))

    # --- loading ------------------------------------------------------------------------------------

    @classmethod
    def rebuilt(
        cls,
        partition: int,
        epoch: int,
        policy: BudgetPolicy,
        *,
        since_period: str,
        reservation_ttl: timedelta,
        monthly: Iterable[MonthlySpend],
        tasks: Iterable[StoredTask],
        rates: RatePolicy | None = None,
        admissions: Iterable[Admission] = (),
        open_tasks: Mapping[str, int] | None = None,
        now: datetime | None = None,
    ) -> PartitionBook:
        """The book as the database has it: monthly spend from the ledger, every task with an open
        reservation (each with its own spend and holds), and the rate buckets' levels in the window of `now`
        (from the LLM reservations admitted in it) with each tenant's open tasks."""
        book = cls(partition, epoch, policy, since_period=since_period, reservation_ttl=reservation_ttl, rates=rates)
        if now is not None:
            book.rates.admitted(list(admissions), now)
        book.rates.open_tasks.update({tenant: count for tenant, count in (open_tasks or {}).items() if count > 0})
        for spend in monthly:
            attribution = Attribution(spend.tenant, None, spend.agent, spend.user, spend.model)
            counters = book.counters.setdefault(spend.tenant, {})
            for scope in policy.scopes(attribution, period_start(spend.period), None):
                counter = counters.get(scope.key)
                if counter is None:
                    counters[scope.key] = counter = Counter()
                counter.spent_nano += spend.spent_nano
        for task in tasks:
            book.install(task)
        return book

    def has_task(self, key: TaskKey) -> bool:
        return key in self.tasks

    def install(self, stored: StoredTask) -> TaskBook:
        """Take a task as the database has it (an unknown task is a new, empty one)."""
        task = TaskBook(stored.tenant, stored.task_id)
        if stored.row is not None:
            task.agent, task.user, task.budget_nano, task.first_seen_at, task.closed_at = stored.row
            task.stored = True
        task.usage = set(stored.usage)
        counters = self.counters.setdefault(task.tenant, {})
        counters[task.counter_key] = Counter(spent_nano=sum(stored.usage.values()))
        for row in stored.holds:
            hold = _hold_from_row(row)
            task.holds[hold.reservation_id] = hold
            if hold.status == OPEN:
                self._hold(counters, hold)
                task.open_holds += 1
        self.tasks[task.key] = task
        return task

    def _task(self, tenant: str, task_id: str, now: datetime) -> TaskBook:
        task = self.tasks[(tenant, task_id)]
        task.touched_at = now
        task.batch = self.batch
        return task

    # --- batches ------------------------------------------------------------------------------------

    def begin(self, batch: int) -> None:
        self.batch = batch
        self.plan = Plan()
        self._batch_usage.clear()

    def take_plan(self) -> Plan:
        plan, self.plan = self.plan, Plan()
        return plan

    def mark_committed(self, batch: int) -> None:
        self.committed = batch

    def pending(self, task: TaskBook) -> bool:
        """True while a change of the task is decided but not yet committed."""
        return task.batch > self.committed

    # --- reservations -------------------------------------------------------------------------------

    def reserve(self, request: ReservationInput, now: datetime) -> Verdict | None:
        """Allow or deny a reservation against every budget that applies; None when its task is closed.
        The same reservation id gets its first verdict again."""
        task = self._task(request.tenant, request.task_id, now)
        hold = task.holds.get(request.reservation_id)
        if hold is not None:
            return hold.verdict
        if task.closed:
            return None
        llm = request.kind == "llm"
        throttle = self.rates.check(
            request.tenant,
            request.agent,
            request.user,
            request.model,
            request.tokens,
            now,
            new_task=not task.stored,
            llm=llm,
            reservation_id=request.reservation_id,
        )
        if throttle is not None:
            # Nothing is kept: the same reservation id asks again once the limit allows it.
            return Verdict(
                False, 0, rate_limit=throttle.limit, wait_seconds=throttle.wait_seconds, rate_reject=throttle.reject
            )
        attribution = Attribution(
            request.tenant,
            request.task_id,
            request.agent,
            request.user,
            request.model if request.kind == "llm" else None,
        )
        scopes = self._policy.scopes(attribution, now, request.task_budget_nano)
        counters = self.counters.setdefault(request.tenant, {})
        verdict = decide(request.amount_nano, scopes, counters)
        hold = Hold(
            tenant=request.tenant,
            task_id=request.task_id,
            reservation_id=request.reservation_id,
            agent=request.agent,
            user=request.user,
            kind=request.kind,
            model=request.model,
            tool=request.tool,
            amount_nano=request.amount_nano,
            status=OPEN if verdict.allowed else DENIED,
            keys=tuple(scope.key for scope in scopes),
            verdict=verdict,
            created_at=now,
            expires_at=now + self._ttl,
            closed_at=None if verdict.allowed else now,
            batch=self.batch,
            tokens=request.tokens if verdict.allowed and llm else 0,
        )
        task.holds[hold.reservation_id] = hold
        if verdict.allowed:
            self._hold(counters, hold)
            task.open_holds += 1
            if llm:
                self.rates.admit(
                    Admission(request.tenant, request.agent, request.user, request.model, request.tokens, now), now
                )
        self.plan.new_holds[(hold.tenant, hold.task_id, hold.reservation_id)] = hold
        if not task.stored:
            # The first reservation says whose task it is: later usage records are charged to this user.
            task.agent, task.user, task.budget_nano = request.agent, request.user, request.task_budget_nano
            task.first_seen_at = now
            task.stored = True
            self.plan.new_tasks[task.key] = task
            self.rates.opened(task.tenant)
        return verdict

    def _hold(self, counters: dict[ScopeKey, Counter], hold: Hold) -> None:
        for key in hold.keys:
            counter = counters.get(key)
            if counter is None:
                counters[key] = counter = Counter()
            counter.reserved_nano += hold.amount_nano
        self.open[(hold.tenant, hold.task_id, hold.reservation_id)] = hold

    def _void(self, hold: Hold, status: str, now: datetime) -> None:
        """End an open hold: settled (posted), released or expired (voided); its amount is no longer held."""
        counters = self.counters[hold.tenant]
        for key in hold.keys:
            counters[key].reserved_nano -= hold.amount_nano
        hold.status = status
        hold.closed_at = now
        hold.batch = self.batch
        del self.open[(hold.tenant, hold.task_id, hold.reservation_id)]
        task = self.tasks.get((hold.tenant, hold.task_id))
        if task is not None:
            task.open_holds -= 1
            task.batch = self.batch
        if (hold.tenant, hold.task_id, hold.reservation_id) not in self.plan.new_holds:
            self.plan.changed_holds.append(hold)

    def close(self, tenant: str, task_id: str, now: datetime) -> int:
        """Close a task: void its open holds and refuse its later reservations. The nano-dollars given back
        (0 when it was closed already)."""
        task = self._task(tenant, task_id, now)
        if task.closed:
            return 0
        released = 0
        for hold in list(task.holds.values()):
            if hold.status == OPEN:
                released += hold.amount_nano
                self._void(hold, RELEASED, now)
        if task.stored:
            self.rates.closed(task.tenant)
        task.closed_at = now
        if not task.stored:
            task.first_seen_at = now
            task.stored = True
            self.plan.new_tasks[task.key] = task
        elif task.key not in self.plan.new_tasks:
            self.plan.closed_tasks.append(task)
        return released

    def expire(self, now: datetime) -> int:
        """Void every open hold past its expiry; the nano-dollars given back."""
        expired = [hold for hold in self.open.values() if hold.expires_at < now]
        for hold in expired:
            self._void(hold, EXPIRED, now)
        return sum(hold.amount_nano for hold in expired)

    # --- usage --------------------------------------------------------------------------------------

    def record(self, entry: PricedUsage, now: datetime, *, in_ledger: bool) -> bool:
        """Post a priced usage record: its cost to every scope it lands in, settling the reservation it
        names. False for a record whose usage id is in the ledger already (`in_ledger`) or in this batch."""
        usage = entry.usage
        if in_ledger or (usage.tenant, usage.usage_id) in self._batch_usage:
            return False
        task: TaskBook | None = None
        if usage.task_id is not None:
            task = self._task(usage.tenant, usage.task_id, now)
            if usage.usage_id in task.usage:
                return False
            task.usage.add(usage.usage_id)
        self._batch_usage.add((usage.tenant, usage.usage_id))
        agent = usage.agent or (task.agent if task is not None else None)
        user = task.user if task is not None else None
        attribution = Attribution(usage.tenant, usage.task_id, agent, user, usage.model)
        scopes = self._policy.scopes(attribution, usage.at, task.budget_nano if task is not None else None)
        counters = self.counters.setdefault(usage.tenant, {})
        for scope in scopes:
            if scope.period != TASK_PERIOD and scope.period < self.since_period:
                continue  # a month older than the book keeps: in the ledger, not needed for decisions
            counter = counters.get(scope.key)
            if counter is None:
                counters[scope.key] = counter = Counter()
            before = counter.spent_nano
            counter.spent_nano += entry.cost_nano
            if crossed_soft_limit(scope, before, counter.spent_nano):
                self.plan.alerts.append(_alert(usage.tenant, scope, counter.spent_nano, now))
        if task is not None and usage.reservation_id is not None:
            hold = task.holds.get(usage.reservation_id)
            if hold is not None and hold.status == OPEN:
                self._void(hold, SETTLED, now)
        self.plan.ledger.append(LedgerEntry(entry, agent, user, now))
        return True

    # --- reads --------------------------------------------------------------------------------------

    def task_cost(self, key: TaskKey, usage_ids: Sequence[str]) -> tuple[int, list[str]]:
        """The task's priced cost (its ledger rows) and which of `usage_ids` are not in the ledger yet."""
        task = self.tasks[key]
        counter = self.counters[task.tenant][task.counter_key]
        return counter.spent_nano, [usage_id for usage_id in usage_ids if usage_id not in task.usage]

    def counter(self, tenant: str, scope: str, period: str) -> Counter:
        """A copy of what a scope has spent and holds reserved in a period."""
        counter = self.counters.get(tenant, {}).get((scope, period), Counter())
        return Counter(counter.spent_nano, counter.reserved_nano)

    # --- upkeep -------------------------------------------------------------------------------------

    def evict(self, idle_before: datetime) -> int:
        """Forget tasks untouched since `idle_before` that hold nothing and have nothing uncommitted (they are
        read again from the database when next needed); the number forgotten."""
        idle = [
            task
            for task in self.tasks.values()
            if task.open_holds == 0
            and not self.pending(task)
            and (task.touched_at is None or task.touched_at <= idle_before)
        ]
        for task in idle:
            del self.tasks[task.key]
            self.counters[task.tenant].pop(task.counter_key, None)
        return len(idle)

    def forget_months_before(self, period: str) -> None:
        """Drop monthly counters of periods before `period`: no decision reads them any more."""
        if period <= self.since_period:
            return
        self.since_period = period
        for counters in self.counters.values():
            for key in [key for key in counters if key[1] != TASK_PERIOD and key[1] < period]:
                del counters[key]


def _hold_from_row(row: StoredHold) -> Hold:
    if row.status == DENIED:
        verdict = Verdict(False, 0, row.denied_budget, row.limit_nano, row.committed_nano, row.amount_nano or None)
    else:
        verdict = Verdict(True, row.amount_nano)
    return Hold(
        tenant=row.tenant,
        task_id=row.task_id,
        reservation_id=row.reservation_id,
        agent=row.agent,
        user=row.user,
        kind=row.kind,
        model=row.model,
        tool=row.tool,
        amount_nano=row.amount_nano,
        status=row.status,
        keys=row.keys,
        verdict=verdict,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
    )


def _alert(tenant: str, scope: ScopeLimit, spent_nano: int, now: datetime) -> BudgetAlert:
    return BudgetAlert(
        alert_id=alert_id(tenant, scope),
        tenant=tenant,
        budget=scope.scope,
        soft_limit_usd=nano_to_usd(scope.soft_nano or 0),
        hard_limit_usd=nano_to_usd(scope.hard_nano) if scope.hard_nano is not None else None,
        spent_usd=nano_to_usd(spent_nano),
        at=now,
    )
