"""SIGKILL a real `python -m agentbus.cost_accountant` between deciding a batch and committing it, or between
committing it and answering, then start an accountant again: nobody was answered what was not committed, the
retried reservation gets one verdict (the same every time), the usage record the killed process held counts
once, and the books are rebuilt exactly from the database.

The process stops at a named point through its test-only fault setting (AGENTBUS_ACCOUNTANT_FAULT_PAUSE_AT),
which writes a marker file when reached; the test kills it there. The usage consumers get a short ack_wait on
this test's own server, so the record the killed process held comes back within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
import yaml
from accountant_support import DATABASE_KINDS, database, partition_of, recount, wait_for
from agentbus.contracts.budget import BudgetReserveReply, BudgetReserveRequest, TaskCostReply, TaskCostRequest
from agentbus.contracts.registry import (
    ACCOUNTANT_USAGE,
    BUDGET_PARTITIONS,
    BUDGET_RESERVE,
    TASK_COST,
    USAGE_RECORDED,
    Header,
    budget_subject,
)
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore
from agentbus.cost_accountant.app import AccountantApp, create_app
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.bootstrap import consumer_config
from agentbus.runtime.server import NatsServerProcess, free_port
from nats.aio.client import Client as NatsClient

SHORT_ACK_WAIT_SECONDS = 2.0
LEASE_SECONDS = 1.5
TENANT = "kill-test"
PRICES: dict[str, Any] = {"models": {"m1": {"prompt_per_million": 1.0, "completion_per_million": 1.0}}}
BUDGETS: dict[str, Any] = {"tenants": {TENANT: {"monthly": {"hard_usd": 1.0}}}}


@pytest_asyncio.fixture(scope="module")
async def short_ack_wait(own_client: NatsClient) -> None:
    js = own_client.jetstream()
    for spec in ACCOUNTANT_USAGE:
        await js.add_consumer(spec.stream, consumer_config(replace(spec, ack_wait_seconds=SHORT_ACK_WAIT_SECONDS)))


@pytest.fixture(params=DATABASE_KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    async with database(request.param, tmp_path) as location:
        yield location


class AccountantProcess:
    """The accountant as its own process, stopped at a fault point and killed there."""

    def __init__(self, server: NatsServerProcess, db: tuple[str, str | None], root: Path) -> None:
        self.root = root
        self.markers = root / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        (root / "prices.yaml").write_text(yaml.safe_dump(PRICES), encoding="utf-8")
        (root / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS), encoding="utf-8")
        self.settings: dict[str, Any] = {
            "nats_url": server.url,
            "database_url": db[0],
            "database_schema": db[1],
            "prices_file": root / "prices.yaml",
            "budgets_file": root / "budgets.yaml",
            "lease_ttl_seconds": LEASE_SECONDS,
            "lease_renew_seconds": 0.3,
            "expiry_sweep_seconds": 3600.0,
            "drain_timeout_seconds": 2.0,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self, pause_at: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            **{f"AGENTBUS_ACCOUNTANT_{name.upper()}": str(value) for name, value in self.settings.items() if value},
            "AGENTBUS_ACCOUNTANT_HTTP_PORT": str(self.port),
            "AGENTBUS_ACCOUNTANT_FAULT_PAUSE_AT": pause_at,
            "AGENTBUS_ACCOUNTANT_FAULT_MARKER_DIR": str(self.markers),
        }
        self.process = self._spawn(env)
        async with asyncio.timeout(30):
            while not await asyncio.to_thread(self._ready):
                assert self.process.poll() is None, (self.root / "accountant.log").read_text()[-3000:]
                await asyncio.sleep(0.1)

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.root / "accountant.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "agentbus.cost_accountant"], env=env, stdout=log, stderr=log)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def paused_at(self, point: str) -> None:
        async with asyncio.timeout(20):
            while not (self.markers / point).exists():
                await asyncio.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def in_process(self) -> AccountantApp:
        """The accountant started again, in this process, without a fault point."""
        return create_app(AccountantSettings(**self.settings, replica_id="restarted"))


@pytest.fixture
def accountant_process(
    own_server: NatsServerProcess, db: tuple[str, str | None], tmp_path: Path, short_ack_wait: None
) -> Iterator[AccountantProcess]:
    process = AccountantProcess(own_server, db, tmp_path)
    yield process
    process.reap()


async def reserve(nc: NatsClient, rid: str, usd: float, timeout: float = 10.0) -> BudgetReserveReply:
    request = BudgetReserveRequest(
        reservation_id=rid,
        tenant=TENANT,
        task_id="task-1",
        agent="assistant",
        kind="llm",
        model="m1",
        estimated_prompt_tokens=int(usd * 1_000_000),
    )
    reply = await nc.request(
        budget_subject(BUDGET_RESERVE, TENANT), request.model_dump_json().encode(), timeout=timeout
    )
    return BudgetReserveReply.model_validate_json(reply.data)


def usage(usage_id: str, usd: float) -> bytes:
    return json.dumps(
        {
            "usage_id": usage_id,
            "kind": "llm",
            "tenant": TENANT,
            "task_id": "task-1",
            "model": "m1",
            "prompt_tokens": int(usd * 1_000_000),
        }
    ).encode()


@pytest.mark.parametrize("point", ["decided", "committed"])
async def test_a_kill_around_the_commit_answers_once_counts_once_and_rebuilds_exactly(
    accountant_process: AccountantProcess, own_client: NatsClient, point: str
) -> None:
    run = uuid.uuid4().hex  # message ids of their own: the stream would drop another test's as repeats
    await accountant_process.start(pause_at=point)
    # The first batch is this reservation alone: it stops at the fault point and is never answered.
    with pytest.raises(nats.errors.TimeoutError):
        await reserve(own_client, "llm:r1", 0.6, timeout=2.0)
    await accountant_process.paused_at(point)
    # A usage record the stopped process takes but can never commit nor ack.
    await own_client.jetstream().publish(
        budget_subject(USAGE_RECORDED, TENANT), usage("llm:u1", 0.2), headers={Header.MSG_ID.value: f"u1-{run}"}
    )
    await asyncio.sleep(0.3)
    accountant_process.kill()

    database_url, schema = accountant_process.settings["database_url"], accountant_process.settings["database_schema"]
    store = SqlAccountantStore(database_url, schema=schema)
    try:
        row = await store.reservation_row(TENANT, "task-1", "llm:r1")
        assert (row is not None) == (point == "committed")  # nothing decided after the last commit survives
    finally:
        await store.close()

    app = accountant_process.in_process()
    await app.start()
    try:

        async def serving_everything() -> bool:  # once the killed replica's leases lapsed
            return app.served == set(range(BUDGET_PARTITIONS))

        await wait_for(serving_everything)
        first = await reserve(own_client, "llm:r1", 0.6)
        assert (first.allowed, first.reserved_usd) == (True, 0.6)
        assert await reserve(own_client, "llm:r1", 0.6) == first
        cost_request = TaskCostRequest(tenant=TENANT, task_id="task-1", usage_ids=["llm:u1"], wait_seconds=20)
        cost = TaskCostReply.model_validate_json(
            (
                await own_client.request(
                    budget_subject(TASK_COST, TENANT), cost_request.model_dump_json().encode(), timeout=30
                )
            ).data
        )
        assert (cost.cost_usd, cost.missing_usage_ids) == (0.2, [])
        # $0.60 held and $0.20 spent of $1.00: $0.30 more is one nano-dollar too many.
        denied = await reserve(own_client, "llm:r2", 0.3)
        assert (denied.allowed, denied.budget, denied.spent_usd) == (False, f"tenant:{TENANT}", 0.8)
        await own_client.jetstream().publish(
            budget_subject(USAGE_RECORDED, TENANT),
            usage("llm:u1", 0.2),
            headers={Header.MSG_ID.value: f"u1-again-{run}"},
        )

        async def repeat_seen() -> bool:
            value = app.registry.get_sample_value("agentbus_cost_usage_records_total", {"outcome": "duplicate"})
            return (value or 0) >= 1

        await wait_for(repeat_seen)
        book = app.committer.books[partition_of(TENANT)]
        counters = {
            key: (c.spent_nano, c.reserved_nano)
            for key, c in book.counters.get(TENANT, {}).items()
            if c.spent_nano or c.reserved_nano
        }
        assert counters == await recount(app.store, TENANT)
        assert counters[(f"tenant:{TENANT}", next(iter(k[1] for k in counters if k[0] == f"tenant:{TENANT}")))] == (
            200_000_000,
            600_000_000,
        )
    finally:
        await app.stop()
