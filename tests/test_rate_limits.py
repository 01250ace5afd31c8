"""Rate limits across the real runners, worker and cost-accountant: a burst against a tenant's requests per
window proceeds window by window (each step over the limit waits, visible as `throttled`, and completes),
with two runner replicas asking one accountant; a `reject` limit rejects submissions over it, and a restarted
accountant still holds the window's level."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.cli.limits import limits_group
from agentbus.cli.tasks import describe
from agentbus.contracts.tasks import TASK_EVENT_ADAPTER
from agentbus.cost_accountant.app import create_app as create_accountant
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.service import BusService
from agentbus.testing import running_nats_server
from click.testing import CliRunner
from helpers import AGENTS_DIR, REPO_ROOT, TERMINAL, new_task_id, publish_submission, submission
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

BURST = 100
PER_WINDOW = 10
WINDOW_SECONDS = 2.0


def _accountant(url: str, folder: Path) -> BusService:
    return create_accountant(
        AccountantSettings(
            nats_url=url,
            database_url=f"sqlite+aiosqlite:///{folder / 'ledger.db'}",
            prices_file=REPO_ROOT / "config" / "prices.yaml",
            budgets_file=REPO_ROOT / "config" / "budgets.yaml",
            limits_file=folder / "limits.yaml",
            drain_timeout_seconds=1,
        )
    )


@contextlib.asynccontextmanager
async def suite(
    folder: Path, limits: dict[str, Any], *, runners: int = 2
) -> AsyncIterator[tuple[NatsClient, str, Callable[[], Awaitable[None]]]]:
    """A server of its own, `runners` runner replicas, a worker and an accountant enforcing `limits`; yields a
    client, the server's URL and a function that restarts the accountant."""
    (folder / "limits.yaml").write_text(json.dumps(limits), encoding="utf-8")
    with running_nats_server(folder / "nats") as server:
        nc = await connect_nats(server.url, "rate-limit-test")
        await apply_topology(nc.jetstream())
        services: list[BusService] = [
            create_runner(
                RunnerSettings(
                    nats_url=server.url,
                    agents_dir=AGENTS_DIR,
                    tools_dir=REPO_ROOT / "tools",
                    budgets_enabled=True,
                    drain_timeout_seconds=1,
                )
            )
            for _ in range(runners)
        ]
        services.append(create_worker(WorkerSettings(nats_url=server.url, drain_timeout_seconds=1)))
        accountant = [_accountant(server.url, folder)]
        for service in [*services, accountant[0]]:
            await service.start()

        async def restart_accountant() -> None:
            await accountant[0].stop()
            accountant[0] = _accountant(server.url, folder)
            await accountant[0].start()

        try:
            yield nc, server.url, restart_accountant
        finally:
            for service in [*services, accountant[0]]:
                await service.stop()
            await nc.close()


