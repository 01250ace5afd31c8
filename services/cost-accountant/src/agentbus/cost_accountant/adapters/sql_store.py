"""The ledger and budgets in SQL through SQLAlchemy Core (async): SQLite by default, Postgres via asyncpg.

Atomicity of allow/deny. A reservation adds its amount to the counter row of every scope it touches with
one `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` in a fixed key order. On Postgres that takes the
rows' locks until commit (the same order everywhere, so two writers cannot deadlock), and the returned
totals include every reservation committed before; if a hard limit is exceeded the amount is taken back in
the same transaction and the reservation is recorded as denied. A concurrent reservation on the same
budget waits for the lock and then sees the new total. On SQLite every write transaction starts with
`BEGIN IMMEDIATE`, which takes the database's single write lock up front, so the read-decide-write cannot
interleave either, across processes too; an in-process lock only keeps this process's writers from
polling SQLite's busy handler.

Idempotency. The ledger's primary key is the usage id (`INSERT ... ON CONFLICT DO NOTHING`): a
redelivered record writes nothing and changes no counter. A reservation id answers its first verdict again.
Everything a record causes (its ledger row, the settlement of its reservation, the counters of every
scope, a soft-limit alert in the outbox) commits in one transaction, so the ledger is never half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from agentbus.contracts.budget import BudgetAlert
from agentbus.cost_accountant.adapters.schema import budget_alerts, budget_counters, ledger, reservations, tasks
from agentbus.cost_accountant.budgets import BudgetPolicy
from agentbus.cost_accountant.domain import (
    Attribution,
    Counter,
    ScopeLimit,
    Verdict,
    alert_id,
    crossed_soft_limit,
    decide,
    nano_to_usd,
)
from agentbus.cost_accountant.ports import PricedUsage, ReportKey, ReportLine, ReservationInput, UsageWrite
from agentbus.runtime.logging import get_logger
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_log = get_logger(__name__)

T = TypeVar("T")

MIGRATIONS = "agentbus.cost_accountant:migrations"
# Any constant works: it only has to be the same for every replica running migrations at start-up.
MIGRATION_LOCK_KEY = 0x636F7374
SQLITE_BEGIN_OPTION = "agentbus_sqlite_begin"
OPEN, SETTLED, RELEASED, EXPIRED, DENIED = "open", "settled", "released", "expired", "denied"
# Postgres: deadlock detected, serialization failure; SQLite: database locked beyond the busy timeout.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_ATTEMPTS = 6
_KNOWN_TASKS_LIMIT = 10_000

ScopeKey = tuple[str, str, str]
"""(tenant, scope, period): one budget counter row."""


def create_engine(url: str, *, schema: str | None = None, pool_size: int = 10) -> AsyncEngine:
    """An async engine for `url`, set up for the accountant's transactions (see the module docstring)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _use_immediate_transactions(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if schema is not None:
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(url, connect_args=connect_args, pool_size=pool_size, max_overflow=pool_size)


