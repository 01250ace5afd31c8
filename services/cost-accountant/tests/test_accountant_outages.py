"""The accountant while its database is down, against the real thing: a Postgres database that refuses
connections and drops those it had. Reservations are answered `store_unavailable` (the runner waits and asks
again), usage records wait (never dead-lettered), and once the database is back the books are rebuilt from it
and everything lands exactly once."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from accountant_support import PostgresOfOwn, partition_of, recount, wait_for
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest, TaskCostReply, TaskCostRequest
from agentbus.contracts.registry import (
    BUDGET_PARTITIONS,
    BUDGET_RESERVE,
    DEAD_LETTER,
    DEAD_LETTERS,
    TASK_COST,
    USAGE,
    USAGE_RECORDED,
    Header,
    accountant_usage_consumer,
    budget_subject,
)
from agentbus.cost_accountant.app import create_app
from agentbus.cost_accountant.handlers import AccountantHandlers
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import DependencyUnavailableError
from agentbus.runtime.server import NatsServerProcess
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

TENANT = "outage"
PRICES: dict[str, Any] = {"models": {"m1": {"prompt_per_million": 1.0, "completion_per_million": 1.0}}}
BUDGETS: dict[str, Any] = {"tenants": {TENANT: {"monthly": {"hard_usd": 1.0}}}}


@pytest_asyncio.fixture
async def postgres() -> AsyncIterator[PostgresOfOwn]:
    database = PostgresOfOwn()
    await database.create()
    try:
        yield database
    finally:
        await database.up()
        await database.drop()


async def reserve(nc: NatsClient, rid: str, usd: float) -> BudgetReserveReply:
    request = BudgetReserveRequest(
        reservation_id=rid,
        tenant=TENANT,
        task_id="task-1",
        agent="assistant",
        kind="llm",
        model="m1",
        estimated_prompt_tokens=int(usd * 1_000_000),
    )
    reply = await nc.request(budget_subject(BUDGET_RESERVE, TENANT), request.model_dump_json().encode(), timeout=10)
    return BudgetReserveReply.model_validate_json(reply.data)


def usage(usage_id: str, usd: float) -> bytes:
    record = {
        "usage_id": usage_id,
        "kind": "llm",
        "tenant": TENANT,
        "task_id": "task-1",
        "model": "m1",
        "prompt_tokens": int(usd * 1_000_000),
    }
    return json.dumps(record).encode()


async def test_a_database_outage_is_waited_for_and_nothing_is_lost_or_dead_lettered(
    own_server: NatsServerProcess, own_client: NatsClient, postgres: PostgresOfOwn, tmp_path: Path
) -> None:
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(PRICES), encoding="utf-8")
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS), encoding="utf-8")
    app = create_app(
        AccountantSettings(
            nats_url=own_server.url,
            database_url=postgres.url,
            prices_file=tmp_path / "prices.yaml",
            budgets_file=tmp_path / "budgets.yaml",
            # Leases outlast the outage: nobody else could take them while the database is away anyway.
            lease_ttl_seconds=120.0,
            lease_renew_seconds=0.5,
            drain_timeout_seconds=2.0,
        )
    )
    await app.start()
    try:
        assert app.served == set(range(BUDGET_PARTITIONS))
        assert (await reserve(own_client, "llm:before", 0.3)).allowed
        await postgres.down()

        during = await reserve(own_client, "llm:during", 0.3)
        assert during.error is not None
        assert (during.allowed, during.error.code) == (False, "store_unavailable")
        record = usage("llm:u-outage", 0.1)
        delivery = Delivery(budget_subject(USAGE_RECORDED, TENANT), record, {}, 1, 1, None)
        with pytest.raises(DependencyUnavailableError):
            await AccountantHandlers(app.service).on_usage_recorded(delivery)
        await own_client.jetstream().publish(
            budget_subject(USAGE_RECORDED, TENANT), record, headers={Header.MSG_ID.value: uuid.uuid4().hex}
        )
        await postgres.up()

        async def answered() -> bool:  # as the runner does: ask again until the store is back
            return (await reserve(own_client, "llm:during", 0.3)).error is None

        await wait_for(answered, timeout=30)
        assert (await reserve(own_client, "llm:during", 0.3)).allowed
        cost_request = TaskCostRequest(tenant=TENANT, task_id="task-1", usage_ids=["llm:u-outage"], wait_seconds=25)
        cost = TaskCostReply.model_validate_json(
            (
                await own_client.request(
                    budget_subject(TASK_COST, TENANT), cost_request.model_dump_json().encode(), timeout=35
                )
            ).data
        )
        assert (cost.cost_usd, cost.missing_usage_ids) == (0.1, [])
        # $0.30 + $0.30 held and $0.10 spent: $0.31 more would go over the $1.00.
        denied = await reserve(own_client, "llm:after", 0.31)
        assert (denied.allowed, denied.spent_usd) == (False, 0.7)
        book = app.committer.books[partition_of(TENANT)]
        counters = {
            key: (c.spent_nano, c.reserved_nano)
            for key, c in book.counters.get(TENANT, {}).items()
            if c.spent_nano or c.reserved_nano
        }
        assert counters == await recount(app.store, TENANT)
        letters = DEAD_LETTER.format(
            stream=USAGE.name, consumer=accountant_usage_consumer(partition_of(TENANT)).durable
        )
        with pytest.raises(NotFoundError):
            await own_client.jetstream().get_last_msg(DEAD_LETTERS.name, letters)
    finally:
        await app.stop()
