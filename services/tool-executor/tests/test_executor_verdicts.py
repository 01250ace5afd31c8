"""Identities as nats-server enforces them, and the verdict every decision gets, end to end on a real nats-server:
the approver is the decision subject's token, the submitter the call's `submitted_by` (from the submit subject),
and every decision the executor processes is answered on the approver's verdict subject."""

from __future__ import annotations

from pathlib import Path

from agentbus.contracts.registry import APPROVAL_VERDICT
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import ApprovalStatus, approval_id_for
from agentbus.tool_executor.service import DecisionOutcome
from executor_harness import (
    RunnerStandIn,
    Verdicts,
    decision_payload,
    make_call,
    new_id,
    publish_call,
    publish_decision,
    sha,
)
from nats.aio.client import Client as NatsClient


def _refused(app: ToolExecutorApp, reason: str) -> float:
    return app.registry.get_sample_value("agentbus_approval_decisions_refused_total", {"reason": reason}) or 0.0


async def test_every_decision_gets_a_verdict_on_its_approvers_subject(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    call = make_call("append_marker", {"path": str(tmp_path / "v.txt"), "sleep": 0}, tenant=tenant, submitted_by="bob")
    await publish_call(own_client, call)
    await runner.wait_for(call.call_id, "approval_pending")
    approval_id = approval_id_for(call.call_id)
    good = sha(call)
    sent = [
        ("mallory", decision_payload(approval_id, "alice", "approve", good), "refused", "approver_mismatch"),
        ("carol", decision_payload(approval_id, "carol", "approve", good), "refused", "not_allowed"),
        ("bob", decision_payload(approval_id, "bob", "approve", good), "refused", "self_approval"),
        ("alice", decision_payload(approval_id, "alice", "approve", "0" * 64), "refused", "arguments_mismatch"),
        ("alice", b"{not json", "refused", "malformed"),
        ("alice", decision_payload(approval_id, "alice", "approve", good, urgent=True), "refused", "malformed"),
        ("alice", decision_payload(approval_id, "alice", "approve", good), "accepted", None),
        ("bob", decision_payload(approval_id, "bob", "deny", good), "refused", "already_resolved"),
    ]
    async with Verdicts(own_client, tenant) as verdicts:
        for token, payload, outcome, reason in sent:
            seq = await publish_decision(own_client, tenant, token, payload)
            verdict = await verdicts.wait_for(seq)
            assert (verdict.outcome, verdict.reason_code) == (outcome, reason), token
            assert verdict.approver == token, "the verdict names the subject's approver"
            assert verdict.approval_id == ("" if payload == b"{not json" else approval_id)
            assert verdict.detail, "a verdict says why"
        subjects = {subject for subject, _ in verdicts.heard}
    assert subjects == {
        APPROVAL_VERDICT.format(tenant=tenant, approver=t) for t in ("mallory", "carol", "bob", "alice")
    }
    assert (await runner.wait_for(call.call_id, "result")).ok
    audit = await executor.store.audit_entries()
    assert [(e.outcome, e.reason_code) for e in audit if e.tenant == tenant] == [(o, r) for _, _, o, r in sent]


async def test_an_unknown_submitter_never_allows_a_forbidden_self_approval(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "unknown.txt"
    forbidden = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant, submitted_by=None)
    allowed = make_call("self_service", {"note": "x"}, tenant=tenant, submitted_by=None)
    for call in (forbidden, allowed):
        await publish_call(own_client, call)
        await runner.wait_for(call.call_id, "approval_pending")
    before = _refused(executor, "submitter_unknown")
    async with Verdicts(own_client, tenant) as verdicts:
        approve = decision_payload(approval_id_for(forbidden.call_id), "alice", "approve", sha(forbidden))
        refused = await verdicts.wait_for(await publish_decision(own_client, tenant, "alice", approve))
        assert (refused.outcome, refused.reason_code) == ("refused", "submitter_unknown")
        still = await executor.store.get(approval_id_for(forbidden.call_id))
        assert still is not None
        assert still.status is ApprovalStatus.PENDING
        assert not marker.exists()

        # The tool whose policy allows self-approval does not care who submitted it.
        ok = decision_payload(approval_id_for(allowed.call_id), "alice", "approve", sha(allowed))
        accepted = await verdicts.wait_for(await publish_decision(own_client, tenant, "alice", ok))
        assert accepted.outcome == "accepted"
        # Denying is always allowed.
        deny = decision_payload(approval_id_for(forbidden.call_id), "bob", "deny", sha(forbidden))
        denied = await verdicts.wait_for(await publish_decision(own_client, tenant, "bob", deny))
        assert denied.outcome == "accepted"
    assert _refused(executor, "submitter_unknown") == before + 1
    assert (await runner.wait_for(allowed.call_id, "result")).ok
    result = await runner.wait_for(forbidden.call_id, "result")
    assert result.error is not None
    assert result.error.code == "approval_denied"
    assert not marker.exists()


async def test_a_redelivered_decision_gets_the_same_verdict_and_decides_nothing_twice(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn, tmp_path: Path
) -> None:
    tenant = new_id("t")
    marker = tmp_path / "replay.txt"
    call = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    other = make_call("append_marker", {"path": str(marker), "sleep": 0}, tenant=tenant)
    for pending in (call, other):
        await publish_call(own_client, pending)
        await runner.wait_for(pending.call_id, "approval_pending")
    assert executor.use_cases is not None
    decide = executor.use_cases.decide
    approve = decision_payload(approval_id_for(call.call_id), "alice", "approve", sha(call))
    wrong_hash = decision_payload(approval_id_for(other.call_id), "alice", "approve", "0" * 64)
    async with Verdicts(own_client, tenant) as verdicts:
        first = await decide(tenant, "alice", approve, 10**9)
        again = await decide(tenant, "alice", approve, 10**9)
        refused = await decide(tenant, "alice", wrong_hash, 10**9 + 1)
        refused_again = await decide(tenant, "alice", wrong_hash, 10**9 + 1)
        await verdicts.wait_for(10**9, count=2)
        await verdicts.wait_for(10**9 + 1, count=2)
    assert (first.outcome, again.outcome) == (DecisionOutcome.ACCEPTED, DecisionOutcome.REPLAYED)
    assert (refused.outcome, refused_again.outcome) == (DecisionOutcome.REFUSED, DecisionOutcome.REPLAYED)
    for seq in (10**9, 10**9 + 1):
        original, repeated = verdicts.of(seq)
        assert original == repeated, "the same verdict, down to its time"
    assert (await runner.wait_for(call.call_id, "result")).ok
    assert len(marker.read_text().splitlines()) == 1
    assert len(await executor.store.audit_entries()) >= 2
    assert [e.message_seq for e in await executor.store.audit_entries(approval_id_for(call.call_id))] == [10**9]
