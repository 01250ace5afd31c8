"""Withdrawals of calls whose task ended, end to end on a real nats-server and real SQLite: nothing is given up
silently and nothing starts for a task that is over."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from agentbus.contracts.registry import TOOL_WITHDRAW
from agentbus.contracts.tools import ToolCallWithdrawn
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import ApprovalStatus, CallRecord, CallStatus, approval_id_for
from executor_harness import (
    RunnerStandIn,
    StartExecutor,
    Verdicts,
    decision_payload,
    make_call,
    new_id,
    pending_requests,
    publish_call,
    publish_decision,
    publish_withdrawal,
    resolutions,
    sha,
    usage_records,
    wait_until,
)
from nats.aio.client import Client as NatsClient


def _withdrawals(app: ToolExecutorApp, found: str) -> float:
    return app.registry.get_sample_value("agentbus_tool_call_withdrawals_total", {"found": found}) or 0.0


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_call_awaiting_approval_is_withdrawn_its_approval_expires_and_it_never_runs(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "withdrawn.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await publish_withdrawal(own_client, call, reason="task cancelled")

    resolved = await runner.wait_for(call.call_id, "approval_resolved")
    assert (resolved.outcome, resolved.by) == ("expired", None)
    result = await runner.wait_for(call.call_id, "result")
    assert not result.ok
    assert result.error is not None
    assert result.error.code == "call_withdrawn"
    assert "task ended: task cancelled" in result.content
    assert (result.approval_id, result.outcome, result.by) == (approval_id_for(call.call_id), "expired", None)
    assert [r["outcome"] for r in await resolutions(own_client, tenant)] == ["expired"]
    approval = await executor.store.get(approval_id_for(call.call_id))
    assert approval is not None
    assert (approval.status, approval.decision_reason) == (ApprovalStatus.EXPIRED, "task ended: task cancelled")
    assert _withdrawals(executor, "awaiting_approval") == 1

    # An approval arriving after the task ended is refused; the withdrawal delivered again changes nothing.
    async with Verdicts(own_client, tenant) as verdicts:
        seq = await publish_decision(
            own_client, tenant, "alice", decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
        )
        verdict = await verdicts.wait_for(seq)
    assert (verdict.outcome, verdict.reason_code) == ("refused", "already_resolved")
    again = ToolCallWithdrawn(call_id=call.call_id, task_id=call.task_id, tenant=tenant, reason="task failed")
    await own_client.jetstream().publish(TOOL_WITHDRAW.format(tenant=tenant), again.model_dump_json().encode())
    await runner.settle(1.0)
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]
    assert not marker.exists()
    assert await usage_records(own_client, tenant) == []


async def test_a_withdrawal_that_arrives_before_its_call_means_the_call_runs_nothing(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "never.txt"
    plain = make_call("marker_now", {"path": str(marker)}, tenant=tenant)
    risky = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    for call in (plain, risky):
        await publish_withdrawal(own_client, call, reason="task deadline passed")

    async def both_recorded() -> bool:
        return _withdrawals(executor, "unseen") == 2

    await wait_until(both_recorded)
    for call in (plain, risky):
        await publish_call(own_client, call)
        result = await runner.wait_for(call.call_id, "result")
        assert result.error is not None
        assert result.error.code == "call_withdrawn"
        assert "task ended: task deadline passed" in result.content
    await runner.settle(0.5)
    assert runner.kinds(plain.call_id) == ["result"]
    assert runner.kinds(risky.call_id) == ["result"], "no approval is asked for a task that is over"
    assert await pending_requests(own_client, tenant) == []
    assert not marker.exists()
    stored = await executor.store.get_call(risky.call_id)
    assert stored is not None
    assert (stored.status, stored.tool) == (CallStatus.WITHDRAWN, "append_marker")


async def test_a_ready_call_that_is_withdrawn_never_starts(
    start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    executor = await start_executor(expiry_sweep_seconds=3600)
    tenant = new_id("t")
    marker = tmp_path / "ready.txt"
    call = make_call("marker_now", {"path": str(marker)}, tenant=tenant)
    # Ready and not yet claimed: what an executor stopped between an approval and the claim leaves behind.
    ready = CallRecord(
        call_id=call.call_id,
        tool_call_id=call.tool_call_id,
        tenant=tenant,
        task_id=call.task_id,
        agent=call.agent,
        tool=call.tool,
        step=call.step,
        arguments=call.arguments,
        submitted_by=call.submitted_by,
        status=CallStatus.READY,
        approval_id=None,
        traceparent=None,
        created_at=datetime.now(UTC),
    )
    assert await executor.store.transact(lambda ledger: ledger.insert_call(ready, None, []))
    await publish_withdrawal(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert result.error is not None
    assert result.error.code == "call_withdrawn"
    assert _withdrawals(executor, "ready") == 1
    await publish_call(own_client, call)  # the call message, delivered again
    await runner.settle(1.0)
    assert not marker.exists()
    assert runner.kinds(call.call_id) == ["result"]


async def test_a_running_call_finishes_and_its_result_is_published_as_usual(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "running.txt"
    call = make_call("slow_marker", {"path": str(marker), "sleep": 1.5}, tenant=tenant)
    await publish_call(own_client, call)
    async with asyncio.timeout(20):
        while not _lines(marker):
            await asyncio.sleep(0.02)
    await publish_withdrawal(own_client, call)

    async def seen_running() -> bool:
        return _withdrawals(executor, "running") == 1

    await wait_until(seen_running)
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok, result.content
    assert _lines(marker) == ["run", "done"], "it ran to its end, once"
    assert [u["usage_id"] for u in await usage_records(own_client, tenant)] == [f"tool:{call.call_id}"]
    stored = await executor.store.get_call(call.call_id)
    assert stored is not None
    assert stored.status is CallStatus.SUCCEEDED
    assert stored.withdrawn is not None
