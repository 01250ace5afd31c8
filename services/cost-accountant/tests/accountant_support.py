"""Real databases and real books for the accountant's tests: a SQLite file, or a fresh Postgres schema (or
database) dropped afterwards; the group committer owning every partition through real leases; and an
independent recount of what the database holds, to check the books against."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import BUDGET_PARTITIONS, budget_partition
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.cost_accountant.committer import CloseOp, ExpireOp, GroupCommitter, ReserveOp, UsageOp
from agentbus.cost_accountant.domain import Counter, Verdict, usd_to_nano
from agentbus.cost_accountant.limits import LimitsConfig, RatePolicy
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.ports import PricedUsage, ReservationInput
from agentbus.testing import skip_outside_ci
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DATABASE_KINDS = ("sqlite", "postgres")
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MONTH = "2026-11"


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    """(url, schema) of an empty database of `kind`. Under CI=true a missing Postgres fails, never skips."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'accountant-{uuid.uuid4().hex[:8]}.db'}", None
        return
    schema = f"acct_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        await admin.dispose()
        skip_outside_ci(f"Postgres unavailable at {POSTGRES_URL}: {exc}")
    try:
        yield POSTGRES_URL, schema
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


class PostgresOfOwn:
    """A Postgres database of the test's own, which can refuse connections (and drop those it has) for a
    while: a real outage of a real server, not a stand-in."""

    def __init__(self) -> None:
        self.name = f"acct_outage_{uuid.uuid4().hex[:10]}"
        self.url = f"{POSTGRES_URL.rsplit('/', 1)[0]}/{self.name}"
        self._admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")

    async def create(self) -> None:
        try:
            async with self._admin.connect() as connection:
                await connection.exec_driver_sql(f'CREATE DATABASE "{self.name}"')
        except Exception as exc:
            await self._admin.dispose()
            skip_outside_ci(f"Postgres unavailable at {POSTGRES_URL}: {exc}")

    async def down(self) -> None:
        async with self._admin.connect() as connection:
            await connection.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
            await connection.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}'"
            )

    async def up(self) -> None:
        async with self._admin.connect() as connection:
            await connection.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    async def drop(self) -> None:
        async with self._admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await self._admin.dispose()


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def partition_of(tenant: str) -> int:
    return int(budget_partition(tenant))


def reservation(
    rid: str, usd: float, *, tenant: str = "acme", task: str = "t1", user: str | None = "bob", **extra: Any
) -> ReservationInput:
    fields: dict[str, Any] = {
        "reservation_id": rid,
        "tenant": tenant,
        "task_id": task,
        "agent": "assistant",
        "user": user,
        "kind": "llm",
        "model": "m1",
        "tool": None,
        "amount_nano": usd_to_nano(usd),
        "task_budget_nano": None,
    }
    fields.update(extra)
    return ReservationInput(**fields)


def priced(usage_id: str, usd: float, *, at: datetime = NOW, **fields: Any) -> PricedUsage:
    record = UsageRecorded.model_validate(
        {"usage_id": usage_id, "kind": "llm", "tenant": "acme", "task_id": "t1", "model": "m1", "at": at, **fields}
    )
    return PricedUsage(record, usd_to_nano(usd), False)


@dataclass
class Books:
    """The group committer of one replica owning every budget partition, on a real store."""

    store: SqlAccountantStore
    committer: GroupCommitter
    clock: Callable[[], datetime]
    replica: str

    async def reserve(self, request: ReservationInput) -> Verdict | None:
        verdict: Verdict | None = await self.committer.submit(ReserveOp(partition_of(request.tenant), request))
        return verdict

    async def record(self, *entries: PricedUsage) -> list[bool]:
        ops = [UsageOp(partition_of(entry.usage.tenant), [entry]) for entry in entries]
        return [new for results in await asyncio.gather(*(self.committer.submit(op) for op in ops)) for new in results]

    async def close(self, tenant: str, task_id: str) -> int:
        released: int = await self.committer.submit(CloseOp(partition_of(tenant), tenant, task_id))
        return released

    async def expire(self) -> int:
        results = await asyncio.gather(*(self.committer.submit(ExpireOp(p)) for p in list(self.committer.books)))
        return sum(results)

    def counter(self, tenant: str, scope: str, period: str) -> Counter:
        return self.committer.books[partition_of(tenant)].counter(tenant, scope, period)

    def counters(self, tenant: str) -> dict[tuple[str, str], tuple[int, int]]:
        """Every counter of a tenant that holds or has spent anything, as (spent, reserved)."""
        book = self.committer.books[partition_of(tenant)]
        return {
            key: (counter.spent_nano, counter.reserved_nano)
            for key, counter in book.counters.get(tenant, {}).items()
            if counter.spent_nano or counter.reserved_nano
        }


