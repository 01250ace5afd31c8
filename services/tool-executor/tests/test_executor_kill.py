"""Kill the executor (SIGKILL of a real `python -m agentbus.tool_executor` process) at each point that matters
and restart it: no approved call is lost, none runs twice, none runs without a valid approval.

The process stops at a named point through its test-only fault setting (AGENTBUS_EXECUTOR_FAULT_PAUSE_AT),
which writes a marker file when reached; the test then kills it there. The executor's consumers get a short
ack_wait on this test server, so the messages the killed process held come back within seconds, and each
test waits until its consumers have nothing pending or unacked: every redelivery has been seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from agentbus.contracts.registry import EXECUTOR_CALLS, EXECUTOR_DECISIONS, EXECUTOR_WITHDRAWALS
from agentbus.runtime.bootstrap import consumer_config
from agentbus.runtime.server import NatsServerProcess, free_port
from agentbus.tool_executor.adapters.schema import tickets
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore
from agentbus.tool_executor.domain import approval_id_for
from executor_harness import (
    RunnerStandIn,
    Verdicts,
    decision_payload,
    make_call,
    new_id,
    prepare_config,
    publish_call,
    publish_decision,
    sha,
    usage_records,
)
from nats.aio.client import Client as NatsClient

SHORT_ACK_WAIT_SECONDS = 4.0
EXECUTOR_CONSUMERS = (EXECUTOR_CALLS, EXECUTOR_WITHDRAWALS, EXECUTOR_DECISIONS)
LEASE_SECONDS = 2.0


@pytest_asyncio.fixture(scope="module")
async def short_ack_wait(own_client: NatsClient) -> None:
    js = own_client.jetstream()
    for spec in EXECUTOR_CONSUMERS:
        await js.add_consumer(spec.stream, consumer_config(replace(spec, ack_wait_seconds=SHORT_ACK_WAIT_SECONDS)))


class ExecutorProcess:
    """The executor as its own process, against one SQLite file, restartable."""

    def __init__(self, server: NatsServerProcess, root: Path) -> None:
        self.root = root
        self.markers = root / "markers"
        self.markers.mkdir(parents=True, exist_ok=True)
        tools, approvers = prepare_config(root)
        self.database_url = f"sqlite+aiosqlite:///{root / 'executor.db'}"
        self._env = {
            **os.environ,
            "AGENTBUS_EXECUTOR_NATS_URL": server.url,
            "AGENTBUS_EXECUTOR_TOOLS_DIR": str(tools),
            "AGENTBUS_EXECUTOR_APPROVERS_FILE": str(approvers),
            "AGENTBUS_EXECUTOR_DATABASE_URL": self.database_url,
            "AGENTBUS_EXECUTOR_EXPIRY_SWEEP_SECONDS": "0.2",
            "AGENTBUS_EXECUTOR_EXECUTION_LEASE_SECONDS": str(LEASE_SECONDS),
            "AGENTBUS_EXECUTOR_DRAIN_TIMEOUT_SECONDS": "2",
            "AGENTBUS_EXECUTOR_FAULT_MARKER_DIR": str(self.markers),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self, pause_at: str | None = None) -> None:
        self.port = free_port()
        env = {**self._env, "AGENTBUS_EXECUTOR_HTTP_PORT": str(self.port)}
        if pause_at:
            env["AGENTBUS_EXECUTOR_FAULT_PAUSE_AT"] = pause_at
        self.process = self._spawn(env)
        async with asyncio.timeout(30):
            while not await asyncio.to_thread(self._ready):
                assert self.process.poll() is None, (self.root / "executor.log").read_text()[-3000:]
                await asyncio.sleep(0.1)

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.root / "executor.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "agentbus.tool_executor"], env=env, stdout=log, stderr=log)

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

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    async def scalar(self, query: sa.Select[Any]) -> int:
        store = SqlApprovalStore(self.database_url)
        try:
            [row] = await store.query(query)
            return int(row[0])
        finally:
            await store.close()


@pytest.fixture
def executor_process(own_server: NatsServerProcess, tmp_path: Path, short_ack_wait: None) -> Iterator[ExecutorProcess]:
    process = ExecutorProcess(own_server, tmp_path)
    yield process
    exit_code = process.stop()
    assert exit_code in (None, 0), "a running executor drains and exits cleanly on SIGTERM"


@pytest_asyncio.fixture
async def orphans() -> AsyncIterator[list[int]]:
    """Process groups a killed executor left running (its shell tools): killed after the test."""
    groups: list[int] = []
    yield groups
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


async def _drained(nc: NatsClient) -> None:
    """The executor's consumers have delivered and had acked everything: no redelivery is still to come."""
    js = nc.jetstream()
    async with asyncio.timeout(SHORT_ACK_WAIT_SECONDS * 4):
        while True:
            infos = [await js.consumer_info(s.stream, s.durable) for s in EXECUTOR_CONSUMERS]
            if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
                return
            await asyncio.sleep(0.2)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _tickets(process: ExecutorProcess, call_id: str) -> int:
    return await process.scalar(sa.select(sa.func.count()).select_from(tickets).where(tickets.c.call_id == call_id))


async def _approve(nc: NatsClient, call_tenant: str, call_id: str, digest: str) -> int:
    return await publish_decision(
        nc, call_tenant, "alice", decision_payload(approval_id_for(call_id), "alice", "approve", digest)
    )


