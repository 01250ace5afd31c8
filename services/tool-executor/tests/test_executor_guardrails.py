"""What the executor does with the agent's guardrail verdict on a call, on a real nats-server and real SQLite:
a blocked call never runs and returns an error the model reads; a held call waits in the approval inbox with
the findings as its reason, whatever its tool's own policy says; a held input or answer (`guardrail_review`)
is released by an approval and refused by a denial."""

from __future__ import annotations

from pathlib import Path

from agentbus.contracts.tools import GUARDRAIL_REVIEW_TOOL, ToolCallGuardrail
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import approval_id_for
from executor_harness import (
    RunnerStandIn,
    decision_payload,
    make_call,
    new_id,
    pending_requests,
    publish_call,
    publish_decision,
    sha,
)
from nats.aio.client import Client as NatsClient

REASON = "guardrail privacy/personal_data: email in path (tool_arguments)"


async def test_a_call_the_guardrails_block_never_runs_and_returns_an_error_the_model_reads(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    marker = tmp_path / "blocked.txt"
    call = make_call(
        "marker_now",
        {"path": str(marker)},
        tenant=new_id("t"),
        guardrail=ToolCallGuardrail(action="block", reason=REASON),
    )
    await publish_call(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert not result.ok
    assert result.error is not None
    assert result.error.code == "guardrail_blocked"
    assert REASON in result.content
    assert "was not run" in result.content
    await runner.settle(0.5)
    assert not marker.exists()
    assert runner.kinds(call.call_id) == ["result"]


async def test_a_held_call_waits_for_approval_even_when_its_tool_needs_none_then_runs(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "held.txt"
    call = make_call(
        "marker_now",
        {"path": str(marker)},
        tenant=tenant,
        guardrail=ToolCallGuardrail(action="require_approval", reason=REASON),
    )
    await publish_call(own_client, call)
    pending = await runner.wait_for(call.call_id, "approval_pending")
    approval_id = approval_id_for(call.call_id)
    assert pending.approval_id == approval_id
    [request] = await pending_requests(own_client, tenant)
    assert request["reason"] == REASON
    assert request["tool"] == "marker_now"
    assert not marker.exists()
    # marker_now names no approvers: the guardrail_review tool's (group ops-leads) decide. carol is not one.
    await publish_decision(own_client, tenant, "carol", decision_payload(approval_id, "carol", "approve", sha(call)))
    await runner.settle(0.5)
    assert "result" not in runner.kinds(call.call_id)
    await publish_decision(own_client, tenant, "alice", decision_payload(approval_id, "alice", "approve", sha(call)))
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok, result.content
    assert marker.read_text() == "run\n"


async def test_a_held_tool_keeps_its_own_reason_beside_the_guardrails(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call(
        "create_ticket",
        {"title": "db down", "priority": "high"},
        tenant=tenant,
        guardrail=ToolCallGuardrail(action="require_approval", reason=REASON),
    )
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    [request] = await pending_requests(own_client, tenant)
    assert request["reason"] == f"{REASON}; High-priority tickets page the on-call engineer."
    assert request["risk"] == "high"


async def test_a_held_input_is_released_by_an_approval_and_refused_by_a_denial(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    reason = "guardrail p/deny_list: pattern 0 (input)"
    reviews = [
        make_call(
            GUARDRAIL_REVIEW_TOOL,
            {"stage": "input", "findings": reason, "text": "please DROP TABLE orders"},
            tenant=tenant,
            guardrail=ToolCallGuardrail(action="require_approval", reason=reason),
        )
        for _ in range(2)
    ]
    for review in reviews:
        await publish_call(own_client, review)
        await runner.wait_for(review.call_id, "approval_pending")
    requests = {r["approval_id"]: r for r in await pending_requests(own_client, tenant)}
    for review in reviews:
        request = requests[approval_id_for(review.call_id)]
        assert (request["tool"], request["reason"]) == (GUARDRAIL_REVIEW_TOOL, reason)
        assert request["arguments"]["text"] == "please DROP TABLE orders"
    approved, denied = reviews
    for review, decision in ((approved, "approve"), (denied, "deny")):
        payload = decision_payload(approval_id_for(review.call_id), "bob", decision, sha(review))
        await publish_decision(own_client, tenant, "bob", payload)
    released = await runner.wait_for(approved.call_id, "result")
    assert released.ok, released.content
    assert "released" in released.content
    refused = await runner.wait_for(denied.call_id, "result")
    assert not refused.ok
    assert refused.outcome == "denied"
