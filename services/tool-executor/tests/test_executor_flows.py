"""The executor end to end on a real nats-server and real SQLite: calls, approvals, refusals, expiry,
exactly-once execution. The test plays the runner: it publishes ToolCallRequested and reads ToolCallUpdates
from the runner's durable consumer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa
from agentbus.contracts.rag import RetrievedChunk, SearchReply
from agentbus.contracts.registry import DEAD_LETTER, EXECUTOR_CALLS, EXECUTOR_DECISIONS, RAG_SEARCH
from agentbus.tool_executor.adapters.schema import tickets
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import ApprovalStatus, approval_id_for
from agentbus.tool_executor.service import DecisionOutcome
from executor_harness import (
    RunnerStandIn,
    StartExecutor,
    decision_payload,
    make_call,
    new_id,
    pending_requests,
    publish_call,
    publish_decision,
    resolutions,
    sha,
    stream_payloads,
    usage_records,
)
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg


async def _ticket_count(app: ToolExecutorApp, call_id: str) -> int:
    [row] = await app.store.query(sa.select(sa.func.count()).select_from(tickets).where(tickets.c.call_id == call_id))
    return int(row[0])


def _refused(app: ToolExecutorApp, reason: str) -> float:
    value = app.registry.get_sample_value("agentbus_approval_decisions_refused_total", {"reason": reason})
    return value or 0.0


async def test_a_call_that_needs_no_approval_runs_once_and_is_billed_once(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "runs.txt"
    call = make_call("marker_now", {"path": str(marker)}, tenant=tenant)
    await publish_call(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok, result.content
    assert "exit status 0" in result.content
    assert (result.approval_id, result.outcome) == (None, None), "no approval, none named"
    # The runner's publish repeated beyond the dedupe window (a new message with the same call id):
    again = call.model_copy(update={"tool_call_id": "call_1_again"})
    await own_client.jetstream().publish(f"agentbus.tools.calls.{tenant}", again.model_dump_json().encode())
    await runner.settle(1.0)
    assert marker.read_text() == "run\n", "the tool ran exactly once"
    assert runner.kinds(call.call_id) == ["result"]
    usage = await usage_records(own_client, tenant)
    assert [(u["usage_id"], u["kind"], u["tool"], u["reservation_id"]) for u in usage] == [
        (f"tool:{call.call_id}", "tool", "marker_now", f"tool:{call.call_id}")
    ]


async def test_a_high_priority_ticket_waits_for_approval_then_is_created_exactly_once(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("create_ticket", {"title": "db down", "priority": "high"}, tenant=tenant)
    await publish_call(own_client, call)
    pending = await runner.wait_for(call.call_id, "approval_pending")
    approval_id = approval_id_for(call.call_id)
    assert pending.approval_id == approval_id
    [request] = await pending_requests(own_client, tenant)
    assert request["approval_id"] == approval_id
    assert request["arguments_sha256"] == sha(call)
    assert (request["risk"], request["reason"]) == ("high", "High-priority tickets page the on-call engineer.")
    assert request["requested_by"] == "sam"
    assert await _ticket_count(executor, call.call_id) == 0

    await publish_decision(own_client, tenant, "alice", decision_payload(approval_id, "alice", "approve", sha(call)))
    resolved = await runner.wait_for(call.call_id, "approval_resolved")
    assert (resolved.outcome, resolved.by) == ("approved", "alice")
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok
    assert result.content.startswith("Created ticket TCK-")
    # The result repeats the approval it followed: updates may reach the runner out of order.
    assert (result.approval_id, result.outcome, result.by) == (approval_id, "approved", "alice")
    assert [r["outcome"] for r in await resolutions(own_client, tenant)] == ["approved"]

    # The same decision sent again, and the call redelivered: nothing runs a second time.
    await publish_decision(own_client, tenant, "alice", decision_payload(approval_id, "alice", "approve", sha(call)))
    await own_client.jetstream().publish(f"agentbus.tools.calls.{tenant}", call.model_dump_json().encode())
    await runner.settle(1.0)
    assert await _ticket_count(executor, call.call_id) == 1
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]
    assert _refused(executor, "already_resolved") >= 1
    assert len(await usage_records(own_client, tenant)) == 1


async def test_a_low_priority_ticket_needs_no_approval(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    call = make_call("create_ticket", {"title": "typo on the status page", "priority": "low"})
    await publish_call(own_client, call)
    result = await runner.wait_for(call.call_id, "result")
    assert result.ok
    assert runner.kinds(call.call_id) == ["result"]
    assert await _ticket_count(executor, call.call_id) == 1


async def test_a_denied_call_never_executes_and_the_model_reads_why(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "denied.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    payload = decision_payload(approval_id_for(call.call_id), "bob", "deny", sha(call), reason="not during the freeze")
    await publish_decision(own_client, tenant, "bob", payload)
    result = await runner.wait_for(call.call_id, "result")
    assert not result.ok
    assert result.error is not None
    assert result.error.code == "approval_denied"
    assert "denied by approver bob" in result.content
    assert "not during the freeze" in result.content
    assert (result.approval_id, result.outcome, result.by) == (approval_id_for(call.call_id), "denied", "bob")
    resolved = await runner.wait_for(call.call_id, "approval_resolved")
    assert (resolved.outcome, resolved.by) == ("denied", "bob")
    await runner.settle(0.5)
    assert not marker.exists()
    assert await usage_records(own_client, tenant) == []


async def test_every_refused_decision_is_audited_and_the_approval_stays_pending(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "refusals.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant, submitted_by="bob")
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    approval_id = approval_id_for(call.call_id)
    good = sha(call)
    attempts = [
        ("mallory", decision_payload(approval_id, "alice", "approve", good), "approver_mismatch"),
        ("mallory", decision_payload(approval_id, "mallory", "approve", good), "not_allowed"),
        ("carol", decision_payload(approval_id, "carol", "approve", good), "not_allowed"),
        ("bob", decision_payload(approval_id, "bob", "approve", good), "self_approval"),
        ("alice", decision_payload(approval_id, "alice", "approve", "0" * 64), "arguments_mismatch"),
        ("alice", decision_payload("apr_nope", "alice", "approve", good), "unknown_approval"),
        ("alice", b"{not json", "malformed"),
        ("alice", decision_payload(approval_id, "alice", "approve", good, urgent=True), "malformed"),
    ]
    seqs = [await publish_decision(own_client, tenant, token, payload) for token, payload, _ in attempts]
    store = executor.store
    async with asyncio.timeout(20):
        while len(await store.audit_entries()) < len(attempts):
            await asyncio.sleep(0.05)
    audit = {e.message_seq: e for e in await store.audit_entries()}
    assert [(audit[s].outcome, audit[s].reason_code) for s in seqs] == [
        ("refused", reason) for _, _, reason in attempts
    ]
    assert audit[seqs[0]].subject_approver == "mallory"
    assert audit[seqs[0]].approver == "alice"
    assert audit[seqs[6]].payload == "{not json"
    still = await store.get(approval_id)
    assert still is not None
    assert still.status is ApprovalStatus.PENDING
    assert _refused(executor, "not_allowed") == 2
    assert _refused(executor, "malformed") == 2
    assert runner.kinds(call.call_id) == ["approval_pending"]
    assert not marker.exists()
    letters = await stream_payloads(
        own_client, DEAD_LETTER.format(stream=EXECUTOR_DECISIONS.stream, consumer=EXECUTOR_DECISIONS.durable)
    )
    assert {letter["stream_seq"] for letter in letters} >= {seqs[6], seqs[7]}
    assert all(letter["error"]["code"] == "malformed_decision" for letter in letters)

    # A decision from an allowed approver who is not the submitter still goes through.
    await publish_decision(own_client, tenant, "alice", decision_payload(approval_id, "alice", "approve", good))
    assert (await runner.wait_for(call.call_id, "result")).ok
    assert len(marker.read_text().splitlines()) == 1


async def test_approvers_are_per_tenant_and_self_approval_follows_the_policy(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    acme = make_call("acme_only", {"name": "web", "image": "nginx"}, tenant="acme")
    globex = make_call("acme_only", {"name": "web", "image": "nginx"}, tenant="globex")
    mine = make_call("self_service", {"note": "mine"}, submitted_by="alice")
    for call in (acme, globex, mine):
        await publish_call(own_client, call)
        await runner.wait_for(call.call_id, "approval_pending")
    before = _refused(executor, "not_allowed")
    await publish_decision(
        own_client, "globex", "dora", decision_payload(approval_id_for(globex.call_id), "dora", "approve", sha(globex))
    )
    await publish_decision(
        own_client, "acme", "dora", decision_payload(approval_id_for(acme.call_id), "dora", "approve", sha(acme))
    )
    await publish_decision(
        own_client, "acme", "alice", decision_payload(approval_id_for(mine.call_id), "alice", "approve", sha(mine))
    )
    assert (await runner.wait_for(acme.call_id, "result")).ok
    assert (await runner.wait_for(mine.call_id, "result")).ok, "self-approval is allowed by this tool's policy"
    await runner.settle(0.5)
    assert runner.kinds(globex.call_id) == ["approval_pending"]
    assert _refused(executor, "not_allowed") == before + 1


async def test_an_unanswered_approval_expires_and_the_runner_is_told(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("short_lived", {"name": "web", "image": "nginx"}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    resolved = await runner.wait_for(call.call_id, "approval_resolved", timeout=10)
    assert (resolved.outcome, resolved.by) == ("expired", None)
    result = await runner.wait_for(call.call_id, "result")
    assert not result.ok
    assert result.error is not None
    assert result.error.code == "approval_expired"
    assert (result.approval_id, result.outcome, result.by) == (approval_id_for(call.call_id), "expired", None)
    assert [r["outcome"] for r in await resolutions(own_client, tenant)] == ["expired"]
    # Too late: refused, and nothing runs.
    late = decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
    await publish_decision(own_client, tenant, "alice", late)
    await runner.settle(0.5)
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_a_decision_after_expiry_is_refused_even_before_the_sweep_sees_it(
    start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    executor = await start_executor(expiry_sweep_seconds=3600)
    tenant = new_id("t")
    call = make_call("short_lived", {"name": "web", "image": "nginx"}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    await asyncio.sleep(1.2)
    late = decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
    await publish_decision(own_client, tenant, "alice", late)
    resolved = await runner.wait_for(call.call_id, "approval_resolved")
    assert resolved.outcome == "expired"
    assert not (await runner.wait_for(call.call_id, "result")).ok
    async with asyncio.timeout(10):
        while not await executor.store.audit_entries(approval_id_for(call.call_id)):
            await asyncio.sleep(0.05)
    [entry] = await executor.store.audit_entries(approval_id_for(call.call_id))
    assert (entry.outcome, entry.reason_code) == ("refused", "expired")
    assert _refused(executor, "expired") == 1


async def test_two_concurrent_decisions_exactly_one_wins(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "race.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    approval_id = approval_id_for(call.call_id)
    await asyncio.gather(
        publish_decision(own_client, tenant, "alice", decision_payload(approval_id, "alice", "approve", sha(call))),
        publish_decision(own_client, tenant, "bob", decision_payload(approval_id, "bob", "deny", sha(call))),
    )
    resolved = await runner.wait_for(call.call_id, "approval_resolved")
    result = await runner.wait_for(call.call_id, "result")
    await runner.settle(0.5)
    audit = await executor.store.audit_entries(approval_id)
    assert sorted((e.outcome, e.reason_code) for e in audit) == [("accepted", None), ("refused", "already_resolved")]
    [accepted] = [e for e in audit if e.outcome == "accepted"]
    assert resolved.by == accepted.approver
    assert result.ok is (resolved.outcome == "approved")
    assert (marker.exists() and len(marker.read_text().splitlines())) == (1 if result.ok else False)
    assert runner.kinds(call.call_id) == ["approval_pending", "approval_resolved", "result"]


async def test_a_redelivered_decision_finishes_what_it_started_and_runs_nothing_twice(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "replay.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    assert executor.use_cases is not None
    payload = decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
    first = await executor.use_cases.decide(tenant, "alice", payload, 10**9)
    again = await executor.use_cases.decide(tenant, "alice", payload, 10**9)
    assert (first.outcome, again.outcome) == (DecisionOutcome.ACCEPTED, DecisionOutcome.REPLAYED)
    assert (await runner.wait_for(call.call_id, "result")).ok
    assert len(marker.read_text().splitlines()) == 1


async def test_bad_arguments_and_unknown_tools_come_back_as_errors_the_model_can_read(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    invalid = make_call("create_ticket", {"title": "", "priority": "urgent", "colour": 1}, tenant=tenant)
    unknown = make_call("format_disk", {}, tenant=tenant)
    for call in (invalid, unknown):
        await publish_call(own_client, call)
    bad = await runner.wait_for(invalid.call_id, "result")
    assert not bad.ok
    assert bad.error is not None
    assert bad.error.code == "invalid_arguments"
    assert "priority: 'urgent' is not one of" in bad.content
    assert "title:" in bad.content
    assert "colour" in bad.content
    missing = await runner.wait_for(unknown.call_id, "result")
    assert missing.error is not None
    assert missing.error.code == "unknown_tool"
    assert "create_ticket" in missing.content
    await runner.settle(0.3)
    assert runner.kinds(invalid.call_id) == ["result"]
    assert await pending_requests(own_client, tenant) == []
    assert await usage_records(own_client, tenant) == []


async def test_a_call_on_another_tenants_subject_is_dead_lettered(
    executor: ToolExecutorApp, own_client: NatsClient
) -> None:
    call = make_call("create_ticket", {"title": "x"}, tenant="acme")
    ack = await own_client.jetstream().publish("agentbus.tools.calls.globex", call.model_dump_json().encode())
    subject = DEAD_LETTER.format(stream=EXECUTOR_CALLS.stream, consumer=EXECUTOR_CALLS.durable)
    async with asyncio.timeout(15):
        while True:
            letters = [x for x in await stream_payloads(own_client, subject, idle=0.3) if x["stream_seq"] == ack.seq]
            if letters:
                break
    assert letters[0]["error"]["code"] == "tenant_mismatch"


async def test_a_retrieval_tool_returns_numbered_passages_and_citations(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")

    async def retriever(msg: Msg) -> None:
        chunk = RetrievedChunk(document_id="kb-1", chunk_index=0, text="Reset via the portal.", score=0.8)
        await msg.respond(SearchReply(chunks=[chunk]).model_dump_json().encode())

    sub = await own_client.subscribe(RAG_SEARCH.format(tenant=tenant), cb=retriever)
    try:
        call = make_call("search_knowledge_base", {"query": "reset password"}, tenant=tenant)
        await publish_call(own_client, call)
        result = await runner.wait_for(call.call_id, "result")
    finally:
        await sub.unsubscribe()
    assert result.ok
    assert result.content.startswith("[1] (kb-1#0")
    assert [c.document_id for c in result.citations] == ["kb-1"]
    [usage] = await usage_records(own_client, tenant)
    assert (usage["kind"], usage["tool"]) == ("retrieval", "search_knowledge_base")
    assert json.loads(json.dumps(usage))["usage_id"] == f"tool:{call.call_id}"


async def test_tools_beyond_the_running_limit_wait_for_a_slot(
    start_executor: StartExecutor, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    await start_executor(max_running_tools=1)
    marker = tmp_path / "one-at-a-time.txt"
    calls = [make_call("slow_marker", {"path": str(marker), "sleep": 0.3}) for _ in range(3)]
    for call in calls:
        await publish_call(own_client, call)
    for call in calls:
        assert (await runner.wait_for(call.call_id, "result")).ok
    assert marker.read_text().splitlines() == ["run", "done"] * 3, "each ran alone, start to end"