@contextlib.asynccontextmanager
async def open_books(
    url: str,
    schema: str | None,
    budgets: dict[str, Any] | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
    ttl_seconds: float = 600.0,
    replica: str | None = None,
    lease_seconds: float = 3600.0,
    max_batch: int = 1000,
    limits: dict[str, Any] | None = None,
) -> AsyncIterator[Books]:
    """A migrated store and a group committer that took every partition's lease and rebuilt its books."""
    store = SqlAccountantStore(url, schema=schema)
    await store.migrate()
    name = replica or f"replica-{uuid.uuid4().hex[:6]}"
    committer = GroupCommitter(
        store,
        BudgetPolicy(BudgetConfig.model_validate(budgets or {})),
        AccountantMetrics(CollectorRegistry()),
        replica=name,
        reservation_ttl_seconds=ttl_seconds,
        max_batch=max_batch,
        clock=clock,
        rates=RatePolicy(LimitsConfig.model_validate(limits or {})),
    )
    committer.start()
    try:
        now = clock()
        view = await store.lease_round(name, BUDGET_PARTITIONS, now, lease_seconds)
        taken: dict[int, int] = {}
        for partition, lease in view.leases.items():
            if await store.acquire(partition, name, lease.epoch, now, lease_seconds):
                taken[partition] = lease.epoch + 1
        assert len(taken) == BUDGET_PARTITIONS, f"another replica holds leases: {view.leases}"
        await committer.install(taken)
        for partition in taken:
            committer.extend(partition, float("inf"))
        yield Books(store, committer, clock, name)
        await committer.stop()
        # Given up like a stopping replica does, so that the next one takes the partitions at once.
        for partition, epoch in taken.items():
            await store.release(partition, name, epoch)
    finally:
        await committer.stop()
        await store.close()


async def upgrade_to(url: str, schema: str | None, revision: str) -> None:
    """Run the shipped migrations up to `revision` only (an older accountant's database)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import Connection

    config = Config()
    config.set_main_option("script_location", "agentbus.cost_accountant:migrations")

    def upgrade(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    connect_args = {"server_settings": {"search_path": schema}} if schema else {}
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade)
    finally:
        await engine.dispose()


async def execute(url: str, schema: str | None, statements: list[tuple[str, dict[str, Any]]]) -> None:
    """Run raw SQL in one transaction (to write what an older version left in a database)."""
    connect_args = {"server_settings": {"search_path": schema}} if schema else {}
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        async with engine.begin() as connection:
            for statement, params in statements:
                await connection.execute(text(statement), params)
    finally:
        await engine.dispose()


async def recount(store: SqlAccountantStore, tenant: str) -> dict[tuple[str, str], tuple[int, int]]:
    """What the database says every scope of a tenant has spent and holds, computed from the ledger rows and
    the open reservations alone (independently of the books)."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    spent, held = await store.raw_charges(tenant)
    for task_id, user, agent, model, day, cost in spent:
        month = day[:7]
        scopes = [(f"tenant:{tenant}", month)]
        if task_id is not None:
            scopes.append((f"task:{task_id}", "task"))
        if user is not None:
            scopes.append((f"user:{user}", month))
        if agent is not None:
            scopes.append((f"agent:{agent}", month))
        if model is not None:
            scopes.append((f"model:{model}", month))
        for key in scopes:
            totals[key][0] += int(cost)
    for amount, scopes_json in held:
        for scope, period in json.loads(scopes_json):
            totals[(scope, period)][1] += int(amount)
    return {key: (s, r) for key, (s, r) in totals.items() if s or r}


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll until `check()` holds; fail after `timeout` seconds (a bound, not a speed assertion)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)
