"""The SQL store against real SQLite and a real Postgres: compare-and-set state, the ledger, audit and outbox,
group commit, and what an unavailable database looks like to its callers.

Postgres tests use a fresh database per run, dropped afterwards. Without a Postgres server they skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from agentbus.contracts.approvals import arguments_sha256
from agentbus.tool_executor.adapters.schema import tickets
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    Withdrawal,
    approval_id_for,
)
from agentbus.tool_executor.ports import (
    AuditEntry,
    Claim,
    Completion,
    EffectConnection,
    Ledger,
    OutgoingMessage,
    Resolution,
    StoreUnavailableError,
)
from store_support import DATABASE_KINDS, database


@pytest_asyncio.fixture(params=DATABASE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlApprovalStore]:
    async with database(request.param, tmp_path) as url:
        sql = SqlApprovalStore(url)
        await sql.migrate()
        yield sql
        await sql.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _call(status: CallStatus = CallStatus.AWAITING_APPROVAL, **changes: Any) -> CallRecord:
    call_id = f"task-{uuid.uuid4().hex[:8]}.1.0"
    values: dict[str, Any] = {
        "call_id": call_id,
        "tool_call_id": "call_1",
        "tenant": "acme",
        "task_id": call_id.split(".")[0],
        "agent": "ops",
        "tool": "run_shell",
        "step": 1,
        "arguments": {"command": "ls", "note": "é"},
        "submitted_by": "sam",
        "status": status,
        "approval_id": approval_id_for(call_id) if status is CallStatus.AWAITING_APPROVAL else None,
        "traceparent": None,
        "created_at": _now(),
    }
    values.update(changes)
    return CallRecord(**values)


def _approval_for(call: CallRecord, expires_in: float = 3600) -> ApprovalRecord:
    assert call.approval_id is not None
    return ApprovalRecord(
        approval_id=call.approval_id,
        call_id=call.call_id,
        tenant=call.tenant,
        task_id=call.task_id,
        agent=call.agent,
        tool=call.tool,
        arguments=call.arguments,
        arguments_sha256=arguments_sha256(call.arguments),
        risk="high",
        reason="always",
        requested_by=call.submitted_by,
        requested_at=_now(),
        expires_at=_now() + timedelta(seconds=expires_in),
    )


def _message(call: CallRecord, kind: str) -> OutgoingMessage:
    return OutgoingMessage("agentbus.tools.updates.acme", f"tool:{call.call_id}:{kind}", "{}", None)


async def _pending(store: SqlApprovalStore, expires_in: float = 3600) -> tuple[CallRecord, ApprovalRecord]:
    call = _call()
    approval = _approval_for(call, expires_in)
    assert await store.transact(lambda ledger: ledger.insert_call(call, approval, [_message(call, "approval_pending")]))
    return call, approval


async def _insert_returning(store: SqlApprovalStore, call: CallRecord) -> bool:
    return await store.transact(lambda ledger: ledger.insert_call(call, None, []))


async def _insert(store: SqlApprovalStore, call: CallRecord) -> None:
    assert await _insert_returning(store, call)


def _approve(approval: ApprovalRecord, by: str, seq: int) -> Resolution:
    return Resolution(
        approval_id=approval.approval_id,
        status=ApprovalStatus.APPROVED,
        by=by,
        at=_now(),
        reason=None,
        decision_seq=seq,
        call_status=CallStatus.READY,
        call_result=None,
        outbox=[OutgoingMessage("s", f"resolved:{approval.approval_id}:{seq}", "{}")],
    )


async def _resolve(store: SqlApprovalStore, approval: ApprovalRecord, by: str, seq: int) -> bool:
    return await store.transact(lambda ledger: ledger.resolve_approval(_approve(approval, by, seq)))


async def _to_resume(store: SqlApprovalStore, now: datetime) -> list[CallRecord]:
    return await store.transact(lambda ledger: ledger.calls_to_resume(now, ready_before=now))


async def _claim(store: SqlApprovalStore, call_id: str, owner: str, now: datetime) -> CallRecord | None:
    return await store.claim(call_id, owner, now, now + timedelta(seconds=30))


async def test_a_call_is_inserted_once_with_its_approval_and_messages(store: SqlApprovalStore) -> None:
    call, approval = await _pending(store)
    assert not await store.transact(lambda ledger: ledger.insert_call(call, approval, [_message(call, "again")]))
    stored = await store.get_call(call.call_id)
    assert stored is not None
    assert stored.status is CallStatus.AWAITING_APPROVAL
    assert stored.arguments == {"command": "ls", "note": "é"}
    read = await store.get(approval.approval_id)
    assert read is not None
    assert read.status is ApprovalStatus.PENDING
    assert read.expires_at == approval.expires_at.replace(microsecond=read.expires_at.microsecond)
    unpublished = await store.transact(lambda ledger: ledger.unpublished(call.call_id))
    assert [m.message.msg_id for m in unpublished] == [f"tool:{call.call_id}:approval_pending"]


async def test_approvals_are_listed_per_tenant_oldest_first_pending_or_all(store: SqlApprovalStore) -> None:
    _, first = await _pending(store)
    _, second = await _pending(store)
    other = _call(tenant="globex")
    globex = _approval_for(other)
    await store.transact(lambda ledger: ledger.insert_call(other, globex, []))
    assert [a.approval_id for a in await store.list_pending("acme")] == [first.approval_id, second.approval_id]
    assert await store.transact(lambda ledger: ledger.resolve_approval(_approve(first, "alice", 1)))
    assert [a.approval_id for a in await store.list_pending("acme")] == [second.approval_id]
    everything = await store.transact(lambda ledger: ledger.approvals("acme", include_resolved=True))
    assert [(a.approval_id, a.status) for a in everything] == [
        (first.approval_id, ApprovalStatus.APPROVED),
        (second.approval_id, ApprovalStatus.PENDING),
    ]
    one = await store.transact(lambda ledger: ledger.approvals("acme", include_resolved=False, limit=1))
    assert [a.approval_id for a in one] == [second.approval_id]
    by_id = await store.transact(
        lambda ledger: ledger.approvals("acme", include_resolved=False, approval_id=first.approval_id)
    )
    assert [a.approval_id for a in by_id] == [first.approval_id], "one approval by id, in any state"
    foreign = await store.transact(
        lambda ledger: ledger.approvals("acme", include_resolved=True, approval_id=globex.approval_id)
    )
    assert foreign == [], "another tenant's approval is not found"
    assert await store.transact(lambda ledger: ledger.count_pending()) == 2
    assert await store.get("apr_unknown") is None


async def test_concurrent_decisions_exactly_one_wins(store: SqlApprovalStore) -> None:
    call, approval = await _pending(store)
    outcomes = await asyncio.gather(*(_resolve(store, approval, f"a{n}", n) for n in range(10)))
    assert sorted(outcomes) == [False] * 9 + [True]
    winner = outcomes.index(True)
    resolved = await store.get(approval.approval_id)
    assert resolved is not None
    assert (resolved.status, resolved.decided_by, resolved.decision_seq) == (
        ApprovalStatus.APPROVED,
        f"a{winner}",
        winner,
    )
    ready = await store.get_call(call.call_id)
    assert ready is not None
    assert ready.status is CallStatus.READY
    unpublished = await store.transact(lambda ledger: ledger.unpublished(call.call_id))
    assert len(unpublished) == 2, "only the winner's messages were stored"


async def test_concurrent_decisions_between_two_stores_on_one_database_exactly_one_wins(
    store: SqlApprovalStore,
) -> None:
    # Two executors on one database: their writers compete through the database's own locks.
    _, approval = await _pending(store)
    other = SqlApprovalStore(store.url)
    try:
        stores = [store, other] * 5
        outcomes = await asyncio.gather(*(_resolve(s, approval, f"a{n}", n) for n, s in enumerate(stores)))
    finally:
        await other.close()
    assert sorted(outcomes) == [False] * 9 + [True]


async def test_only_calls_ready_for_a_while_are_resumed(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    now = _now()
    just_ready = await store.transact(
        lambda ledger: ledger.calls_to_resume(now, ready_before=now - timedelta(seconds=30))
    )
    assert just_ready == [], "its decision's handler is about to run it"
    assert [c.call_id for c in await _to_resume(store, now + timedelta(seconds=1))] == [call.call_id]


async def test_concurrent_claims_exactly_one_runs(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    now = _now()
    claims = await asyncio.gather(*(_claim(store, call.call_id, f"owner-{n}", now) for n in range(8)))
    assert sum(c is not None for c in claims) == 1
    again = await asyncio.gather(*(_claim(store, call.call_id, "owner-0", now) for _ in range(3)))
    assert again == [None] * 3, "the same owner asking again in one batch takes nothing either"
    running = await store.get_call(call.call_id)
    assert running is not None
    assert running.status is CallStatus.RUNNING
    assert running.attempts == 1


async def test_claims_and_completions_queued_together_are_each_applied_once(store: SqlApprovalStore) -> None:
    calls = [_call(CallStatus.READY) for _ in range(20)]
    for call in calls:
        await _insert(store, call)
    now = _now()
    duplicated = [call.call_id for call in calls] + [calls[0].call_id, calls[1].call_id]
    claimed = await asyncio.gather(*(_claim(store, call_id, "owner", now) for call_id in duplicated))
    assert [c is not None for c in claimed] == [True] * 20 + [False, False]
    assert all(c.attempts == 1 and c.lease_owner == "owner" for c in claimed if c is not None)
    completions = [
        Completion(CallStatus.SUCCEEDED if n % 2 else CallStatus.FAILED, ToolResult(bool(n % 2), f"r{n}"))
        for n in range(20)
    ]
    recorded = await asyncio.gather(
        *(store.finish(Claim(c.call_id, "owner", 1), done) for c, done in zip(calls, completions, strict=True)),
        store.finish(Claim(calls[0].call_id, "intruder", 1), completions[0]),
    )
    assert recorded == [True] * 20 + [False]
    for call, done in zip(calls, completions, strict=True):
        stored = await store.get_call(call.call_id)
        assert stored is not None
        assert (stored.status, stored.result, stored.lease_owner) == (done.status, done.result, None)


async def test_a_running_call_is_taken_over_only_after_its_lease_lapsed(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    now = _now()
    first = await _claim(store, call.call_id, "first", now)
    assert first is not None
    assert first.attempts == 1
    assert await _claim(store, call.call_id, "second", now + timedelta(seconds=10)) is None
    assert await _to_resume(store, now + timedelta(seconds=10)) == []
    later = now + timedelta(seconds=31)
    assert [c.call_id for c in await _to_resume(store, later)] == [call.call_id]
    taken = await _claim(store, call.call_id, "second", later)
    assert taken is not None
    assert (taken.status, taken.lease_owner, taken.attempts) == (CallStatus.RUNNING, "second", 2)
    stale, current = Claim(call.call_id, "first", 1), Claim(call.call_id, "second", 2)
    until = later + timedelta(seconds=60)
    assert not await store.transact(lambda ledger: ledger.renew_lease(stale, until))
    assert await store.transact(lambda ledger: ledger.renew_lease(current, until))
    done = Completion(CallStatus.SUCCEEDED, ToolResult(True, "done"), [_message(call, "result")])
    # Queued together, recorded together: only the current holder's completion counts.
    recorded = list(await asyncio.gather(store.finish(stale, done), store.finish(current, done)))
    assert recorded == [False, True], "a stale holder cannot record"
    assert [m.message.msg_id for m in await store.transact(lambda ledger: ledger.unpublished(call.call_id))] == [
        f"tool:{call.call_id}:result"
    ]
    assert await _claim(store, call.call_id, "third", later + timedelta(days=1)) is None, "a finished call stays so"


async def test_a_completion_commits_its_effect_with_the_ledger_or_neither(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    claimed = await _claim(store, call.call_id, "owner", _now())
    assert claimed is not None

    async def open_ticket(connection: EffectConnection) -> Completion:
        await connection.execute(
            tickets.insert().values(
                ticket_id=f"T-{call.call_id[-12:]}",
                call_id=call.call_id,
                tenant="acme",
                task_id=call.task_id,
                title="x",
                priority="high",
                description="",
                created_at=_now(),
            )
        )
        return Completion(CallStatus.SUCCEEDED, ToolResult(True, "done"), [_message(call, "result")])

    async def count() -> int:
        [row] = await store.query(sa.select(sa.func.count()).select_from(tickets))
        return int(row[0])

    assert await store.complete_with_effects(Claim(call.call_id, "intruder", 1), open_ticket) is None
    assert await count() == 0
    completion = await store.complete_with_effects(Claim(call.call_id, "owner", 1), open_ticket)
    assert completion is not None
    done = await store.get_call(call.call_id)
    assert done is not None
    assert done.status is CallStatus.SUCCEEDED
    assert done.result == ToolResult(True, "done")
    assert await count() == 1

    async def record_only(_: EffectConnection) -> Completion:
        return Completion(CallStatus.FAILED, ToolResult(False, "late"), [])

    assert await store.complete_with_effects(Claim(call.call_id, "owner", 1), record_only) is None, "completes once"


async def test_a_savepoint_undoes_a_failed_tools_writes_and_the_transaction_goes_on(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    await _claim(store, call.call_id, "owner", _now())

    async def write_then_fail(connection: EffectConnection) -> None:
        async with connection.savepoint():
            await connection.execute(
                tickets.insert().values(
                    ticket_id="T-half",
                    call_id=call.call_id,
                    tenant="acme",
                    task_id=call.task_id,
                    title="x",
                    priority="high",
                    description="",
                    created_at=_now(),
                )
            )
            raise RuntimeError("the tool failed after writing")

    async def half_done(connection: EffectConnection) -> Completion:
        with pytest.raises(RuntimeError):
            await write_then_fail(connection)
        return Completion(CallStatus.FAILED, ToolResult(False, "failed"), [])

    assert await store.complete_with_effects(Claim(call.call_id, "owner", 1), half_done) is not None
    assert await store.query(sa.select(tickets.c.ticket_id)) == []
    failed = await store.get_call(call.call_id)
    assert failed is not None
    assert failed.status is CallStatus.FAILED


async def test_units_of_work_commit_together_and_a_failing_one_fails_alone(store: SqlApprovalStore) -> None:
    calls = [_call(CallStatus.READY) for _ in range(20)]

    def broken(ledger: Ledger) -> bool:
        raise ValueError("a bug in one unit")

    inserts = [_insert_returning(store, c) for c in calls]
    results = await asyncio.gather(*inserts[:10], store.transact(broken), *inserts[10:], return_exceptions=True)
    assert isinstance(results[10], ValueError)
    assert [r for n, r in enumerate(results) if n != 10] == [True] * 20
    for call in calls:
        assert await store.get_call(call.call_id) is not None


async def test_decisions_checked_together_each_see_their_own_approval_and_audit(store: SqlApprovalStore) -> None:
    pending = [await _pending(store) for _ in range(5)]
    audited = AuditEntry(77, "acme", "alice", "refused", _now(), approval_id=pending[0][1].approval_id)
    await store.transact(lambda ledger: ledger.add_audit(audited))
    keys = [(77, pending[0][1].approval_id)] + [(100 + n, a.approval_id) for n, (_, a) in enumerate(pending)]
    keys.append((200, "apr_unknown"))

    async def context(seq: int, approval_id: str) -> tuple[int | None, str | None, str | None]:
        entry, approval, call = await store.transact(
            lambda ledger: ledger.decision_context(seq, approval_id), decision=(seq, approval_id)
        )
        return (
            entry.message_seq if entry else None,
            approval.approval_id if approval else None,
            call.call_id if call else None,
        )

    seen = await asyncio.gather(*(context(seq, approval_id) for seq, approval_id in keys))
    assert seen[0] == (77, pending[0][1].approval_id, pending[0][0].call_id), "delivered before: its audit entry"
    assert seen[1:6] == [(None, a.approval_id, c.call_id) for c, a in pending]
    assert seen[6] == (None, None, None)


async def test_the_audit_keeps_one_row_per_decision_message(store: SqlApprovalStore) -> None:
    entry = AuditEntry(41, "acme", "mallory", "refused", _now(), approver="alice", reason_code="approver_mismatch")
    assert await store.transact(lambda ledger: ledger.add_audit(entry))
    assert not await store.transact(lambda ledger: ledger.add_audit(entry))
    long = AuditEntry(42, "acme", "bob", "refused", _now(), reason_code="malformed", payload="x" * 10_000)
    await store.transact(lambda ledger: ledger.add_audit(long))
    entries = await store.audit_entries()
    assert [(e.message_seq, e.reason_code) for e in entries] == [(41, "approver_mismatch"), (42, "malformed")]
    assert entries[1].payload is not None
    assert len(entries[1].payload) == 4096
    found = await store.transact(lambda ledger: ledger.audit_entry(41))
    assert found is not None
    assert (found.subject_approver, found.approver) == ("mallory", "alice")
    assert await store.transact(lambda ledger: ledger.audit_entry(43)) is None


async def test_overdue_approvals_are_due_and_the_outbox_is_marked(store: SqlApprovalStore) -> None:
    _, soon = await _pending(store, expires_in=0.01)
    await _pending(store, expires_in=3600)
    await asyncio.sleep(0.05)
    due = await store.transact(lambda ledger: ledger.due_for_expiry(_now()))
    assert [a.approval_id for a in due] == [soon.approval_id]
    messages = await store.transact(lambda ledger: ledger.unpublished())
    assert len(messages) == 2
    await store.transact(lambda ledger: ledger.mark_published([messages[0].message.msg_id], _now()))
    assert [m.id for m in await store.transact(lambda ledger: ledger.unpublished())] == [messages[1].id]
    past = messages[1].message
    assert await store.transact(lambda ledger: ledger.unpublished(created_before=_now() - timedelta(hours=1))) == []
    assert [m.message for m in await store.transact(lambda ledger: ledger.unpublished(created_before=_now()))] == [past]


async def test_a_withdrawal_that_arrives_first_holds_the_calls_id(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    withdrawal = Withdrawal(call.call_id, call.tenant, call.task_id, "task cancelled", _now())
    assert await store.transact(lambda ledger: ledger.insert_withdrawal(withdrawal))
    assert not await store.transact(lambda ledger: ledger.insert_withdrawal(withdrawal))
    assert await store.get_call(call.call_id) is None, "known only from its withdrawal"
    assert not await store.transact(lambda ledger: ledger.insert_call(call, None, []))
    found = await store.transact(lambda ledger: ledger.withdrawal(call.call_id))
    assert found is not None
    assert (found.reason, found.resolution_reason) == ("task cancelled", "task ended: task cancelled")
    result = ToolResult(False, "not run", "call_withdrawn")
    withdrawn = CallRecord(**{**call.__dict__, "status": CallStatus.WITHDRAWN, "result": result})
    assert await store.transact(lambda ledger: ledger.register_withdrawn(withdrawn, [_message(call, "result")]))
    stored = await store.get_call(call.call_id)
    assert stored is not None
    assert (stored.status, stored.tool, stored.result) == (CallStatus.WITHDRAWN, "run_shell", result)
    assert stored.withdrawn is not None
    assert await _claim(store, call.call_id, "owner", _now()) is None, "a withdrawn call never starts"
    assert await _to_resume(store, _now() + timedelta(days=1)) == []


async def test_a_ready_call_is_withdrawn_by_compare_and_set(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await _insert(store, call)
    result = ToolResult(False, "not run", "call_withdrawn")
    assert not await store.transact(lambda ledger: ledger.withdraw_call(call.call_id, CallStatus.RUNNING, result, []))
    assert await store.transact(lambda ledger: ledger.withdraw_call(call.call_id, CallStatus.READY, result, []))
    assert await _claim(store, call.call_id, "owner", _now()) is None


async def test_a_sqlite_database_locked_beyond_its_timeout_is_unavailable_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SqlApprovalStore(f"sqlite:///{path}", sqlite_busy_timeout_seconds=0.2)
    await store.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailableError, match="locked"):
            await store.transact(lambda ledger: ledger.count_pending())
        holder.execute("ROLLBACK")
        assert await store.transact(lambda ledger: ledger.count_pending()) == 0, "usable again once released"
    finally:
        holder.close()
        await store.close()