async def test_killed_after_the_approval_request_was_published_before_the_ack(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("create_ticket", {"title": "db down", "priority": "high"}, tenant=tenant)
    await executor_process.start(pause_at="call_published")
    await publish_call(own_client, call)
    await executor_process.paused_at("call_published")
    executor_process.kill()
    await executor_process.start()
    await runner.wait_for(call.call_id, "approval_pending")
    await _approve(own_client, tenant, call.call_id, sha(call))
    assert (await runner.wait_for(call.call_id, "result")).ok
    await _drained(own_client)
    assert await _tickets(executor_process, call.call_id) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]
    assert len(await usage_records(own_client, tenant)) == 1


async def test_killed_after_running_a_call_that_needed_no_approval_before_its_ack(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "unapproved.txt"
    call = make_call("marker_now", {"path": str(marker)}, tenant=tenant)
    await executor_process.start(pause_at="call_before_ack")
    await publish_call(own_client, call)
    await executor_process.paused_at("call_before_ack")
    executor_process.kill()
    assert (await runner.wait_for(call.call_id, "result")).ok
    await executor_process.start()
    await _drained(own_client)
    assert _lines(marker) == ["run"]
    assert runner.kinds(call.call_id) == ["result"]
    assert len(await usage_records(own_client, tenant)) == 1


async def test_killed_while_the_approval_is_pending(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "pending.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await executor_process.start()
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    executor_process.kill()
    await executor_process.start()
    await _approve(own_client, tenant, call.call_id, sha(call))
    assert (await runner.wait_for(call.call_id, "result")).ok
    await _drained(own_client)
    assert len(_lines(marker)) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_killed_after_the_decision_committed_before_the_tool_started(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "decided.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await executor_process.start(pause_at="decision_committed")
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await _approve(own_client, tenant, call.call_id, sha(call))
    await executor_process.paused_at("decision_committed")
    executor_process.kill()
    assert _lines(marker) == [], "the tool had not started"
    await executor_process.start()
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok
    await _drained(own_client)
    assert len(_lines(marker)) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_killed_during_a_shell_execution_reports_an_unknown_outcome_and_never_reruns(
    executor_process: ExecutorProcess,
    own_client: NatsClient,
    runner: RunnerStandIn,
    tmp_path: Path,
    orphans: list[int],
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "during.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 30}, tenant=tenant)
    await executor_process.start()
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await _approve(own_client, tenant, call.call_id, sha(call))
    async with asyncio.timeout(20):
        while not _lines(marker):
            await asyncio.sleep(0.02)
    orphans.append(int(_lines(marker)[0]))
    executor_process.kill()
    await executor_process.start()
    result = await runner.wait_for(call.call_id, "result", timeout=30)
    assert not result.ok
    assert result.error is not None
    assert result.error.code == "execution_interrupted"
    assert result.content.startswith("execution_interrupted: outcome unknown")
    await _drained(own_client)
    assert len(_lines(marker)) == 1, "a non-idempotent tool is never started twice"
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_killed_during_a_transactional_execution_reruns_it_once(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("create_ticket", {"title": "disk full", "priority": "high"}, tenant=tenant)
    await executor_process.start(pause_at="effect_applied")
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await _approve(own_client, tenant, call.call_id, sha(call))
    await executor_process.paused_at("effect_applied")
    executor_process.kill()
    await executor_process.start()
    result = await runner.wait_for(call.call_id, "result", timeout=30)
    assert result.ok, result.content
    assert (result.outcome, result.by) == ("approved", "alice"), "a rerun's result names the approval too"
    await _drained(own_client)
    assert await _tickets(executor_process, call.call_id) == 1
    assert len(await usage_records(own_client, tenant)) == 1


@pytest.mark.parametrize("point", ["execution_finished", "execution_committed", "decision_before_ack"])
async def test_killed_around_recording_and_publishing_the_outcome(
    point: str,
    executor_process: ExecutorProcess,
    own_client: NatsClient,
    runner: RunnerStandIn,
    tmp_path: Path,
) -> None:
    tenant = new_id("t")
    marker = tmp_path / f"{point}.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await executor_process.start(pause_at=point)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await _approve(own_client, tenant, call.call_id, sha(call))
    await executor_process.paused_at(point)
    executor_process.kill()
    await executor_process.start()
    result = await runner.wait_for(call.call_id, "result", timeout=30)
    await _drained(own_client)
    assert len(_lines(marker)) == 1, "the tool ran exactly once"
    if point == "execution_finished":
        # Finished but not recorded: for a shell tool the outcome is unknown, so it is not run again.
        assert result.error is not None
        assert result.error.code == "execution_interrupted"
    else:
        assert result.ok
        assert len(await usage_records(own_client, tenant)) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_a_decision_delivered_again_after_a_kill_gets_the_same_verdict_and_runs_nothing_twice(
    executor_process: ExecutorProcess, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "verdict.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await executor_process.start(pause_at="decision_before_ack")
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    async with Verdicts(own_client, tenant) as verdicts:
        seq = await _approve(own_client, tenant, call.call_id, sha(call))
        await executor_process.paused_at("decision_before_ack")
        first = await verdicts.wait_for(seq)
        executor_process.kill()
        await executor_process.start()
        again = await verdicts.wait_for(seq, count=2, timeout=30)
    assert first.outcome == "accepted"
    assert again == first
    await _drained(own_client)
    assert len(_lines(marker)) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]