async def all_events(nc: NatsClient, tenant: str, tasks: int, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Every event of the tenant's tasks, by task, once `tasks` of them ended."""
    sub = await nc.jetstream().subscribe(
        f"agentbus.tasks.events.{tenant}.*", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    by_task: dict[str, list[dict[str, Any]]] = {}
    ended = 0
    try:
        async with asyncio.timeout(timeout):
            while ended < tasks:
                event = json.loads((await sub.next_msg(timeout=timeout)).data)
                by_task.setdefault(event["task_id"], []).append(event)
                ended += event["kind"] in TERMINAL
    finally:
        await sub.unsubscribe()
    return by_task


def admitted_windows(ledger: Path, tenant: str) -> Counter[int]:
    """The accountant's admitted LLM reservations of a tenant, counted per window (from the stored rows)."""
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute(
            "SELECT created_at FROM reservations WHERE tenant = ? AND kind = 'llm' AND status != 'denied'", (tenant,)
        ).fetchall()
    moments = [datetime.fromisoformat(row[0]).replace(tzinfo=UTC) for row in rows]
    return Counter(math.floor(moment.timestamp() / WINDOW_SECONDS) for moment in moments)


async def test_a_burst_over_a_tenant_limit_proceeds_window_by_window_and_every_task_completes(tmp_path: Path) -> None:
    limits = {
        "window_seconds": WINDOW_SECONDS,
        "tenants": {"acme": {"tenant": {"requests_per_minute": PER_WINDOW}}},
    }
    async with suite(tmp_path, limits, runners=2) as (nc, _, _):
        started = time.monotonic()
        tasks = [new_task_id("burst") for _ in range(BURST)]
        await asyncio.gather(*(publish_submission(nc, submission(task_id, agent="echo")) for task_id in tasks))
        events = await all_events(nc, "acme", BURST, timeout=180)
        took = time.monotonic() - started

    assert sorted(events) == sorted(tasks)
    assert all(stream[-1]["kind"] == "completed" for stream in events.values()), "waiting never fails a task"
    for stream in events.values():
        assert [event["seq"] for event in stream] == list(range(1, len(stream) + 1))
    throttled = [event for stream in events.values() for event in stream if event["kind"] == "throttled"]
    waited = {event["task_id"] for event in throttled}
    assert len(waited) >= BURST - 2 * PER_WINDOW, "all but a window's worth (or two, across a boundary) waited"
    assert all(event["limit"] == "tenant:acme:requests_per_minute" for event in throttled)
    # A task held back is given its turn in a later window: it waits once, for as many windows as are ahead.
    assert all(0 < event["wait_seconds"] <= (BURST // PER_WINDOW + 1) * WINDOW_SECONDS for event in throttled)
    print(f"{len(throttled)} throttled events for {len(waited)} tasks that waited")
    assert len(throttled) <= 1.2 * len(waited), "a waiting task is told to wait about once, not every window"
    line = describe(TASK_EVENT_ADAPTER.validate_python(throttled[0]))
    assert f"waits {throttled[0]['wait_seconds']:g}s for tenant:acme:requests_per_minute" in line

    windows = admitted_windows(tmp_path / "ledger.db", "acme")
    assert sum(windows.values()) == BURST, "one admitted reservation per task"
    assert max(windows.values()) == PER_WINDOW, "the limit was reached"
    assert all(count <= PER_WINDOW for count in windows.values()), f"a window admitted over the limit: {windows}"
    assert len(windows) >= BURST // PER_WINDOW
    # The burst starts somewhere in a window: the last tenth is admitted at least eight whole windows later.
    assert took >= (BURST // PER_WINDOW - 2) * WINDOW_SECONDS


def _near_window_end(window: float, margin: float) -> float:
    """Seconds to wait so that at least `margin` seconds of the current window are left."""
    into = time.time() % window
    return window - into + 0.5 if window - into < margin else 0.0


def _window_with_time_left(margin: float) -> float:
    """The longest window (at most an hour, whole minutes) whose current one has `margin` seconds left.

    Windows are aligned to the epoch, so windows of other lengths end at other times: choosing one that
    has time left spares the test a wait of up to `margin` seconds for the next hour to begin.
    """
    return next((w for w in range(3600, 1800, -60) if w - time.time() % w >= margin), 3600.0)


async def test_a_reject_limit_rejects_submissions_over_it_and_a_restarted_accountant_keeps_the_level(
    tmp_path: Path,
) -> None:
    window = float(_window_with_time_left(margin=300))
    limits = {
        "window_seconds": window,
        "tenants": {"globex": {"tenant": {"requests_per_minute": 3, "on_limit": "reject"}}},
    }
    async with suite(tmp_path, limits, runners=2) as (nc, url, restart_accountant):
        await asyncio.sleep(_near_window_end(window, margin=120))  # 0 unless the suite took minutes to start
        first = [new_task_id("reject") for _ in range(5)]
        await asyncio.gather(
            *(publish_submission(nc, submission(task_id, tenant="globex"), tenant="globex") for task_id in first)
        )
        events = await all_events(nc, "globex", len(first), timeout=60)
        outcomes = Counter(stream[-1]["kind"] for stream in events.values())
        assert outcomes == {"completed": 3, "rejected": 2}
        for stream in events.values():
            if stream[-1]["kind"] == "rejected":
                assert [event["kind"] for event in stream] == ["rejected"], "rejected at submission, never accepted"
                assert stream[0]["error"]["code"] == "rate_limited"
                assert "tenant:globex:requests_per_minute" in stream[0]["error"]["message"]

        shown = await asyncio.to_thread(
            CliRunner().invoke, limits_group, ["show", "--tenant", "globex", "--json", "--nats-url", url]
        )
        assert shown.exit_code == 0, shown.output
        # In this process logging is not configured: the CLI's own connection logs share its output.
        levels = json.loads(next(line for line in shown.output.splitlines() if line.startswith("{")))
        assert [(b["bucket"], b["requests"], b["requests_per_minute"]) for b in levels["buckets"]] == [
            ("tenant:globex", 3, 3)
        ]

        await restart_accountant()
        late = new_task_id("after-restart")
        await publish_submission(nc, submission(late, tenant="globex"), tenant="globex")
        after = await all_events(nc, "globex", len(first) + 1, timeout=60)
        assert [event["kind"] for event in after[late]] == ["rejected"], "the restart did not refill the bucket"
        table = await asyncio.to_thread(
            CliRunner().invoke, limits_group, ["show", "--tenant", "globex", "--nats-url", url]
        )
        assert table.exit_code == 0, table.output
        assert re.search(r"^tenant:globex\s+3\s+3\s", table.output, re.M), table.output
