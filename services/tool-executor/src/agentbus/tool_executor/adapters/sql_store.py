"""The executor's SQL store (SQLAlchemy async Core): approvals, the execution ledger, the decision audit,
the outbox, and the tickets table of the `create_ticket` built-in. SQLite by default, Postgres in production.

Every state change is a compare-and-set (`UPDATE ... WHERE status = <expected>`) in one transaction with the
messages it must publish (the outbox), so two decisions can never both win and nothing is published about a
change that did not commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
)
from agentbus.tool_executor.ports import AuditEntry, Completion, OutgoingMessage, Resolution, StoredMessage
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MAX_AUDIT_PAYLOAD = 4096


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timestamps stored as naive UTC (comparable in SQL on every backend), read back timezone-aware."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

calls = sa.Table(
    "tool_calls",
    metadata,
    sa.Column("call_id", sa.String(160), primary_key=True),
    sa.Column("tool_call_id", sa.String(200), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("tool", sa.String(128), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("arguments", sa.JSON, nullable=False),
    sa.Column("submitted_by", sa.String(64)),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("approval_id", sa.String(64)),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", UtcDateTime),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("result", sa.JSON),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("approval_id", sa.String(64), primary_key=True),
    sa.Column("call_id", sa.String(160), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("tool", sa.String(128), nullable=False),
    sa.Column("arguments", sa.JSON, nullable=False),
    sa.Column("arguments_sha256", sa.String(64), nullable=False),
    sa.Column("risk", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("requested_by", sa.String(64)),
    sa.Column("requested_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("decided_by", sa.String(64)),
    sa.Column("decided_at", UtcDateTime),
    sa.Column("decision_reason", sa.Text),
    sa.Column("decision_seq", sa.BigInteger),
)

decision_audit = sa.Table(
    "approval_decision_audit",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("message_seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("received_at", UtcDateTime, nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("subject_approver", sa.String(64), nullable=False),
    sa.Column("approver", sa.String(64)),
    sa.Column("approval_id", sa.String(64), index=True),
    sa.Column("decision", sa.String(16)),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason_code", sa.String(32)),
    sa.Column("detail", sa.Text),
    sa.Column("payload", sa.Text),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("call_id", sa.String(160), nullable=False, index=True),
    sa.Column("subject", sa.String(255), nullable=False),
    sa.Column("msg_id", sa.String(255), nullable=False, unique=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("published_at", UtcDateTime, index=True),
)

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("ticket_id", sa.String(32), primary_key=True),
    sa.Column("call_id", sa.String(160), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)


class _NotOwnerError(Exception):
    """Rolls back a completion whose call is no longer this owner's."""


def _now() -> datetime:
    return datetime.now(UTC)


def _result_to_json(result: ToolResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "ok": result.ok,
        "content": result.content,
        "error_code": result.error_code,
        "error_message": result.error_message,
        "citations": list(result.citations),
    }


def _result_from_json(value: Any) -> ToolResult | None:
    if not value:
        return None
    data = json.loads(value) if isinstance(value, str) else value
    return ToolResult(
        ok=bool(data["ok"]),
        content=str(data["content"]),
        error_code=data.get("error_code"),
        error_message=data.get("error_message"),
        citations=tuple(data.get("citations") or ()),
    )


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _approval(row: sa.Row[Any]) -> ApprovalRecord:
    m = row._mapping
    return ApprovalRecord(
        approval_id=m["approval_id"],
        call_id=m["call_id"],
        tenant=m["tenant"],
        task_id=m["task_id"],
        agent=m["agent"],
        tool=m["tool"],
        arguments=_json_value(m["arguments"]),
        arguments_sha256=m["arguments_sha256"],
        risk=m["risk"],
        reason=m["reason"],
        requested_by=m["requested_by"],
        requested_at=m["requested_at"],
        expires_at=m["expires_at"],
        status=ApprovalStatus(m["status"]),
        decided_by=m["decided_by"],
        decided_at=m["decided_at"],
        decision_reason=m["decision_reason"],
        decision_seq=m["decision_seq"],
    )