def _use_immediate_transactions(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins, so BEGIN IMMEDIATE can be sent.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """`alembic upgrade head` with the migrations shipped in the package. Safe when replicas start together:
    on Postgres an advisory lock makes them take turns; on SQLite the immediate transaction does."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await connection.run_sync(_upgrade, config)


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _retryable(exc: DBAPIError) -> bool:
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(orig)


class SqlAccountantStore:
    """The accountant's store on an async SQLAlchemy engine (see the module docstring for the guarantees)."""

    def __init__(self, engine: AsyncEngine, policy: BudgetPolicy, *, reservation_ttl_seconds: float) -> None:
        self._engine = engine
        self._policy = policy
        self._reservation_ttl = timedelta(seconds=reservation_ttl_seconds)
        self._dialect = engine.dialect.name
        self._sqlite_writer = asyncio.Lock() if self._dialect == "sqlite" else None
        self._known_tasks: dict[tuple[str, str], None] = {}

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    # --- transactions ------------------------------------------------------------------------------

    def _insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    @contextlib.asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        lock = self._sqlite_writer if self._sqlite_writer is not None else contextlib.nullcontext()
        async with lock, self._engine.begin() as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def _read_transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as connection:
            await connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
            yield connection

    async def _write(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `work` in one write transaction, again from the start after a deadlock or serialization failure."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with self._write_transaction() as connection:
                    return await work(connection)
            except DBAPIError as exc:
                if not _retryable(exc) or attempt == _MAX_ATTEMPTS:
                    raise
                _log.info("transaction_retried", attempt=attempt, error=str(exc.orig))
            await asyncio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    # --- reservations ------------------------------------------------------------------------------

    async def reserve(self, reservation: ReservationInput, now: datetime) -> Verdict:
        """Allow or deny one reservation (see `reserve_many`)."""
        return (await self.reserve_many([reservation], now))[0]

    async def reserve_many(self, batch: Sequence[ReservationInput], now: datetime) -> list[Verdict]:
        """Allow or deny each reservation, in order, in one transaction: atomically against every concurrent
        reservation, each seeing those before it. A repeated id gets its first verdict."""
        verdicts = await self._write(lambda c: self._reserve_batch(c, batch, now))
        for reservation in batch:
            self._remember_task((reservation.tenant, reservation.task_id))
        return verdicts

    def _remember_task(self, key: tuple[str, str]) -> None:
        # Only after commit: a task row written by a transaction that rolled back must be written again.
        self._known_tasks[key] = None
        if len(self._known_tasks) > _KNOWN_TASKS_LIMIT:
            del self._known_tasks[next(iter(self._known_tasks))]

    async def _reserve_batch(
        self, connection: AsyncConnection, batch: Sequence[ReservationInput], now: datetime
    ) -> list[Verdict]:
        if len(batch) > 1 and self._dialect == "postgresql":
            # Lock every counter the batch touches up front, in the one global key order, so that this
            # transaction cannot deadlock with another replica's (a zero-amount upsert takes the row locks).
            keys = sorted({(r.tenant, *key) for r in batch for key in self._scope_keys(r, now)})
            await self._add_to_counters(connection, keys, 0)
        return [await self._reserve(connection, request, now) for request in batch]

    def _scopes(self, request: ReservationInput, now: datetime) -> list[ScopeLimit]:
        attribution = Attribution(
            tenant=request.tenant,
            task_id=request.task_id,
            agent=request.agent,
            user=request.user,
            model=request.model if request.kind == "llm" else None,
        )
        return self._policy.scopes(attribution, now, request.task_budget_nano)

    def _scope_keys(self, request: ReservationInput, now: datetime) -> list[tuple[str, str]]:
        return sorted(scope.key for scope in self._scopes(request, now))

    async def _reserve(self, connection: AsyncConnection, request: ReservationInput, now: datetime) -> Verdict:
        moment = _naive_utc(now)
        scopes = self._scopes(request, now)
        keys = sorted(scope.key for scope in scopes)
        # Claiming the id first makes a concurrent twin of this request wait here for our commit and then
        # read our verdict, instead of deciding a second time.
        claimed = await connection.execute(
            self._insert(reservations)
            .on_conflict_do_nothing(index_elements=["reservation_id"])
            .returning(reservations.c.reservation_id),
            {
                "reservation_id": request.reservation_id,
                "tenant": request.tenant,
                "task_id": request.task_id,
                "agent": request.agent,
                "submitted_by": request.user,
                "kind": request.kind,
                "model": request.model,
                "tool": request.tool,
                "amount_nanousd": request.amount_nano,
                "status": OPEN,
                "scopes": json.dumps([list(key) for key in keys]),
                "created_at": moment,
                "expires_at": moment + self._reservation_ttl,
            },
        )
        if claimed.first() is None:
            return await self._recorded_verdict(connection, request.reservation_id)
        if (request.tenant, request.task_id) not in self._known_tasks:
            await connection.execute(
                self._insert(tasks).on_conflict_do_nothing(),
                {
                    "tenant": request.tenant,
                    "task_id": request.task_id,
                    "agent": request.agent,
                    "submitted_by": request.user,
                    "budget_nanousd": request.task_budget_nano,
                    "first_seen_at": moment,
                },
            )
        # Add the amount to every scope first: the upsert creates missing counters, locks them all (in key
        # order) until commit and returns their totals, so the check below sees every earlier reservation.
        tenant_keys = [(request.tenant, scope, period) for scope, period in keys]
        held = await self._add_to_counters(connection, tenant_keys, request.amount_nano)
        before = {key: Counter(c.spent_nano, c.reserved_nano - request.amount_nano) for key, c in held.items()}
        verdict = decide(request.amount_nano, scopes, before)
        if not verdict.allowed:
            await self._add_to_counters(connection, tenant_keys, -request.amount_nano)
            await connection.execute(
                update(reservations)
                .where(reservations.c.reservation_id == request.reservation_id)
                .values(
                    status=DENIED,
                    amount_nanousd=0,
                    denied_budget=verdict.budget,
                    limit_nanousd=verdict.limit_nano,
                    committed_nanousd=verdict.committed_nano,
                    closed_at=moment,
                )
            )
        return verdict

    async def _recorded_verdict(self, connection: AsyncConnection, reservation_id: str) -> Verdict:
        row = (
            await connection.execute(select(reservations).where(reservations.c.reservation_id == reservation_id))
        ).one()
        return Verdict(
            allowed=row.status != DENIED,
            amount_nano=row.amount_nanousd,
            budget=row.denied_budget,
            limit_nano=row.limit_nanousd,
            committed_nano=row.committed_nanousd,
        )

    async def _add_to_counters(
        self, connection: AsyncConnection, keys: list[ScopeKey], reserved_nano: int
    ) -> dict[tuple[str, str], Counter]:
        """Add to the reserved amount of each counter (creating it), in the given order; their new totals."""
        counters = self._insert(budget_counters)
        upsert = counters.on_conflict_do_update(
            index_elements=["tenant", "scope", "period"],
            set_={"reserved_nanousd": budget_counters.c.reserved_nanousd + counters.excluded.reserved_nanousd},
        ).returning(
            budget_counters.c.scope,
            budget_counters.c.period,
            budget_counters.c.spent_nanousd,
            budget_counters.c.reserved_nanousd,
        )
        rows = await connection.execute(
            upsert,
            [
                {"tenant": t, "scope": s, "period": p, "spent_nanousd": 0, "reserved_nanousd": reserved_nano}
                for t, s, p in keys
            ],
        )
        return {(row.scope, row.period): Counter(row.spent_nanousd, row.reserved_nanousd) for row in rows}

    async def release_task(self, tenant: str, task_id: str, now: datetime) -> int:
        """Release every open reservation of a task; the nano-dollars given back."""
        return await self._write(
            lambda c: self._close_reservations(
                c,
                RELEASED,
                now,
                (reservations.c.tenant == tenant) & (reservations.c.task_id == task_id),
            )
        )

    async def expire_reservations(self, now: datetime) -> int:
        """Release every open reservation past its expiry; the nano-dollars given back."""
        return await self._write(
            lambda c: self._close_reservations(c, EXPIRED, now, reservations.c.expires_at < _naive_utc(now))
        )

    async def _close_reservations(self, connection: AsyncConnection, status: str, now: datetime, where: Any) -> int:
        # The status condition claims each reservation once, even with several replicas sweeping at once.
        claimed = await connection.execute(
            update(reservations)
            .where(where)
            .where(reservations.c.status == OPEN)
            .values(status=status, closed_at=_naive_utc(now))
            .returning(reservations.c.tenant, reservations.c.amount_nanousd, reservations.c.scopes)
        )
        deltas: dict[ScopeKey, list[int]] = defaultdict(lambda: [0, 0])
        total = 0
        for row in claimed:
            total += row.amount_nanousd
            for scope, period in json.loads(row.scopes):
                deltas[(row.tenant, scope, period)][1] -= row.amount_nanousd
        await self._apply_deltas(connection, deltas, {}, now)
        return total

    # --- usage -------------------------------------------------------------------------------------

    async def record_usage(self, entries: Sequence[PricedUsage], now: datetime) -> UsageWrite:
        """Write a batch of priced usage records in one transaction; repeats of a usage id change nothing."""
        unique: dict[str, PricedUsage] = {}
        for entry in entries:
            unique.setdefault(entry.usage.usage_id, entry)
        batch = [unique[usage_id] for usage_id in sorted(unique)]  # one lock order for concurrent writers
        inserted, alerts = await self._write(lambda c: self._record(c, batch, now))
        first_seen: set[str] = set()
        flags = []
        for entry in entries:
            usage_id = entry.usage.usage_id
            flags.append(usage_id in inserted and usage_id not in first_seen)
            first_seen.add(usage_id)
        return UsageWrite(inserted=flags, alerts_queued=alerts)

    async def _record(
        self, connection: AsyncConnection, batch: list[PricedUsage], now: datetime
    ) -> tuple[set[str], int]:
        task_keys = {(e.usage.tenant, e.usage.task_id) for e in batch if e.usage.task_id is not None}
        known_tasks: dict[tuple[str, str], Any] = {}
        if task_keys:
            rows = await connection.execute(
                select(tasks).where(tuple_(tasks.c.tenant, tasks.c.task_id).in_(sorted(task_keys)))
            )
            known_tasks = {(row.tenant, row.task_id): row for row in rows}
        moment = _naive_utc(now)
        rows_by_id: dict[str, dict[str, Any]] = {}
        for entry in batch:
            usage = entry.usage
            task = known_tasks.get((usage.tenant, usage.task_id)) if usage.task_id else None
            at = _naive_utc(usage.at)
            rows_by_id[usage.usage_id] = {
                "usage_id": usage.usage_id,
                "kind": usage.kind,
                "tenant": usage.tenant,
                "task_id": usage.task_id,
                "agent": usage.agent or (task.agent if task is not None else None),
                "submitted_by": task.submitted_by if task is not None else None,
                "model": usage.model,
                "tool": usage.tool,
                "node_class": usage.node_class,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "gpu_seconds": usage.gpu_seconds,
                "cost_nanousd": entry.cost_nano,
                "priced_by_default": entry.priced_by_default,
                "reservation_id": usage.reservation_id,
                "at": at,
                "day": at.date().isoformat(),
                "recorded_at": moment,
            }
        result = await connection.execute(
            self._insert(ledger).on_conflict_do_nothing(index_elements=["usage_id"]).returning(ledger.c.usage_id),
            list(rows_by_id.values()),
        )
        inserted = set(result.scalars())
        if not inserted:
            return inserted, 0
        deltas: dict[ScopeKey, list[int]] = defaultdict(lambda: [0, 0])
        limits: dict[ScopeKey, ScopeLimit] = {}
        settling: set[tuple[str, str]] = set()
        for usage_id in sorted(inserted):
            row = rows_by_id[usage_id]
            task = known_tasks.get((row["tenant"], row["task_id"])) if row["task_id"] else None
            attribution = Attribution(row["tenant"], row["task_id"], row["agent"], row["submitted_by"], row["model"])
            budget = task.budget_nanousd if task is not None else None
            for scope in self._policy.scopes(attribution, row["at"], budget):
                key = (row["tenant"], scope.scope, scope.period)
                deltas[key][0] += row["cost_nanousd"]
                limits[key] = scope
            if row["reservation_id"]:
                settling.add((row["tenant"], row["reservation_id"]))
        if settling:
            settled = await connection.execute(
                update(reservations)
                # A record settles only its own tenant's reservation, whatever id it names.
                .where(tuple_(reservations.c.tenant, reservations.c.reservation_id).in_(sorted(settling)))
                .where(reservations.c.status == OPEN)
                .values(status=SETTLED, closed_at=moment)
                .returning(reservations.c.tenant, reservations.c.amount_nanousd, reservations.c.scopes)
            )
            for reservation in settled:
                for scope, period in json.loads(reservation.scopes):
                    deltas[(reservation.tenant, scope, period)][1] -= reservation.amount_nanousd
        alerts = await self._apply_deltas(connection, deltas, limits, now)
        return inserted, alerts

    async def _apply_deltas(
        self,
        connection: AsyncConnection,
        deltas: dict[ScopeKey, list[int]],
        limits: dict[ScopeKey, ScopeLimit],
        now: datetime,
    ) -> int:
        """Add (spent, reserved) deltas to counters in key order; queue an alert for each soft limit reached."""
        changes = [(key, spent, reserved) for key, (spent, reserved) in sorted(deltas.items()) if spent or reserved]
        if not changes:
            return 0
        upsert = self._insert(budget_counters)
        upsert = upsert.on_conflict_do_update(
            index_elements=["tenant", "scope", "period"],
            set_={
                "spent_nanousd": budget_counters.c.spent_nanousd + upsert.excluded.spent_nanousd,
                "reserved_nanousd": budget_counters.c.reserved_nanousd + upsert.excluded.reserved_nanousd,
            },
        )
        watched = {key for key, spent, _ in changes if spent > 0 and key in limits and limits[key].soft_nano}
        params = [
            {"tenant": t, "scope": s, "period": p, "spent_nanousd": spent, "reserved_nanousd": reserved}
            for (t, s, p), spent, reserved in changes
        ]
        if not watched:
            await connection.execute(upsert, params)
            return 0
        returned = await connection.execute(
            upsert.returning(
                budget_counters.c.tenant,
                budget_counters.c.scope,
                budget_counters.c.period,
                budget_counters.c.spent_nanousd,
            ),
            params,
        )
        spent_after = {(row.tenant, row.scope, row.period): row.spent_nanousd for row in returned}
        spent_delta = {key: spent for key, spent, _ in changes}
        queued = []
        for key in sorted(watched):
            scope = limits[key]
            after = spent_after[key]
            if crossed_soft_limit(scope, after - spent_delta[key], after):
                alert = BudgetAlert(
                    alert_id=alert_id(key[0], scope),
                    tenant=key[0],
                    budget=scope.scope,
                    soft_limit_usd=nano_to_usd(scope.soft_nano or 0),
                    hard_limit_usd=nano_to_usd(scope.hard_nano) if scope.hard_nano is not None else None,
                    spent_usd=nano_to_usd(after),
                    at=now,
                )
                queued.append(
                    {
                        "alert_id": alert.alert_id,
                        "tenant": alert.tenant,
                        "payload": alert.model_dump_json(),
                        "created_at": _naive_utc(now),
                        "published_at": None,
                    }
                )
        if queued:
            await connection.execute(self._insert(budget_alerts).on_conflict_do_nothing(), queued)
        return len(queued)

    # --- reads -------------------------------------------------------------------------------------

    async def task_cost(self, tenant: str, task_id: str, usage_ids: Sequence[str]) -> tuple[int, list[str]]:
        """The priced cost of a task's records in the ledger, and which of `usage_ids` are not in it yet."""
        async with self._read_transaction() as connection:
            cost = await connection.scalar(
                select(func.coalesce(func.sum(ledger.c.cost_nanousd), 0))
                .where(ledger.c.tenant == tenant)
                .where(ledger.c.task_id == task_id)
            )
            found: set[str] = set()
            if usage_ids:
                found = set(
                    (
                        await connection.execute(
                            select(ledger.c.usage_id)
                            .where(ledger.c.tenant == tenant)
                            .where(ledger.c.usage_id.in_(sorted(set(usage_ids))))
                        )
                    ).scalars()
                )
        return int(cost or 0), [usage_id for usage_id in usage_ids if usage_id not in found]

    async def report(self, tenant: str | None, by: ReportKey, since: datetime | None) -> list[ReportLine]:
        """Ledger totals grouped by task, agent, model, day or tenant."""
        column = {
            "task": ledger.c.task_id,
            "agent": ledger.c.agent,
            "model": ledger.c.model,
            "day": ledger.c.day,
            "tenant": ledger.c.tenant,
        }[by]
        query = select(
            column.label("key"),
            func.sum(ledger.c.prompt_tokens).label("prompt_tokens"),
            func.sum(ledger.c.completion_tokens).label("completion_tokens"),
            func.sum(ledger.c.gpu_seconds).label("gpu_seconds"),
            func.count().label("calls"),
            func.sum(ledger.c.cost_nanousd).label("cost"),
        ).group_by(column)
        if tenant is not None:
            query = query.where(ledger.c.tenant == tenant)
        if since is not None:
            query = query.where(ledger.c.at >= _naive_utc(since))
        async with self._read_transaction() as connection:
            rows = (await connection.execute(query)).all()
        lines = [
            ReportLine(
                key=row.key if row.key is not None else "-",
                prompt_tokens=int(row.prompt_tokens or 0),
                completion_tokens=int(row.completion_tokens or 0),
                gpu_seconds=float(row.gpu_seconds or 0.0),
                calls=int(row.calls),
                cost_nano=int(row.cost or 0),
            )
            for row in rows
        ]
        return sorted(lines, key=lambda line: line.key)

    async def counter(self, tenant: str, scope: str, period: str) -> Counter:
        """What a scope has spent and holds reserved in a period."""
        async with self._read_transaction() as connection:
            row = (
                await connection.execute(
                    select(budget_counters)
                    .where(budget_counters.c.tenant == tenant)
                    .where(budget_counters.c.scope == scope)
                    .where(budget_counters.c.period == period)
                )
            ).first()
        return Counter(row.spent_nanousd, row.reserved_nanousd) if row is not None else Counter()

    async def reservation_status(self, reservation_id: str) -> str | None:
        async with self._read_transaction() as connection:
            status: str | None = await connection.scalar(
                select(reservations.c.status).where(reservations.c.reservation_id == reservation_id)
            )
        return status

    async def ledger_row(self, usage_id: str) -> dict[str, Any] | None:
        """One ledger row as a mapping, for inspection."""
        async with self._read_transaction() as connection:
            row = (await connection.execute(select(ledger).where(ledger.c.usage_id == usage_id))).first()
        return dict(row._mapping) if row is not None else None

    # --- alert outbox ------------------------------------------------------------------------------

    async def unpublished_alerts(self, limit: int) -> list[BudgetAlert]:
        async with self._read_transaction() as connection:
            rows = await connection.execute(
                select(budget_alerts.c.payload)
                .where(budget_alerts.c.published_at.is_(None))
                .order_by(budget_alerts.c.created_at, budget_alerts.c.alert_id)
                .limit(limit)
            )
            return [BudgetAlert.model_validate_json(payload) for payload in rows.scalars()]

    async def mark_alerts_published(self, alert_ids: Sequence[str], now: datetime) -> None:
        if not alert_ids:
            return

        async def work(connection: AsyncConnection) -> None:
            await connection.execute(
                update(budget_alerts)
                .where(budget_alerts.c.alert_id.in_(sorted(alert_ids)))
                .values(published_at=_naive_utc(now))
            )

        await self._write(work)
