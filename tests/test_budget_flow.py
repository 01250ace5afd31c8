"""Budgets enforced before each call and costs priced, across the real runner, worker and cost-accountant."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.cost_accountant.app import create_app as create_accountant
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from agentbus.testing import running_nats_server
from helpers import AGENTS_DIR, REPO_ROOT, new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient

# The scripted engine is priced here as if it were a paid model, so that costs are not all zero.
PROMPT_PER_MILLION = 1000.0
COMPLETION_PER_MILLION = 2000.0


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A server of this module's own: this runner reserves budgets, the session's runner does not."""
    with running_nats_server(tmp_path / "nats") as server:
        yield server


@pytest_asyncio.fixture
async def budgeted_suite(own_server: NatsServerProcess, tmp_path: Path) -> AsyncIterator[NatsClient]:
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "models:\n"
        f"  scripted: {{prompt_per_million: {PROMPT_PER_MILLION}, completion_per_million: {COMPLETION_PER_MILLION}}}\n"
    )
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("tenants:\n  acme:\n    monthly: {hard_usd: 1000.0, soft_usd: 900.0}\n")
    nc = await connect_nats(own_server.url, "budget-test")
    await apply_topology(nc.jetstream())
    services: list[BusService] = [
        create_runner(
            RunnerSettings(
                nats_url=own_server.url,
                agents_dir=AGENTS_DIR,
                tools_dir=REPO_ROOT / "tools",
                budgets_enabled=True,
                drain_timeout_seconds=1,
            )
        ),
        create_worker(WorkerSettings(nats_url=own_server.url, drain_timeout_seconds=1)),
        create_accountant(
            AccountantSettings(
                nats_url=own_server.url,
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                prices_file=prices,
                budgets_file=budgets,
                drain_timeout_seconds=1,
            )
        ),
    ]
    for service in services:
        await service.start()
    try:
        yield nc
    finally:
        for service in services:
            await service.stop()
        await nc.close()


def _price(prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * PROMPT_PER_MILLION + completion_tokens * COMPLETION_PER_MILLION) / 1_000_000


async def test_a_finished_run_carries_the_accountants_price_of_every_step(budgeted_suite: NatsClient) -> None:
    task_id = new_task_id("priced")
    text = "What is calculator(6*7)?"
    await publish_submission(budgeted_suite, submission(task_id, agent="assistant", text=text, budget_usd=50.0))
    events = await task_events(budgeted_suite, task_id, timeout=30)
    assert [e["kind"] for e in events] == ["accepted", "step", "step", "completed"]
    steps = [e for e in events if e["kind"] == "step"]
    expected = sum(_price(s["usage"]["prompt_tokens"], s["usage"]["completion_tokens"]) for s in steps)
    assert expected > 0
    assert events[-1]["cost_usd"] == pytest.approx(expected, rel=1e-6)


async def test_a_task_budget_too_small_for_the_next_call_stops_the_run_before_it(
    budgeted_suite: NatsClient,
) -> None:
    task_id = new_task_id("capped")
    # One step's reservation: its prompt plus max_tokens (1024) of completion at $2000/M, about $2.10.
    await publish_submission(budgeted_suite, submission(task_id, agent="assistant", text="hi", budget_usd=1.0))
    events = await task_events(budgeted_suite, task_id, timeout=30)
    assert [e["kind"] for e in events] == ["accepted", "budget_exceeded"]
    exceeded = events[-1]
    assert exceeded["budget"].startswith("task")
    assert exceeded["limit_usd"] == pytest.approx(1.0)
