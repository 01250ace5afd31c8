"""Several accountants on one database: the budget partitions are shared out by leases, each is served by its
owner alone, a stopped replica's partitions are taken over with exact books, and a replica whose lease was
taken (it was paused, or cut off) is fenced: it commits and answers nothing more for that partition."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import yaml
from accountant_support import DATABASE_KINDS, database, partition_of, recount, wait_for
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest
from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import BUDGET_PARTITIONS, BUDGET_RESERVE, budget_subject
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore
from agentbus.cost_accountant.app import AccountantApp, create_app
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.server import NatsServerProcess
from nats.aio.client import Client as NatsClient

BUDGETS: dict[str, Any] = {"defaults": {"tenant": {"hard_usd": 1.0}}}
PRICES: dict[str, Any] = {"models": {"m1": {"prompt_per_million": 1.0, "completion_per_million": 1.0}}}


@pytest.fixture(params=DATABASE_KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    async with database(request.param, tmp_path) as location:
        yield location


@pytest.fixture
def config_files(tmp_path: Path) -> tuple[Path, Path]:
    prices, budgets = tmp_path / "prices.yaml", tmp_path / "budgets.yaml"
    prices.write_text(yaml.safe_dump(PRICES), encoding="utf-8")
    budgets.write_text(yaml.safe_dump(BUDGETS), encoding="utf-8")
    return prices, budgets


def replica(
    server: NatsServerProcess, db: tuple[str, str | None], files: tuple[Path, Path], name: str, **overrides: Any
) -> AccountantApp:
    settings: dict[str, Any] = {
        "nats_url": server.url,
        "database_url": db[0],
        "database_schema": db[1],
        "prices_file": files[0],
        "budgets_file": files[1],
        "replica_id": name,
        "lease_ttl_seconds": 3.0,
        "lease_renew_seconds": 0.2,
        "drain_timeout_seconds": 2.0,
        **overrides,
    }
    return create_app(AccountantSettings(**settings))


def one_tenant_per_partition() -> dict[int, str]:
    tenants: dict[int, str] = {}
    while len(tenants) < BUDGET_PARTITIONS:
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        tenants.setdefault(partition_of(tenant), tenant)
    return tenants


async def reserve(nc: NatsClient, tenant: str, rid: str, usd: float, timeout: float = 10.0) -> BudgetReserveReply:
    request = BudgetReserveRequest(
        reservation_id=rid,
        tenant=tenant,
        task_id=f"task-{rid}",
        agent="assistant",
        kind="llm",
        model="m1",
        estimated_prompt_tokens=int(usd * 1_000_000),
    )
    reply = await nc.request(
        budget_subject(BUDGET_RESERVE, tenant), request.model_dump_json().encode(), timeout=timeout
    )
    return BudgetReserveReply.model_validate_json(reply.data)


async def split_evenly(a: AccountantApp, b: AccountantApp) -> None:
    async def even() -> bool:
        return (
            len(a.served) == len(b.served) == BUDGET_PARTITIONS // 2
            and not a.served & b.served
            and a.ownership.owned.keys() == a.served
            and b.ownership.owned.keys() == b.served
        )

    await wait_for(even)


async def test_two_replicas_share_the_partitions_and_each_serves_its_own(
    own_server: NatsServerProcess,
    own_client: NatsClient,
    db: tuple[str, str | None],
    config_files: tuple[Path, Path],
) -> None:
    a = replica(own_server, db, config_files, "replica-a")
    b = replica(own_server, db, config_files, "replica-b")
    await a.start()
    assert a.served == set(range(BUDGET_PARTITIONS))  # alone, it takes every partition
    await b.start()
    try:
        await split_evenly(a, b)
        for partition, tenant in one_tenant_per_partition().items():
            assert (await reserve(own_client, tenant, f"r-{partition}", 0.1)).allowed
            owner, other = (a, b) if partition in a.served else (b, a)
            assert (tenant, f"task-r-{partition}") in owner.committer.books[partition].tasks
            assert partition not in other.committer.books
    finally:
        await b.stop()
        await a.stop()


async def test_a_stopped_replicas_partitions_are_taken_over_with_exact_books(
    own_server: NatsServerProcess,
    own_client: NatsClient,
    db: tuple[str, str | None],
    config_files: tuple[Path, Path],
) -> None:
    a = replica(own_server, db, config_files, "replica-a")
    b = replica(own_server, db, config_files, "replica-b")
    await a.start()
    await b.start()
    try:
        await split_evenly(a, b)
        tenant = next(t for p, t in one_tenant_per_partition().items() if p in a.served)
        assert (await reserve(own_client, tenant, "held-by-a", 0.6)).allowed
        await a.stop()

        async def everything_on_b() -> bool:
            return b.served == set(range(BUDGET_PARTITIONS))

        await wait_for(everything_on_b)
        denied = await reserve(own_client, tenant, "after-take-over", 0.6)
        assert (denied.allowed, denied.budget, denied.spent_usd) == (False, f"tenant:{tenant}", 0.6)
        book = b.committer.books[partition_of(tenant)]
        counters = {
            key: (c.spent_nano, c.reserved_nano)
            for key, c in book.counters.get(tenant, {}).items()
            if c.spent_nano or c.reserved_nano
        }
        assert counters == await recount(b.store, tenant)
    finally:
        await b.stop()
        await a.stop()


async def test_a_replica_whose_lease_was_taken_commits_and_answers_nothing_more(
    own_server: NatsServerProcess,
    own_client: NatsClient,
    db: tuple[str, str | None],
    config_files: tuple[Path, Path],
) -> None:
    """As if it had been paused past its lease: another replica raised the partition's epoch meanwhile. Its
    renewals are rare here, so it is the fence of its next commit that finds out."""
    paused = replica(own_server, db, config_files, "replica-a", lease_ttl_seconds=120.0, lease_renew_seconds=60.0)
    await paused.start()
    try:
        tenants = one_tenant_per_partition()
        p = partition_of(tenants[0])
        later = utc_now() + timedelta(hours=1)
        other = SqlAccountantStore(db[0], schema=db[1])
        try:
            lease = (await other.lease_round("replica-b", BUDGET_PARTITIONS, later, 120)).leases[p]
            assert await other.acquire(p, "replica-b", lease.epoch, later, 120)
        finally:
            await other.close()

        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await reserve(own_client, tenants[0], "too-late", 0.1, timeout=2.0)
        assert await paused.store.reservation_row(tenants[0], "task-too-late", "too-late") is None

        async def stopped_serving_it() -> bool:
            return p not in paused.served and p not in paused.ownership.owned

        await wait_for(stopped_serving_it)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await reserve(own_client, tenants[0], "still-too-late", 0.1, timeout=1.0)
        elsewhere = next(t for partition, t in tenants.items() if partition != p)
        assert (await reserve(own_client, elsewhere, "elsewhere", 0.1)).allowed
    finally:
        await paused.stop()
        await asyncio.sleep(0)
