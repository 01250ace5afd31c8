"""The SQL store against real SQLite and a real Postgres: compare-and-set state, the ledger, audit and outbox.

Postgres tests use a fresh database per run, dropped afterwards. Without a Postgres server they skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from agentbus.contracts.approvals import arguments_sha256
from agentbus.testing import skip_outside_ci
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore, tickets
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    approval_id_for,
)
from agentbus.tool_executor.ports import AuditEntry, Completion, OutgoingMessage, Resolution
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlApprovalStore]:
    if request.param == "sqlite":
        sql = SqlApprovalStore(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        await sql.create_tables()
        yield sql
        await sql.close()
        return
    database = f"executor_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        await admin.dispose()
        skip_outside_ci(f"postgres unavailable: {exc}")
    try:
        sql = SqlApprovalStore(f"{POSTGRES_URL.rsplit('/', 1)[0]}/{database}")
        await sql.create_tables()
        yield sql
        await sql.close()
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.dispose()


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
    assert await store.insert_call(call, approval, [_message(call, "approval_pending")])
    return call, approval


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
        audit=AuditEntry(seq, "acme", by, "accepted", _now(), approver=by, approval_id=approval.approval_id),
    )


async def test_a_call_is_inserted_once_with_its_approval_and_messages(store: SqlApprovalStore) -> None:
    call, approval = await _pending(store)
    assert not await store.insert_call(call, approval, [_message(call, "again")])
    stored = await store.get_call(call.call_id)
    assert stored is not None
    assert stored.status is CallStatus.AWAITING_APPROVAL
    assert stored.arguments == {"command": "ls", "note": "é"}
    read = await store.get(approval.approval_id)
    assert read is not None
    assert read.status is ApprovalStatus.PENDING
    assert read.expires_at == approval.expires_at.replace(microsecond=read.expires_at.microsecond)
    assert [m.message.msg_id for m in await store.unpublished(call.call_id)] == [
        f"tool:{call.call_id}:approval_pending"
    ]


async def test_pending_approvals_are_listed_per_tenant_or_all(store: SqlApprovalStore) -> None:
    acme_call, acme = await _pending(store)
    other = _call(tenant="globex")
    globex = _approval_for(other)
    await store.insert_call(other, globex, [])
    assert [a.approval_id for a in await store.list_pending("acme")] == [acme.approval_id]
    assert {a.approval_id for a in await store.list_pending()} == {acme.approval_id, globex.approval_id}
    assert await store.resolve_approval(_approve(acme, "alice", 1))
    assert [a.approval_id for a in await store.list_pending()] == [globex.approval_id]
    assert await store.count_pending() == 1
    assert await store.get("apr_unknown") is None
    assert acme_call.call_id


async def test_concurrent_decisions_exactly_one_wins(store: SqlApprovalStore) -> None:
    call, approval = await _pending(store)
    outcomes = await asyncio.gather(*(store.resolve_approval(_approve(approval, f"a{n}", n)) for n in range(10)))
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
    assert len(await store.unpublished(call.call_id)) == 2, "only the winner's messages were stored"


async def test_concurrent_claims_exactly_one_runs(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await store.insert_call(call, None, [])
    now = _now()
    claims = await asyncio.gather(
        *(store.claim(call.call_id, f"owner-{n}", now, now + timedelta(seconds=30)) for n in range(8))
    )
    assert sum(c is not None for c in claims) == 1
    running = await store.get_call(call.call_id)
    assert running is not None
    assert running.status is CallStatus.RUNNING
    assert running.attempts == 1


async def test_a_running_call_is_taken_over_only_after_its_lease_lapsed(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await store.insert_call(call, None, [])
    now = _now()
    assert await store.claim(call.call_id, "first", now, now + timedelta(seconds=30)) is not None
    assert await store.claim(call.call_id, "second", now + timedelta(seconds=10), now + timedelta(seconds=40)) is None
    assert [c.call_id for c in await store.calls_to_resume(now + timedelta(seconds=10))] == []
    later = now + timedelta(seconds=31)
    assert [c.call_id for c in await store.calls_to_resume(later)] == [call.call_id]
    before = await store.claim(call.call_id, "second", later, later + timedelta(seconds=30))
    assert before is not None
    assert (before.status, before.lease_owner) == (CallStatus.RUNNING, "first")
    assert not await store.renew_lease(call.call_id, "first", later + timedelta(seconds=60))
    assert await store.renew_lease(call.call_id, "second", later + timedelta(seconds=60))


async def test_a_completion_commits_its_effect_with_the_ledger_or_neither(store: SqlApprovalStore) -> None:
    call = _call(CallStatus.READY)
    await store.insert_call(call, None, [])
    now = _now()
    await store.claim(call.call_id, "owner", now, now + timedelta(seconds=30))

    async def open_ticket(connection: AsyncConnection) -> Completion:
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

    assert await store.complete(call.call_id, "intruder", open_ticket) is None
    async with store.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(tickets))).scalar_one() == 0
    completion = await store.complete(call.call_id, "owner", open_ticket)
    assert completion is not None
    done = await store.get_call(call.call_id)
    assert done is not None
    assert done.status is CallStatus.SUCCEEDED
    assert done.result == ToolResult(True, "done")
    async with store.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(tickets))).scalar_one() == 1

    async def record_only(_: AsyncConnection) -> Completion:
        return Completion(CallStatus.FAILED, ToolResult(False, "late"), [])

    assert await store.complete(call.call_id, "owner", record_only) is None, "a finished call completes once"


async def test_the_audit_keeps_one_row_per_decision_message(store: SqlApprovalStore) -> None:
    entry = AuditEntry(41, "acme", "mallory", "refused", _now(), approver="alice", reason_code="approver_mismatch")
    await store.audit(entry)
    await store.audit(entry)
    await store.audit(AuditEntry(42, "acme", "bob", "refused", _now(), reason_code="malformed", payload="x" * 10_000))
    entries = await store.audit_entries()
    assert [(e.message_seq, e.reason_code) for e in entries] == [(41, "approver_mismatch"), (42, "malformed")]
    assert entries[1].payload is not None
    assert len(entries[1].payload) == 4096


async def test_overdue_approvals_are_due_and_the_outbox_is_marked(store: SqlApprovalStore) -> None:
    _, soon = await _pending(store, expires_in=0.01)
    await _pending(store, expires_in=3600)
    await asyncio.sleep(0.05)
    assert [a.approval_id for a in await store.due_for_expiry(_now())] == [soon.approval_id]
    messages = await store.unpublished()
    assert len(messages) == 2
    await store.mark_published([messages[0].message.msg_id])
    assert [m.id for m in await store.unpublished()] == [messages[1].id]
