"""The approvals list approvers ask for (request/reply on `agentbus.approvals.list.<tenant>`), on a real
nats-server: approvers may not read the approvals stream themselves, so the executor answers from its store."""

from __future__ import annotations

from agentbus.contracts.approvals import ApprovalsListReply, arguments_sha256
from agentbus.contracts.registry import APPROVALS_LIST
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import approval_id_for
from executor_harness import (
    RunnerStandIn,
    decision_payload,
    list_approvals,
    make_call,
    new_id,
    publish_call,
    publish_decision,
    sha,
)
from nats.aio.client import Client as NatsClient


async def test_pending_approvals_are_listed_oldest_first_and_resolved_ones_on_request(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    calls = [make_call("self_service", {"note": f"note-{n}"}, tenant=tenant) for n in range(3)]
    for call in calls:
        await publish_call(own_client, call)
        await runner.wait_for(call.call_id, "approval_pending")
    elsewhere = make_call("self_service", {"note": "elsewhere"}, tenant=new_id("t"))
    await publish_call(own_client, elsewhere)
    await runner.wait_for(elsewhere.call_id, "approval_pending")
    ids = [approval_id_for(call.call_id) for call in calls]

    pending = await list_approvals(own_client, tenant)
    assert pending.error is None
    assert [entry.request.approval_id for entry in pending.approvals] == ids
    first = pending.approvals[0].request
    assert (first.tool, first.arguments, first.requested_by, first.risk) == (
        "self_service",
        {"note": "note-0"},
        "sam",
        "low",
    )
    assert first.arguments_sha256 == arguments_sha256(first.arguments)
    assert all(entry.resolution is None for entry in pending.approvals)

    await publish_decision(
        own_client, tenant, "bob", decision_payload(ids[0], "bob", "deny", sha(calls[0]), reason="no")
    )
    await runner.wait_for(calls[0].call_id, "result")
    still = await list_approvals(own_client, tenant)
    assert [entry.request.approval_id for entry in still.approvals] == ids[1:]
    everything = await list_approvals(own_client, tenant, include_resolved=True)
    assert [entry.request.approval_id for entry in everything.approvals] == ids
    resolution = everything.approvals[0].resolution
    assert resolution is not None
    assert (resolution.outcome, resolution.by) == ("denied", "bob")
    assert [e.request.approval_id for e in (await list_approvals(own_client, tenant, limit=1)).approvals] == ids[1:2]

    one = await list_approvals(own_client, tenant, approval_id=ids[0])
    assert [entry.request.approval_id for entry in one.approvals] == ids[:1], "one approval, in whatever state"
    foreign = await list_approvals(own_client, tenant, approval_id=approval_id_for(elsewhere.call_id))
    assert foreign.approvals == [], "another tenant's approval is not there"


async def test_a_bad_list_request_gets_an_error_reply(executor: ToolExecutorApp, own_client: NatsClient) -> None:
    reply = await own_client.request(APPROVALS_LIST.format(tenant="acme"), b'{"limit": 0}', timeout=10)
    answer = ApprovalsListReply.model_validate_json(reply.data)
    assert answer.error is not None
    assert answer.error.code == "schema_violation"
    assert answer.approvals == []


async def test_the_executor_is_ready_only_while_it_answers_the_list(executor: ToolExecutorApp) -> None:
    assert executor.ready()
    replies = executor._replies
    assert replies is not None
    await replies.stop(1.0)
    assert not executor.ready()
