"""Nothing given up: the whole suite as processes, with a dependency away for long, and a deadline that passes.

The suite runs as `agentbus up` runs it (every service its own process, budgets on), but the test decides
when the supervisor may restart what it killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentbus.cli.suite import Suite
from agentbus.contracts.registry import APPROVAL_RESOLVED, TASK_SUBMIT, Service
from agentbus.contracts.tasks import TaskSubmitted
from agentbus.runtime.connection import connect_nats
from helpers import AGENTS_DIR, REPO_ROOT, first_message, new_task_id, task_events
from nats.aio.client import Client as NatsClient

OUTAGE_SECONDS = 30.0
SUBMITTER = "acme-app"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    state_dir = tmp_path_factory.mktemp("outages")
    os.environ["AGENTBUS_RUNNER_REDRIVE_SECONDS"] = "5"
    running = Suite(
        state_dir,
        AGENTS_DIR,
        config_dir=REPO_ROOT / "config",
        tools_dir=REPO_ROOT / "tools",
        echo=io.StringIO(),  # the suite's progress lines are not the test's output
    )
    try:
        running.start(ready_timeout=90)
        yield running
    finally:
        running.stop()
        os.environ.pop("AGENTBUS_RUNNER_REDRIVE_SECONDS", None)


@pytest_asyncio.fixture
async def client(suite: Suite) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(suite.nats_url, "outage-test")
    try:
        yield nc
    finally:
        await nc.close()


async def _submit(nc: NatsClient, task: TaskSubmitted) -> None:
    subject = TASK_SUBMIT.format(tenant=task.tenant, submitter=SUBMITTER)
    await nc.jetstream().publish(subject, task.model_dump_json().encode(), headers={"Nats-Msg-Id": task.task_id})


def _service(suite: Suite, name: Service) -> Any:
    return next(s for s in suite.services if s.spec.name == name)


def _query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql, args).fetchall()


@pytest.mark.timeout(300)
async def test_tasks_wait_out_a_30_second_accountant_outage_and_all_complete_after_it(
    suite: Suite, client: NatsClient
) -> None:
    accountant = _service(suite, Service.COST_ACCOUNTANT)
    tasks = [
        TaskSubmitted(
            task_id=new_task_id("outage"),
            tenant="acme",
            agent="assistant" if index % 2 else "ops",
            input="calculator(6*7) and word_count(a b c)"
            if index % 2
            else 'create_ticket(title="disk", priority="low")',
        )
        for index in range(8)
    ]
    os.kill(accountant.process.pid, signal.SIGKILL)
    accountant.process.wait()
    for task in tasks:
        await _submit(client, task)
    # While the accountant is away every task is accepted (its id taken, its client told) and then waits.
    for task in tasks:
        events = await _events_so_far(client, task.task_id, kinds={"accepted"})
        assert [e["kind"] for e in events][:1] == ["accepted"]
    await asyncio.sleep(OUTAGE_SECONDS)
    for task in tasks:
        events = await _events_so_far(client, task.task_id, kinds=set())
        assert not any(e["kind"] in {"completed", "failed", "rejected"} for e in events), "nothing is given up"

    ledger = suite.state_dir / "cost-accountant.db"
    async with _supervised(suite):  # the accountant comes back, and again should its first start fail
        for task in tasks:
            events = await _task_events_or_logs(suite, client, task.task_id, timeout=120)
            assert events[-1]["kind"] == "completed", events[-1]
            charged = _query(
                ledger, "SELECT COALESCE(SUM(cost_nanousd), 0) FROM ledger WHERE task_id = ?", task.task_id
            )
            assert round(events[-1]["cost_usd"] * 1e9) == charged[0][0]
    dead = await _dead_letters_about(client, {t.task_id for t in tasks})
    assert dead == [], "nothing was dead-lettered while the accountant was away"


async def test_a_deadline_that_passes_during_an_approval_fails_the_task_expires_it_and_releases_its_budget(
    suite: Suite, client: NatsClient
) -> None:
    task = TaskSubmitted(
        task_id=new_task_id("deadline"),
        tenant="acme",
        agent="ops",
        input='create_ticket(title="page the on-call", priority="high")',
        deadline_seconds=4,
    )
    async with _supervised(suite):
        await _submit(client, task)
        events = await _task_events_or_logs(suite, client, task.task_id, timeout=60)
    kinds = [e["kind"] for e in events]
    assert kinds == ["accepted", "step", "approval_pending", "failed"], kinds
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    approval_id = events[2]["approval_id"]
    resolved = await first_message(
        client, APPROVAL_RESOLVED.format(tenant="acme"), lambda m: m["approval_id"] == approval_id
    )
    assert resolved["outcome"] == "expired"
    await asyncio.sleep(2)  # the budget is closed right after the failed event
    ledger = suite.state_dir / "cost-accountant.db"
    still_open = _query(
        ledger, "SELECT reservation_id FROM reservations WHERE task_id = ? AND status = 'open'", task.task_id
    )
    assert still_open == []
    tickets = _query(
        suite.state_dir / "tool-executor.db", "SELECT ticket_id FROM tickets WHERE task_id = ?", task.task_id
    )
    assert tickets == [], "the call never ran"


@contextlib.asynccontextmanager
async def _supervised(suite: Suite) -> AsyncIterator[None]:
    """Supervise as `agentbus up` does, every 0.2 s, while the block runs: what dies is restarted."""

    async def supervise() -> None:
        while True:
            suite.supervise()
            await asyncio.sleep(0.2)

    supervisor = asyncio.create_task(supervise())
    try:
        yield
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


async def _task_events_or_logs(suite: Suite, nc: NatsClient, task_id: str, timeout: float) -> list[dict[str, Any]]:
    """The task's events up to its terminal one; when it does not end in time, the failure shows the ends
    of the accountant's and the runner's logs, which say why."""
    try:
        return await task_events(nc, task_id, timeout=timeout)
    except TimeoutError:
        tails = {
            service: _log_tail(suite.state_dir / "logs" / f"{service.value}.log")
            for service in (Service.COST_ACCOUNTANT, Service.AGENT_RUNNER)
        }
        raise AssertionError(f"{task_id} did not end within {timeout:g}s; logs: {tails}") from None


def _log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


async def _events_so_far(nc: NatsClient, task_id: str, kinds: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    """The task's stored events, waiting until one of `kinds` is among them (or returning what there is)."""
    sub = await nc.jetstream().subscribe(f"agentbus.tasks.events.acme.{task_id}", ordered_consumer=True)
    events: list[dict[str, Any]] = []
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout if kinds else 2):
                while not kinds or not any(e["kind"] in kinds for e in events):
                    events.append(json.loads((await sub.next_msg(timeout=timeout)).data))
    finally:
        await sub.unsubscribe()
    return events


async def _dead_letters_about(nc: NatsClient, task_ids: set[str]) -> list[str]:
    found: list[str] = []
    sub = await nc.jetstream().subscribe("agentbus.deadletter.>", ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:
                return found
            letter = json.loads(msg.data)
            if any(task_id in letter.get("payload", "") for task_id in task_ids):
                found.append(f"{letter['consumer']}: {letter['error']}")
    finally:
        await sub.unsubscribe()
