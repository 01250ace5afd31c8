"""The books and the ledger on real SQLite and real Postgres: decisions in memory, made durable by the group
commit, rebuilt exactly from the database, fenced by the partition leases.

The regression cases named after a peer's tracker are here in our terms: a user budget under a team's
budget, `>=` at the limit, concurrent reservations racing past a budget, a scope whose spend was never
tracked, and the end-user default budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from accountant_support import (
    DATABASE_KINDS,
    MONTH,
    NOW,
    Clock,
    database,
    execute,
    open_books,
    partition_of,
    priced,
    recount,
    reservation,
    upgrade_to,
)
from agentbus.contracts.budget import TaskCostRequest
from agentbus.contracts.registry import BUDGET_PARTITIONS
from agentbus.cost_accountant.adapters.schema import metadata
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore
from agentbus.cost_accountant.committer import NotServing, ReserveOp, StoreUnavailable, UsageOp
from agentbus.cost_accountant.domain import usd_to_nano
from agentbus.cost_accountant.metrics import AccountantMetrics
from agentbus.cost_accountant.pricing import PriceTable
from agentbus.cost_accountant.service import AccountantService
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

TENANT_BUDGET = {"tenants": {"acme": {"monthly": {"hard_usd": 1.0}}}}


@pytest.fixture(params=DATABASE_KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    async with database(request.param, tmp_path) as location:
        yield location


async def test_a_redelivered_usage_record_is_counted_once(db: tuple[str, str | None]) -> None:
    async with open_books(*db, clock=Clock()) as books:
        assert await books.record(priced("llm:r1", 0.5), priced("llm:r1", 0.5)) == [True, False]
        assert await books.record(priced("llm:r1", 0.5), priced("llm:r2", 0.25)) == [False, True]
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.75)
        assert books.committer.books[partition_of("acme")].task_cost(("acme", "t1"), ["llm:r1", "llm:r3"]) == (
            usd_to_nano(0.75),
            ["llm:r3"],
        )
    # A replica that took over knows it too: the ledger is keyed by usage id.
    async with open_books(*db, clock=Clock()) as books:
        assert await books.record(priced("llm:r1", 0.5)) == [False]
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.75)


async def test_spending_exactly_up_to_the_limit_is_allowed_above_it_denied(db: tuple[str, str | None]) -> None:
    # Regression (`>` instead of `>=`): reaching the limit exactly is allowed; one nano-dollar more is not.
    async with open_books(*db, clock=Clock()) as books:
        budget = usd_to_nano(1.0)
        first = await books.reserve(reservation("a", 0.6, task_budget_nano=budget))
        second = await books.reserve(reservation("b", 0.4, task_budget_nano=budget))
        assert first is not None
        assert first.allowed
        assert second is not None
        assert second.allowed
        over = await books.reserve(reservation("c", 0.000000001, task_budget_nano=budget))
        assert over is not None
        assert not over.allowed
        assert (over.budget, over.limit_nano, over.committed_nano, over.requested_nano) == (
            "task:t1",
            budget,
            budget,
            1,
        )
        assert books.counter("acme", "task:t1", "task").reserved_nano == budget


async def test_concurrent_reservations_never_overspend(db: tuple[str, str | None]) -> None:
    # Regression (concurrent requests raced past a budget): 60 at once for a budget that holds 10.
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        verdicts = await asyncio.gather(
            *(books.reserve(reservation(f"r{i}", 0.1, task=f"t{i}", user=None)) for i in range(60))
        )
        assert sum(v is not None and v.allowed for v in verdicts) == 10
        assert {v.budget for v in verdicts if v is not None and not v.allowed} == {"tenant:acme"}
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(1.0)
        assert await recount(books.store, "acme") == books.counters("acme")


async def test_two_reservations_racing_for_the_last_of_a_budget_get_one_yes(db: tuple[str, str | None]) -> None:
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        held = await books.reserve(reservation("first", 0.6, task="t0"))
        assert held is not None
        assert held.allowed
        racing = await asyncio.gather(
            books.reserve(reservation("left", 0.4, task="t1")), books.reserve(reservation("right", 0.4, task="t2"))
        )
        assert sorted(v is not None and v.allowed for v in racing) == [False, True]
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(1.0)


async def test_a_user_budget_binds_even_when_tenant_and_agent_budgets_allow(db: tuple[str, str | None]) -> None:
    # Regression (a user's budget skipped when spend came through a team's key).
    budgets = {
        "tenants": {
            "acme": {
                "monthly": {"hard_usd": 100},
                "agents": {"assistant": {"hard_usd": 50}},
                "users": {"bob": {"hard_usd": 0.01}},
            }
        }
    }
    async with open_books(*db, budgets, clock=Clock()) as books:
        verdict = await books.reserve(reservation("r1", 0.02, user="bob"))
        assert verdict is not None
        assert not verdict.allowed
        assert verdict.budget == "user:bob"
        other = await books.reserve(reservation("r2", 0.02, user="carol"))
        assert other is not None
        assert other.allowed


async def test_the_default_user_budget_applies_to_users_without_one(db: tuple[str, str | None]) -> None:
    # Regression (an end-user default budget was not enforced).
    budgets = {"defaults": {"user": {"hard_usd": 0.5}}, "tenants": {"acme": {"users": {"alice": {"hard_usd": 5}}}}}
    async with open_books(*db, budgets, clock=Clock()) as books:
        first = await books.reserve(reservation("r1", 0.4, user="dave"))
        assert first is not None
        assert first.allowed
        denied = await books.reserve(reservation("r2", 0.2, user="dave"))
        assert denied is not None
        assert (denied.allowed, denied.budget, denied.limit_nano) == (False, "user:dave", usd_to_nano(0.5))
        alice = await books.reserve(reservation("r3", 1.0, user="alice"))
        assert alice is not None
        assert alice.allowed


async def test_every_usage_kind_lands_in_every_scope(db: tuple[str, str | None]) -> None:
    # Regression (spend never tracked for one scope): tenant, agent, task, user and model all see it.
    async with open_books(*db, clock=Clock()) as books:
        await books.reserve(reservation("llm:s1", 0.1))  # makes the task's user known
        await books.record(
            priced("llm:s1", 0.3, reservation_id="llm:s1", agent="assistant"),
            priced("gpu:g1", 0.2, kind="gpu", gpu_seconds=5.0, node_class="gpu-l4"),
            priced("tool:c1", 0.05, kind="tool", tool="search", model=None),
            priced("rag:q1", 0.01, kind="retrieval", model=None),
        )
        everything = usd_to_nano(0.56)
        for scope, period in (("tenant:acme", MONTH), ("agent:assistant", MONTH), ("user:bob", MONTH)):
            assert books.counter("acme", scope, period).spent_nano == everything, scope
        assert books.counter("acme", "task:t1", "task").spent_nano == everything
        assert books.counter("acme", "model:m1", MONTH).spent_nano == usd_to_nano(0.5)
        row = await books.store.ledger_row("acme", "tool:c1")
        assert row is not None
        assert (row["tenant"], row["task_id"], row["agent"], row["submitted_by"]) == ("acme", "t1", "assistant", "bob")
        assert await recount(books.store, "acme") == books.counters("acme")


async def test_settlement_replaces_the_reservation_with_the_actual_cost(db: tuple[str, str | None]) -> None:
    async with open_books(*db, clock=Clock()) as books:
        await books.reserve(reservation("llm:x", 0.5))
        await books.record(priced("llm:x", 0.2, reservation_id="llm:x"))
        await books.record(priced("llm:x", 0.2, reservation_id="llm:x"))  # redelivery: no change
        counter = books.counter("acme", "tenant:acme", MONTH)
        assert (counter.spent_nano, counter.reserved_nano) == (usd_to_nano(0.2), 0)
        row = await books.store.reservation_row("acme", "t1", "llm:x")
        assert row is not None
        assert row["status"] == "settled"


async def test_a_record_cannot_settle_another_tenants_reservation(db: tuple[str, str | None]) -> None:
    async with open_books(*db, clock=Clock()) as books:
        await books.reserve(reservation("llm:shared-id", 0.5))
        await books.record(priced("other:1", 0.1, tenant="globex", reservation_id="llm:shared-id"))
        row = await books.store.reservation_row("acme", "t1", "llm:shared-id")
        assert row is not None
        assert row["status"] == "open"
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.5)


async def test_tenants_sharing_task_usage_and_reservation_ids_are_kept_apart(db: tuple[str, str | None]) -> None:
    # Ids are built from task ids, which are unique within a tenant only.
    async with open_books(*db, clock=Clock()) as books:
        for tenant in ("acme", "globex"):
            verdict = await books.reserve(reservation("llm:task-1.step-1", 0.5, tenant=tenant, task="task-1"))
            assert verdict is not None
            assert verdict.allowed
        assert await books.record(
            priced("llm:task-1.step-1", 0.2, tenant="acme", task_id="task-1", reservation_id="llm:task-1.step-1"),
            priced("llm:task-1.step-1", 0.3, tenant="globex", task_id="task-1", reservation_id="llm:task-1.step-1"),
        ) == [True, True]
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.2)
        assert books.counter("globex", "tenant:globex", MONTH).spent_nano == usd_to_nano(0.3)
        for tenant in ("acme", "globex"):
            assert await recount(books.store, tenant) == books.counters(tenant)


async def test_a_usage_id_in_the_ledger_under_another_task_is_still_a_repeat(db: tuple[str, str | None]) -> None:
    """Records are checked against their task's usage ids in memory; one whose id the ledger holds under
    another task fails its commit once, and is then found in the ledger and counted as the repeat it is."""
    async with open_books(*db, clock=Clock()) as books:
        assert await books.record(priced("llm:x", 0.5, task_id="t1")) == [True]
        await books.reserve(reservation("r", 0.1, task="t2"))  # t2 in memory, with no usage of its own
        with pytest.raises(StoreUnavailable):
            await books.record(priced("llm:x", 0.5, task_id="t2"))
        assert await books.record(priced("llm:x", 0.5, task_id="t2")) == [False]
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.5)
        # Rebuilt after the failed commit: the monthly counters, and the tasks it holds, are the database's.
        stored = await recount(books.store, "acme")
        assert books.counters("acme") == {k: v for k, v in stored.items() if k[1] != "task" or k[0] == "task:t2"}


async def test_a_reservation_id_gets_its_first_verdict_again(db: tuple[str, str | None]) -> None:
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        first = await books.reserve(reservation("r1", 0.8))
        assert first == await books.reserve(reservation("r1", 0.8))
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.8)
        denied = await books.reserve(reservation("r2", 0.8))
        assert denied is not None
        assert not denied.allowed
        assert denied == await books.reserve(reservation("r2", 0.01))
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        # From the database, after a take-over: the same verdicts, the hold counted once.
        assert await books.reserve(reservation("r1", 0.8)) == first
        assert await books.reserve(reservation("r2", 0.01)) == denied
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.8)


async def test_closing_a_task_gives_back_its_holds_and_refuses_later_ones(db: tuple[str, str | None]) -> None:
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        await books.reserve(reservation("a", 0.3, task="t1"))
        await books.reserve(reservation("b", 0.2, task="t1"))
        await books.reserve(reservation("c", 0.1, task="t2"))
        assert await books.close("acme", "t1") == usd_to_nano(0.5)
        assert await books.close("acme", "t1") == 0
        assert await books.reserve(reservation("late", 0.1, task="t1")) is None
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.1)
        # A task closed before it ever reserved is closed too.
        assert await books.close("acme", "never-started") == 0
        assert await books.reserve(reservation("x", 0.1, task="never-started")) is None
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        assert await books.reserve(reservation("later", 0.1, task="t1")) is None
        assert await books.reserve(reservation("y", 0.1, task="never-started")) is None
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.1)
        assert await recount(books.store, "acme") == books.counters("acme")


async def test_expired_holds_give_their_amount_back(db: tuple[str, str | None]) -> None:
    clock = Clock()
    async with open_books(*db, clock=clock, ttl_seconds=600) as books:
        await books.reserve(reservation("old", 0.3, task="t1"))
        clock.advance(590)
        await books.reserve(reservation("fresh", 0.2, task="t2"))
        clock.advance(11)
        assert await books.expire() == usd_to_nano(0.3)
        old = await books.store.reservation_row("acme", "t1", "old")
        fresh = await books.store.reservation_row("acme", "t2", "fresh")
        assert old is not None
        assert fresh is not None
        assert (old["status"], fresh["status"]) == ("expired", "open")
        assert await books.close("acme", "t2") == usd_to_nano(0.2)
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == 0
        # Usage arriving after its reservation expired is still charged.
        await books.record(priced("late", 0.1, reservation_id="old"))
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.1)
        assert await recount(books.store, "acme") == books.counters("acme")


async def test_a_soft_limit_queues_one_alert_per_period(db: tuple[str, str | None]) -> None:
    budgets = {"tenants": {"acme": {"monthly": {"soft_usd": 1.0, "hard_usd": 2.0}}}}
    async with open_books(*db, budgets, clock=Clock()) as books:
        await books.record(priced("a", 0.6), priced("b", 0.6))
        await books.record(priced("c", 0.6))
        alerts = await books.store.unpublished_alerts(10)
        assert [(a.budget, a.soft_limit_usd, a.hard_limit_usd, a.spent_usd) for a in alerts] == [
            ("tenant:acme", 1.0, 2.0, 1.2)
        ]
        await books.store.mark_alerts_published([alerts[0].alert_id], NOW)
        assert await books.store.unpublished_alerts(10) == []
        await books.record(priced("d", 1.5, at=NOW + timedelta(days=15)))
        assert [a.budget for a in await books.store.unpublished_alerts(10)] == ["tenant:acme"]
    async with open_books(*db, budgets, clock=Clock()) as books:
        # Rebuilt from the ledger, the book knows the limit was crossed already this month.
        await books.record(priced("e", 0.1))
        assert len(await books.store.unpublished_alerts(10)) == 1


async def test_reports_group_the_ledger(db: tuple[str, str | None]) -> None:
    async with open_books(*db, clock=Clock()) as books:
        await books.record(
            priced("a", 0.5, prompt_tokens=10, completion_tokens=5, agent="assistant"),
            priced("b", 0.25, model="m2", task_id="t2", prompt_tokens=1, agent="assistant"),
            priced("c", 1.0, tenant="globex", at=NOW - timedelta(days=3)),
        )
        store = books.store
        by_model = await store.report("acme", "model", None)
        assert [(r.key, r.calls, r.prompt_tokens, r.cost_nano) for r in by_model] == [
            ("m1", 1, 10, usd_to_nano(0.5)),
            ("m2", 1, 1, usd_to_nano(0.25)),
        ]
        by_tenant = await store.report(None, "tenant", NOW - timedelta(days=1))
        assert [(r.key, r.cost_nano) for r in by_tenant] == [("acme", usd_to_nano(0.75))]
        by_day = await store.report(None, "day", None)
        assert [r.key for r in by_day] == ["2026-11-17", "2026-11-20"]
        assert [r.key for r in await store.report("acme", "task", None)] == ["t1", "t2"]


async def test_books_rebuilt_from_the_database_hold_exactly_what_it_says(db: tuple[str, str | None]) -> None:
    budgets = {"defaults": {"user": {"hard_usd": 0.9}}, "tenants": {"acme": {"monthly": {"hard_usd": 3.0}}}}
    clock = Clock()
    async with open_books(*db, budgets, clock=clock) as books:
        for i in range(40):
            await books.reserve(reservation(f"r{i}", 0.07 * (i % 5 + 1), task=f"t{i % 7}", user=f"u{i % 3}"))
            if i % 3 == 0:
                await books.record(priced(f"u{i}", 0.01 * i, task_id=f"t{i % 7}", reservation_id=f"r{i}"))
            if i % 11 == 10:
                await books.close("acme", f"t{(i + 2) % 7}")
        await books.record(priced("month-before", 0.5, task_id=None, at=NOW - timedelta(days=25)))
        live = books.counters("acme")
        assert live == await recount(books.store, "acme")
    async with open_books(*db, budgets, clock=clock) as rebuilt:
        # Only tasks holding something come back into memory; the others are read when needed.
        for key, (spent, reserved) in rebuilt.counters("acme").items():
            assert live[key] == (spent, reserved), key
        assert {key for key, (_, reserved) in live.items() if reserved} <= set(rebuilt.counters("acme"))


async def test_a_partition_taken_over_is_fenced_and_commits_nothing(db: tuple[str, str | None]) -> None:
    """A replica paused past its lease wakes up after another took the partition: its next commit writes
    nothing of that partition, answers nothing, and it stops serving it; its other partitions go on."""
    async with open_books(*db, clock=Clock(), lease_seconds=60) as paused:
        p = partition_of("acme")
        later = NOW + timedelta(minutes=5)
        other = SqlAccountantStore(db[0], schema=db[1])
        try:
            lease = (await other.lease_round("replica-b", BUDGET_PARTITIONS, later, 60)).leases[p]
            assert await other.acquire(p, "replica-b", lease.epoch, later, 60)
        finally:
            await other.close()
        with pytest.raises(NotServing):
            await paused.committer.submit(ReserveOp(p, reservation("after-take-over", 0.1)))
        assert await paused.store.reservation_row("acme", "t1", "after-take-over") is None
        assert p not in paused.committer.books
        tenant_elsewhere = next(f"t{i}" for i in range(100) if partition_of(f"t{i}") != p)
        verdict = await paused.reserve(reservation("still-mine", 0.1, tenant=tenant_elsewhere))
        assert verdict is not None
        assert verdict.allowed


async def test_a_cost_is_never_answered_from_a_decision_not_yet_committed(db: tuple[str, str | None]) -> None:
    """One operation per batch: the query loads its task in one commit, and the committer decides the next
    batch (a usage record of that task) before the query resumes. The answer must wait for that commit too."""
    async with open_books(*db, clock=Clock(), max_batch=1) as books:
        service = AccountantService(
            books.committer, books.store, PriceTable.model_validate({}), AccountantMetrics(CollectorRegistry())
        )
        asked = asyncio.create_task(
            service.task_cost(TaskCostRequest(tenant="acme", task_id="t1", usage_ids=["llm:u1"], wait_seconds=0))
        )
        await asyncio.sleep(0)  # the query queues the load of its task
        recorded = books.committer.enqueue(UsageOp(partition_of("acme"), [priced("llm:u1", 0.3)]))
        answer = await asked
        assert recorded.done()  # answered after the record's commit, never before
        assert answer is not None
        assert (answer.missing_usage_ids, answer.cost_usd) == ([], 0.3)


async def test_forgotten_tasks_are_read_again_with_their_verdicts(db: tuple[str, str | None]) -> None:
    async with open_books(*db, TENANT_BUDGET, clock=Clock()) as books:
        first = await books.reserve(reservation("r1", 0.4, task="t1"))
        await books.record(priced("u1", 0.1, task_id="t1", reservation_id="r1"))
        await books.close("acme", "t1")
        await books.reserve(reservation("r2", 0.3, task="t2"))
        await books.close("acme", "t2")
        await books.committer.upkeep(idle_seconds=0)
        book = books.committer.books[partition_of("acme")]
        assert not book.has_task(("acme", "t1"))
        assert await books.reserve(reservation("r1", 0.4, task="t1")) == first
        assert await books.reserve(reservation("r9", 0.1, task="t2")) is None
        assert book.task_cost(("acme", "t1"), ["u1"]) == (usd_to_nano(0.1), [])


def _schema_drift(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def test_the_migrations_build_exactly_the_declared_schema(db: tuple[str, str | None]) -> None:
    store = SqlAccountantStore(db[0], schema=db[1])
    await store.migrate()
    await store.close()
    connect_args = {"server_settings": {"search_path": db[1]}} if db[1] else {}
    engine = create_async_engine(db[0], connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            drift = await connection.run_sync(_schema_drift)
        assert drift == []
    finally:
        await engine.dispose()


async def test_an_existing_database_is_upgraded_with_its_ledger_and_holds(db: tuple[str, str | None]) -> None:
    """A database written by the previous accountant (revision 0001, counters stored in a table) upgrades in
    place; the books rebuilt from it hold what its counters held, and its reservations keep their verdicts."""
    url, schema = db
    await upgrade_to(url, schema, "0001")
    month_start = datetime(2026, 11, 2, 9, 0)
    ledger_row = (
        "INSERT INTO ledger VALUES (:id, 'llm', 'acme', 't1', 'assistant', 'bob', 'm1', NULL, NULL, 10, 5, 0, "
        ":cost, false, :rid, :at, '2026-11-02', :at)"
    )
    hold = (
        "INSERT INTO reservations VALUES (:rid, 'acme', 't1', 'assistant', 'bob', 'llm', 'm1', NULL, :amount, "
        ":status, :budget, :limit, :held, :scopes, :at, :expires, NULL)"
    )
    scopes = '[["task:t1", "task"], ["user:bob", "2026-11"], ["agent:assistant", "2026-11"], '
    scopes += '["model:m1", "2026-11"], ["tenant:acme", "2026-11"]]'
    common = {"at": month_start, "expires": datetime(2026, 11, 30), "scopes": scopes}
    await execute(
        url,
        schema,
        [
            ("INSERT INTO tasks VALUES ('acme', 't1', 'assistant', 'bob', NULL, :at)", {"at": month_start}),
            (ledger_row, {"id": "llm:old-1", "cost": usd_to_nano(0.25), "rid": "r-settled", "at": month_start}),
            (
                hold,
                {**common, "rid": "r-settled", "amount": usd_to_nano(0.3), "status": "settled"}
                | {"budget": None, "limit": None, "held": None},
            ),
            (
                hold,
                {**common, "rid": "r-open", "amount": usd_to_nano(0.4), "status": "open"}
                | {"budget": None, "limit": None, "held": None},
            ),
            (
                hold,
                {**common, "rid": "r-denied", "amount": 0, "status": "denied"}
                | {"budget": "tenant:acme", "limit": usd_to_nano(1.0), "held": usd_to_nano(0.65)},
            ),
        ],
    )
    async with open_books(url, schema, TENANT_BUDGET, clock=Clock()) as books:
        assert books.counter("acme", "tenant:acme", MONTH).spent_nano == usd_to_nano(0.25)
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == usd_to_nano(0.4)
        assert books.counter("acme", "task:t1", "task").reserved_nano == usd_to_nano(0.4)
        again = await books.reserve(reservation("r-open", 0.4))
        assert again is not None
        assert (again.allowed, again.amount_nano) == (True, usd_to_nano(0.4))
        denied = await books.reserve(reservation("r-denied", 0.4))
        assert denied is not None
        assert (denied.allowed, denied.budget) == (False, "tenant:acme")
        assert await books.record(priced("llm:old-1", 0.25)) == [False]
        assert await books.record(priced("llm:new", 0.1, reservation_id="r-open")) == [True]
        assert books.counter("acme", "tenant:acme", MONTH).reserved_nano == 0
        assert await recount(books.store, "acme") == books.counters("acme")
