"""The executor's Alembic migrations on real SQLite and Postgres: they build exactly the declared tables, and they
upgrade in place a database the executor created before it had migrations, keeping its rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import previous_schema
import pytest
import pytest_asyncio
import sqlalchemy as sa
from agentbus.tool_executor.adapters.schema import metadata
from agentbus.tool_executor.adapters.sql_store import SqlApprovalStore
from agentbus.tool_executor.domain import (
    ApprovalStatus,
    CallStatus,
    Withdrawal,
    approval_id_for,
)
from agentbus.tool_executor.ports import Resolution
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from store_support import DATABASE_KINDS, database

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
PENDING_CALL = "task-old.1.0"
FINISHED_CALL = "task-old.2.0"


@pytest_asyncio.fixture(params=DATABASE_KINDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database(request.param, tmp_path) as found:
        yield found


def _call_row(call_id: str, status: str, **changes: Any) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "tool_call_id": "call_1",
        "tenant": "acme",
        "task_id": call_id.split(".")[0],
        "agent": "ops",
        "tool": "run_shell",
        "step": 1,
        "arguments": {"command": "ls"},
        "submitted_by": "sam",
        "status": status,
        "approval_id": None,
        "traceparent": None,
        "attempts": 0,
        "result": None,
        "created_at": NOW,
        "updated_at": NOW,
        **changes,
    }


async def _create_previous_database(url: str) -> None:
    """The tables `create_all` made before migrations, with a pending approval, a finished call, an audit entry,
    an outbox message and a ticket in them."""
    old = previous_schema
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(old.metadata.create_all)
            approval_id = approval_id_for(PENDING_CALL)
            await conn.execute(
                old.calls.insert(),
                [
                    _call_row(PENDING_CALL, "awaiting_approval", approval_id=approval_id),
                    _call_row(
                        FINISHED_CALL,
                        "succeeded",
                        attempts=1,
                        result={"ok": True, "content": "done", "citations": []},
                    ),
                ],
            )
            await conn.execute(
                old.approvals.insert().values(
                    approval_id=approval_id,
                    call_id=PENDING_CALL,
                    tenant="acme",
                    task_id="task-old",
                    agent="ops",
                    tool="run_shell",
                    arguments={"command": "ls"},
                    arguments_sha256="0" * 64,
                    risk="high",
                    reason="always",
                    requested_by="sam",
                    requested_at=NOW,
                    expires_at=NOW + timedelta(days=365),
                    status="pending",
                )
            )
            await conn.execute(
                old.decision_audit.insert().values(
                    message_seq=7,
                    received_at=NOW,
                    tenant="acme",
                    subject_approver="mallory",
                    approver="alice",
                    approval_id=approval_id,
                    decision="approve",
                    outcome="refused",
                    reason_code="approver_mismatch",
                )
            )
            await conn.execute(
                old.outbox.insert().values(
                    call_id=PENDING_CALL,
                    subject="agentbus.tools.updates.acme",
                    msg_id=f"tool:{PENDING_CALL}:approval_pending",
                    payload="{}",
                    created_at=NOW,
                )
            )
            await conn.execute(
                old.tickets.insert().values(
                    ticket_id="TCK-OLD",
                    call_id=FINISHED_CALL,
                    tenant="acme",
                    task_id="task-old",
                    title="db down",
                    priority="high",
                    description="",
                    created_at=NOW,
                )
            )
    finally:
        await engine.dispose()


def _inspect(connection: sa.Connection) -> tuple[list[Any], str | None]:
    drift = list(compare_metadata(MigrationContext.configure(connection), metadata))
    return drift, MigrationContext.configure(connection).get_current_revision()


async def _schema_of(url: str) -> tuple[list[Any], str | None]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_inspect)
    finally:
        await engine.dispose()


async def test_the_migrations_build_exactly_the_declared_tables(url: str) -> None:
    store = SqlApprovalStore(url)
    await store.migrate()
    await store.migrate()
    await store.close()
    drift, revision = await _schema_of(url)
    assert drift == []
    assert revision == "0002"


async def test_a_database_from_before_migrations_is_upgraded_in_place_with_its_rows(url: str) -> None:
    await _create_previous_database(url)
    store = SqlApprovalStore(url)
    try:
        await store.migrate()
        pending = await store.get(approval_id_for(PENDING_CALL))
        assert pending is not None
        assert (pending.status, pending.requested_by, pending.expires_at) == (
            ApprovalStatus.PENDING,
            "sam",
            NOW + timedelta(days=365),
        )
        finished = await store.get_call(FINISHED_CALL)
        assert finished is not None
        assert (finished.status, finished.attempts, finished.withdrawn) == (CallStatus.SUCCEEDED, 1, None)
        assert finished.result is not None
        assert finished.result.content == "done"
        [audited] = await store.audit_entries()
        assert (audited.message_seq, audited.reason_code) == (7, "approver_mismatch")
        unpublished = await store.transact(lambda ledger: ledger.unpublished())
        assert [m.message.msg_id for m in unpublished] == [f"tool:{PENDING_CALL}:approval_pending"]
        assert [row.ticket_id for row in await store.query(sa.select(previous_schema.tickets.c.ticket_id))] == [
            "TCK-OLD"
        ]

        # What the new schema adds works on the old rows: a withdrawal of a call never seen, and one that ends
        # the old pending approval.
        unseen = Withdrawal("task-new.1.0", "acme", "task-new", "task cancelled", NOW)
        assert await store.transact(lambda ledger: ledger.insert_withdrawal(unseen))
        ended = Withdrawal(PENDING_CALL, "acme", "task-old", "task cancelled", NOW)
        await store.transact(lambda ledger: ledger.mark_withdrawn(ended))
        resolution = Resolution(
            approval_id=pending.approval_id,
            status=ApprovalStatus.EXPIRED,
            by=None,
            at=NOW,
            reason=ended.resolution_reason,
            decision_seq=None,
            call_status=CallStatus.WITHDRAWN,
            call_result=None,
            outbox=[],
        )
        assert await store.transact(lambda ledger: ledger.resolve_approval(resolution))
        withdrawn = await store.get_call(PENDING_CALL)
        assert withdrawn is not None
        assert withdrawn.status is CallStatus.WITHDRAWN
        assert withdrawn.withdrawn == ended
        expired = await store.get(pending.approval_id)
        assert expired is not None
        assert (expired.status, expired.decision_reason) == (ApprovalStatus.EXPIRED, "task ended: task cancelled")
        await store.migrate()
    finally:
        await store.close()
    drift, revision = await _schema_of(url)
    assert drift == []
    assert revision == "0002"
