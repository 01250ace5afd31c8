"""The ledger and budgets on real SQLite and real Postgres: idempotency, atomic reservations, every scope.

The regression cases named after a peer's tracker are here in our terms: a user budget under a team's
budget, `>=` at the limit, concurrent reservations racing past a budget, a scope whose spend was never
tracked, and the end-user default budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from accountant_support import DATABASE_KINDS, database, open_store
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.adapters.schema import metadata
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore, create_engine
from agentbus.cost_accountant.domain import usd_to_nano
from agentbus.cost_accountant.ports import PricedUsage, ReservationInput
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MONTH = "2026-11"


@pytest.fixture(params=DATABASE_KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    async with database(request.param, tmp_path) as location:
        yield location


async def store_for(db: tuple[str, str | None], budgets: dict[str, Any] | None = None) -> SqlAccountantStore:
    return await open_store(db[0], db[1], budgets)


def reservation(rid: str, usd: float, *, task: str = "t1", user: str | None = "bob", **extra: Any) -> ReservationInput:
    fields: dict[str, Any] = {
        "reservation_id": rid,
        "tenant": "acme",
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


def priced(usage_id: str, usd: float, **fields: Any) -> PricedUsage:
    record = UsageRecorded.model_validate(
        {"usage_id": usage_id, "kind": "llm", "tenant": "acme", "task_id": "t1", "model": "m1", "at": NOW, **fields}
    )
    return PricedUsage(record, usd_to_nano(usd), False)


async def test_a_redelivered_usage_record_is_counted_once(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    try:
        first = await store.record_usage([priced("llm:r1", 0.5), priced("llm:r1", 0.5)], NOW)
        again = await store.record_usage([priced("llm:r1", 0.5), priced("llm:r2", 0.25)], NOW)
        assert first.inserted == [True, False]
        assert again.inserted == [False, True]
        assert (await store.counter("acme", "tenant:acme", MONTH)).spent_nano == usd_to_nano(0.75)
        assert await store.task_cost("acme", "t1", ["llm:r1", "llm:r2", "llm:r3"]) == (usd_to_nano(0.75), ["llm:r3"])
    finally:
        await store.close()


async def test_spending_exactly_up_to_the_limit_is_allowed_above_it_denied(db: tuple[str, str | None]) -> None:
    # Regression (`>` instead of `>=`): reaching the limit exactly is allowed; one nano-dollar more is not.
    store = await store_for(db)
    try:
        budget = usd_to_nano(1.0)
        assert (await store.reserve(reservation("a", 0.6, task_budget_nano=budget), NOW)).allowed
        assert (await store.reserve(reservation("b", 0.4, task_budget_nano=budget), NOW)).allowed
        over = await store.reserve(reservation("c", 0.000000001, task_budget_nano=budget), NOW)
        assert not over.allowed
        assert (over.budget, over.limit_nano, over.committed_nano) == ("task:t1", budget, budget)
        assert (await store.counter("acme", "task:t1", "task")).reserved_nano == budget
    finally:
        await store.close()


async def test_concurrent_reservations_from_two_replicas_never_overspend(db: tuple[str, str | None]) -> None:
    # Regression (concurrent requests raced past a budget): two stores stand for two replicas.
    budgets = {"tenants": {"acme": {"monthly": {"hard_usd": 1.0}}}}
    replicas = [await store_for(db, budgets), await store_for(db, budgets)]
    try:
        verdicts = await asyncio.gather(
            *(replicas[i % 2].reserve(reservation(f"r{i}", 0.1, task=f"t{i}", user=None), NOW) for i in range(60))
        )
        assert sum(v.allowed for v in verdicts) == 10
        assert {v.budget for v in verdicts if not v.allowed} == {"tenant:acme"}
        counter = await replicas[0].counter("acme", "tenant:acme", MONTH)
        assert counter.reserved_nano == usd_to_nano(1.0)
    finally:
        for store in replicas:
            await store.close()


async def test_batched_reservations_see_each_other_and_never_overspend(db: tuple[str, str | None]) -> None:
    # Reservations decided together in one transaction, by two replicas at once, over scopes that overlap
    # in different orders (tasks and users differ per reservation; tenant, agent and model are shared).
    budgets = {"tenants": {"acme": {"monthly": {"hard_usd": 1.0}}}}
    replicas = [await store_for(db, budgets), await store_for(db, budgets)]
    try:
        batches = [
            [reservation(f"b{b}-{i}", 0.1, task=f"t{(b * 7 + i) % 5}", user=f"u{i % 3}") for i in range(8)]
            for b in range(6)
        ]
        batches[0].append(reservation("b0-0", 0.1, task="t0", user="u0"))  # a repeat within its own batch
        results = await asyncio.gather(*(replicas[b % 2].reserve_many(batch, NOW) for b, batch in enumerate(batches)))
        verdicts = [verdict for result in results for verdict in result]
        assert results[0][-1] == results[0][0]
        assert sum(v.allowed for v in verdicts) - int(results[0][0].allowed) == 10
        counter = await replicas[0].counter("acme", "tenant:acme", MONTH)
        assert counter.reserved_nano == usd_to_nano(1.0)
    finally:
        for store in replicas:
            await store.close()


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
    store = await store_for(db, budgets)
    try:
        verdict = await store.reserve(reservation("r1", 0.02, user="bob"), NOW)
        assert not verdict.allowed
        assert verdict.budget == "user:bob"
        assert (await store.reserve(reservation("r2", 0.02, user="carol"), NOW)).allowed
    finally:
        await store.close()


async def test_the_default_user_budget_applies_to_users_without_one(db: tuple[str, str | None]) -> None:
    # Regression (an end-user default budget was not enforced).
    budgets = {"defaults": {"user": {"hard_usd": 0.5}}, "tenants": {"acme": {"users": {"alice": {"hard_usd": 5}}}}}
    store = await store_for(db, budgets)
    try:
        assert (await store.reserve(reservation("r1", 0.4, user="dave"), NOW)).allowed
        denied = await store.reserve(reservation("r2", 0.2, user="dave"), NOW)
        assert (denied.allowed, denied.budget, denied.limit_nano) == (False, "user:dave", usd_to_nano(0.5))
        assert (await store.reserve(reservation("r3", 1.0, user="alice"), NOW)).allowed
    finally:
        await store.close()


async def test_every_usage_kind_lands_in_every_scope(db: tuple[str, str | None]) -> None:
    # Regression (spend never tracked for one scope): tenant, agent, task, user and model all see it.
    store = await store_for(db)
    try:
        await store.reserve(reservation("llm:s1", 0.1), NOW)  # makes the task's user known
        await store.record_usage(
            [
                priced("llm:s1", 0.3, reservation_id="llm:s1", agent="assistant"),
                priced("gpu:g1", 0.2, kind="gpu", gpu_seconds=5.0, node_class="gpu-l4"),
                priced("tool:c1", 0.05, kind="tool", tool="search", model=None),
                priced("rag:q1", 0.01, kind="retrieval", model=None),
            ],
            NOW,
        )
        everything = usd_to_nano(0.56)
        for scope, period in (("tenant:acme", MONTH), ("agent:assistant", MONTH), ("user:bob", MONTH)):
            assert (await store.counter("acme", scope, period)).spent_nano == everything, scope
        assert (await store.counter("acme", "task:t1", "task")).spent_nano == everything
        assert (await store.counter("acme", "model:m1", MONTH)).spent_nano == usd_to_nano(0.5)
        row = await store.ledger_row("tool:c1")
        assert row is not None
        assert (row["tenant"], row["task_id"], row["agent"], row["submitted_by"]) == ("acme", "t1", "assistant", "bob")
    finally:
        await store.close()


async def test_settlement_replaces_the_reservation_with_the_actual_cost(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    try:
        await store.reserve(reservation("llm:x", 0.5), NOW)
        await store.record_usage([priced("llm:x", 0.2, reservation_id="llm:x")], NOW)
        await store.record_usage([priced("llm:x", 0.2, reservation_id="llm:x")], NOW)  # redelivery: no change
        counter = await store.counter("acme", "tenant:acme", MONTH)
        assert (counter.spent_nano, counter.reserved_nano) == (usd_to_nano(0.2), 0)
        assert await store.reservation_status("llm:x") == "settled"
    finally:
        await store.close()


async def test_a_record_cannot_settle_another_tenants_reservation(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    try:
        await store.reserve(reservation("llm:shared-id", 0.5), NOW)
        await store.record_usage([priced("other:1", 0.1, tenant="globex", reservation_id="llm:shared-id")], NOW)
        assert await store.reservation_status("llm:shared-id") == "open"
        assert (await store.counter("acme", "tenant:acme", MONTH)).reserved_nano == usd_to_nano(0.5)
    finally:
        await store.close()


async def test_a_reservation_id_gets_its_first_verdict_again(db: tuple[str, str | None]) -> None:
    store = await store_for(db, {"tenants": {"acme": {"monthly": {"hard_usd": 1}}}})
    try:
        first = await store.reserve(reservation("r1", 0.8), NOW)
        repeat = await store.reserve(reservation("r1", 0.8), NOW)
        assert first == repeat
        assert (await store.counter("acme", "tenant:acme", MONTH)).reserved_nano == usd_to_nano(0.8)
        denied = await store.reserve(reservation("r2", 0.8), NOW)
        assert denied == await store.reserve(reservation("r2", 0.01), NOW)
    finally:
        await store.close()


async def test_concurrent_repeats_of_one_reservation_hold_the_amount_once(db: tuple[str, str | None]) -> None:
    replicas = [await store_for(db), await store_for(db)]
    try:
        verdicts = await asyncio.gather(*(replicas[i % 2].reserve(reservation("same", 0.3), NOW) for i in range(10)))
        assert all(v.allowed for v in verdicts)
        assert (await replicas[0].counter("acme", "tenant:acme", MONTH)).reserved_nano == usd_to_nano(0.3)
    finally:
        for store in replicas:
            await store.close()


async def test_expired_and_released_reservations_give_their_amount_back(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    try:
        await store.reserve(reservation("old", 0.3, task="t1"), NOW)
        await store.reserve(reservation("fresh", 0.2, task="t2"), NOW + timedelta(seconds=590))
        assert await store.expire_reservations(NOW + timedelta(seconds=601)) == usd_to_nano(0.3)
        assert await store.reservation_status("old") == "expired"
        assert await store.reservation_status("fresh") == "open"
        assert await store.release_task("acme", "t2", NOW) == usd_to_nano(0.2)
        assert await store.release_task("acme", "t2", NOW) == 0
        assert (await store.counter("acme", "tenant:acme", MONTH)).reserved_nano == 0
        # Usage arriving after its reservation expired is still charged.
        await store.record_usage([priced("late", 0.1, reservation_id="old")], NOW)
        assert (await store.counter("acme", "tenant:acme", MONTH)).spent_nano == usd_to_nano(0.1)
    finally:
        await store.close()


async def test_a_soft_limit_queues_one_alert_per_period(db: tuple[str, str | None]) -> None:
    store = await store_for(db, {"tenants": {"acme": {"monthly": {"soft_usd": 1.0, "hard_usd": 2.0}}}})
    try:
        first = await store.record_usage([priced("a", 0.6), priced("b", 0.6)], NOW)
        second = await store.record_usage([priced("c", 0.6)], NOW)
        assert (first.alerts_queued, second.alerts_queued) == (1, 0)
        alerts = await store.unpublished_alerts(10)
        assert [(a.budget, a.soft_limit_usd, a.hard_limit_usd, a.spent_usd) for a in alerts] == [
            ("tenant:acme", 1.0, 2.0, 1.2)
        ]
        await store.mark_alerts_published([alerts[0].alert_id], NOW)
        assert await store.unpublished_alerts(10) == []
        next_month = await store.record_usage([priced("d", 1.5, at=NOW + timedelta(days=15))], NOW)
        assert next_month.alerts_queued == 1
    finally:
        await store.close()


async def test_reports_group_the_ledger(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    try:
        await store.record_usage(
            [
                priced("a", 0.5, prompt_tokens=10, completion_tokens=5, agent="assistant"),
                priced("b", 0.25, model="m2", task_id="t2", prompt_tokens=1, agent="assistant"),
                priced("c", 1.0, tenant="globex", at=NOW - timedelta(days=3)),
            ],
            NOW,
        )
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
    finally:
        await store.close()


def _schema_drift(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def test_the_migrations_build_exactly_the_declared_schema(db: tuple[str, str | None]) -> None:
    store = await store_for(db)
    await store.close()
    engine = create_engine(db[0], schema=db[1])
    try:
        async with engine.connect() as connection:
            drift = await connection.run_sync(_schema_drift)
        assert drift == []
    finally:
        await engine.dispose()