def _call(row: sa.Row[Any]) -> CallRecord:
    m = row._mapping
    return CallRecord(
        call_id=m["call_id"],
        tool_call_id=m["tool_call_id"],
        tenant=m["tenant"],
        task_id=m["task_id"],
        agent=m["agent"],
        tool=m["tool"],
        step=m["step"],
        arguments=_json_value(m["arguments"]),
        submitted_by=m["submitted_by"],
        status=CallStatus(m["status"]),
        approval_id=m["approval_id"],
        traceparent=m["traceparent"],
        created_at=m["created_at"],
        lease_owner=m["lease_owner"],
        lease_until=m["lease_until"],
        attempts=m["attempts"],
        result=_result_from_json(m["result"]),
    )


class SqlApprovalStore:
    """The executor's store on any SQLAlchemy async URL (`sqlite+aiosqlite:///path`, `postgresql+asyncpg://...`).

    Public read API for other tools (the approvals CLI): `list_pending(tenant=None)` and `get(approval_id)`,
    returning `ApprovalRecord`s. Call `create_tables()` once (idempotent) and `close()` at the end.
    """

    def __init__(self, database_url: str, *, echo: bool = False) -> None:
        url = make_url(database_url)
        self._sqlite = url.get_backend_name() == "sqlite"
        if self._sqlite and url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine: AsyncEngine = create_async_engine(
            url, echo=echo, **({"connect_args": {"timeout": 30}} if self._sqlite else {"pool_pre_ping": True})
        )
        # One SQLite writer at a time in this process: waiting on a lock is cheaper than sqlite's busy polling.
        self._sqlite_lock = asyncio.Lock() if self._sqlite else None
        if self._sqlite:
            self._configure_sqlite()

    def _configure_sqlite(self) -> None:
        @sa.event.listens_for(self._engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers in other processes proceed during a write; BEGIN IMMEDIATE (below) takes the
            # write lock up front so two processes never deadlock upgrading read locks.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        @sa.event.listens_for(self._engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def create_tables(self) -> None:
        """Create every table that does not exist yet."""
        async with self._transaction() as conn:
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        if self._sqlite_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._sqlite_lock, self._engine.begin() as conn:
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        return (sqlite.insert if self._sqlite else postgresql.insert)(table)

    # --- reads -------------------------------------------------------------------------------------

    async def list_pending(self, tenant: str | None = None) -> list[ApprovalRecord]:
        query = sa.select(approvals).where(approvals.c.status == ApprovalStatus.PENDING.value)
        if tenant is not None:
            query = query.where(approvals.c.tenant == tenant)
        async with self._transaction() as conn:
            rows = (await conn.execute(query.order_by(approvals.c.requested_at, approvals.c.approval_id))).all()
        return [_approval(row) for row in rows]

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        async with self._transaction() as conn:
            row = (await conn.execute(sa.select(approvals).where(approvals.c.approval_id == approval_id))).first()
        return None if row is None else _approval(row)

    async def get_with_call(self, approval_id: str) -> tuple[ApprovalRecord | None, CallRecord | None]:
        """An approval and its call, read together."""
        async with self._transaction() as conn:
            row = (await conn.execute(sa.select(approvals).where(approvals.c.approval_id == approval_id))).first()
            if row is None:
                return None, None
            call = (await conn.execute(sa.select(calls).where(calls.c.call_id == row.call_id))).first()
        return _approval(row), None if call is None else _call(call)

    async def get_call(self, call_id: str) -> CallRecord | None:
        async with self._transaction() as conn:
            row = (await conn.execute(sa.select(calls).where(calls.c.call_id == call_id))).first()
        return None if row is None else _call(row)

    async def count_pending(self) -> int:
        query = sa.select(sa.func.count()).select_from(approvals).where(approvals.c.status == "pending")
        async with self._transaction() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def audit_entries(self, approval_id: str | None = None) -> list[AuditEntry]:
        """The decision audit, oldest first; of one approval, or all."""
        query = sa.select(decision_audit).order_by(decision_audit.c.id)
        if approval_id is not None:
            query = query.where(decision_audit.c.approval_id == approval_id)
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [AuditEntry(**{k: v for k, v in row._mapping.items() if k != "id"}) for row in rows]

    # --- writes ------------------------------------------------------------------------------------

    async def insert_call(
        self, call: CallRecord, approval: ApprovalRecord | None, outbox_messages: list[OutgoingMessage]
    ) -> bool:
        now = _now()
        async with self._transaction() as conn:
            inserted = await conn.execute(
                self._insert(calls)
                .values(
                    call_id=call.call_id,
                    tool_call_id=call.tool_call_id,
                    tenant=call.tenant,
                    task_id=call.task_id,
                    agent=call.agent,
                    tool=call.tool,
                    step=call.step,
                    arguments=call.arguments,
                    submitted_by=call.submitted_by,
                    status=call.status.value,
                    approval_id=call.approval_id,
                    traceparent=call.traceparent,
                    attempts=0,
                    result=_result_to_json(call.result),
                    created_at=call.created_at,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["call_id"])
            )
            if inserted.rowcount != 1:
                return False
            if approval is not None:
                await conn.execute(
                    approvals.insert().values(
                        approval_id=approval.approval_id,
                        call_id=approval.call_id,
                        tenant=approval.tenant,
                        task_id=approval.task_id,
                        agent=approval.agent,
                        tool=approval.tool,
                        arguments=approval.arguments,
                        arguments_sha256=approval.arguments_sha256,
                        risk=approval.risk,
                        reason=approval.reason,
                        requested_by=approval.requested_by,
                        requested_at=approval.requested_at,
                        expires_at=approval.expires_at,
                        status=approval.status.value,
                    )
                )
            await self._add_outbox(conn, call.call_id, outbox_messages, now)
        return True

    async def resolve_approval(self, resolution: Resolution) -> bool:
        async with self._transaction() as conn:
            changed = await conn.execute(
                approvals.update()
                .where(
                    approvals.c.approval_id == resolution.approval_id,
                    approvals.c.status == ApprovalStatus.PENDING.value,
                )
                .values(
                    status=resolution.status.value,
                    decided_by=resolution.by,
                    decided_at=resolution.at,
                    decision_reason=resolution.reason,
                    decision_seq=resolution.decision_seq,
                )
                .returning(approvals.c.call_id)
            )
            call_id = changed.scalar_one_or_none()
            if call_id is None:
                return False
            await conn.execute(
                calls.update()
                .where(calls.c.call_id == call_id, calls.c.status == CallStatus.AWAITING_APPROVAL.value)
                .values(
                    status=resolution.call_status.value,
                    result=_result_to_json(resolution.call_result),
                    updated_at=resolution.at,
                )
            )
            if resolution.audit is not None:
                await self._add_audit(conn, resolution.audit)
            await self._add_outbox(conn, call_id, resolution.outbox, resolution.at)
        return True

    async def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        async with self._transaction() as conn:
            row = (await conn.execute(sa.select(calls).where(calls.c.call_id == call_id))).first()
            if row is None:
                return None
            before = _call(row)
            takeable = before.status is CallStatus.READY or (
                before.status is CallStatus.RUNNING and before.lease_until is not None and before.lease_until <= now
            )
            if not takeable:
                return None
            changed = await conn.execute(
                calls.update()
                .where(
                    calls.c.call_id == call_id,
                    calls.c.status == before.status.value,
                    # The owner and lease it had, so a concurrent claim of the same row cannot also win.
                    calls.c.lease_owner.is_(None)
                    if before.lease_owner is None
                    else calls.c.lease_owner == before.lease_owner,
                    calls.c.attempts == before.attempts,
                )
                .values(
                    status=CallStatus.RUNNING.value,
                    lease_owner=owner,
                    lease_until=lease_until,
                    attempts=before.attempts + 1,
                    updated_at=now,
                )
            )
            return before if changed.rowcount == 1 else None

    async def renew_lease(self, call_id: str, owner: str, lease_until: datetime) -> bool:
        async with self._transaction() as conn:
            changed = await conn.execute(
                calls.update()
                .where(
                    calls.c.call_id == call_id,
                    calls.c.status == CallStatus.RUNNING.value,
                    calls.c.lease_owner == owner,
                )
                .values(lease_until=lease_until)
            )
        return changed.rowcount == 1

    async def complete(
        self,
        call_id: str,
        owner: str,
        work: Callable[[AsyncConnection], Awaitable[Completion]],
    ) -> Completion | None:
        try:
            async with self._transaction() as conn:
                completion = await work(conn)
                now = _now()
                changed = await conn.execute(
                    calls.update()
                    .where(
                        calls.c.call_id == call_id,
                        calls.c.status == CallStatus.RUNNING.value,
                        calls.c.lease_owner == owner,
                    )
                    .values(
                        status=completion.status.value,
                        result=_result_to_json(completion.result),
                        lease_owner=None,
                        lease_until=None,
                        updated_at=now,
                    )
                )
                if changed.rowcount != 1:
                    raise _NotOwnerError
                await self._add_outbox(conn, call_id, completion.outbox, now)
        except _NotOwnerError:
            return None
        return completion

    async def audit(self, entry: AuditEntry) -> None:
        async with self._transaction() as conn:
            await self._add_audit(conn, entry)

    async def unpublished(self, call_id: str | None = None, limit: int = 500) -> list[StoredMessage]:
        query = sa.select(outbox).where(outbox.c.published_at.is_(None))
        if call_id is not None:
            query = query.where(outbox.c.call_id == call_id)
        async with self._transaction() as conn:
            rows = (await conn.execute(query.order_by(outbox.c.id).limit(limit))).all()
        return [
            StoredMessage(
                id=row.id,
                call_id=row.call_id,
                message=OutgoingMessage(row.subject, row.msg_id, row.payload, row.traceparent),
            )
            for row in rows
        ]

    async def mark_published(self, msg_ids: list[str]) -> None:
        if not msg_ids:
            return
        async with self._transaction() as conn:
            await conn.execute(
                outbox.update()
                .where(outbox.c.msg_id.in_(msg_ids), outbox.c.published_at.is_(None))
                .values(published_at=_now())
            )

    async def due_for_expiry(self, now: datetime, limit: int = 500) -> list[ApprovalRecord]:
        query = (
            sa.select(approvals)
            .where(approvals.c.status == ApprovalStatus.PENDING.value, approvals.c.expires_at <= now)
            .order_by(approvals.c.expires_at)
            .limit(limit)
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [_approval(row) for row in rows]

    async def calls_to_resume(self, now: datetime, limit: int = 500) -> list[CallRecord]:
        query = (
            sa.select(calls)
            .where(
                sa.or_(
                    calls.c.status == CallStatus.READY.value,
                    sa.and_(calls.c.status == CallStatus.RUNNING.value, calls.c.lease_until <= now),
                )
            )
            .order_by(calls.c.created_at)
            .limit(limit)
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [_call(row) for row in rows]

    async def _add_outbox(
        self, conn: AsyncConnection, call_id: str, messages: list[OutgoingMessage], now: datetime
    ) -> None:
        if messages:
            await conn.execute(
                outbox.insert(),
                [
                    {
                        "call_id": call_id,
                        "subject": m.subject,
                        "msg_id": m.msg_id,
                        "payload": m.payload,
                        "traceparent": m.traceparent,
                        "created_at": now,
                    }
                    for m in messages
                ],
            )

    async def _add_audit(self, conn: AsyncConnection, entry: AuditEntry) -> None:
        payload = entry.payload[:MAX_AUDIT_PAYLOAD] if entry.payload is not None else None
        await conn.execute(
            self._insert(decision_audit)
            .values(
                message_seq=entry.message_seq,
                received_at=entry.received_at,
                tenant=entry.tenant,
                subject_approver=entry.subject_approver,
                approver=entry.approver,
                approval_id=entry.approval_id,
                decision=entry.decision,
                outcome=entry.outcome,
                reason_code=entry.reason_code,
                detail=entry.detail,
                payload=payload,
            )
            .on_conflict_do_nothing(index_elements=["message_seq"])
        )
