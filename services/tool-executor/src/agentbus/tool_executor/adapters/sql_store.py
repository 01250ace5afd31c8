"""The executor's SQL store: approvals, the execution ledger, the decision audit, the outbox and the tickets of
the `create_ticket` built-in. SQLite by default, Postgres (asyncpg) in production; Alembic migrations.

One writer connection per store, group commit
---------------------------------------------
Every read and write is a unit of work (a function of a `Ledger`) handed to one writer, which owns the
store's only connection. The writer takes every unit queued while its previous transaction committed and
runs them together in one transaction: many decisions, claims and completions share one commit (one fsync)
instead of paying one each. A unit's result is returned only after its transaction committed, so nothing is
published about a change that might still be lost. If a batch fails, it is rolled back and each of its units
runs again in a transaction of its own, so one bad unit fails alone. On SQLite the whole batch runs in the
writer's own thread (one hop from the event loop per batch, not per statement); on Postgres it runs on one
asyncpg connection.

Every state change is a compare-and-set (`UPDATE ... WHERE status = <expected>`), so two decisions can never
both win, even between executors sharing a database, and the statements of the hot paths are Core
statements built once per store (their compiled form is cached), not the ORM.

A database that cannot be reached raises `StoreUnavailableError`: the message being handled waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from agentbus.runtime.logging import get_logger
from agentbus.tool_executor.adapters.schema import approvals, calls, decision_audit, metadata, outbox
from agentbus.tool_executor.domain import (
    ApprovalRecord,
    ApprovalStatus,
    CallRecord,
    CallStatus,
    ToolResult,
    Withdrawal,
)
from agentbus.tool_executor.ports import (
    AuditEntry,
    Claim,
    Completion,
    EffectConnection,
    EffectResult,
    Ledger,
    OutgoingMessage,
    Resolution,
    StoredMessage,
    StoreUnavailableError,
)
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_log = get_logger(__name__)

T = TypeVar("T")

MAX_AUDIT_PAYLOAD = 4096
MAX_BATCH_UNITS = 256
MIGRATIONS = "agentbus.tool_executor:migrations"
BASELINE_REVISION = "0001"
"""The schema as `metadata.create_all` made it before migrations existed: such a database is stamped with it."""
# Any constant works: it only has to be the same for every replica running migrations at start-up.
MIGRATION_LOCK_KEY = 0x746F6F6C
_RETRIES_PER_UNIT = 3
_POSTGRES_CONNECT_TIMEOUT_SECONDS = 10.0
# Postgres: connection exception, insufficient resources, operator intervention (shutdown, cannot connect now),
# a database that does not accept connections.
_OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "53", "57"})
_OUTAGE_SQLSTATES = frozenset({"55000", "3D000"})
# Postgres: deadlock, serialization failure: the unit runs again.
_CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})
_SQLITE_OUTAGE_MESSAGES = ("locked", "busy", "disk i/o", "unable to open", "disk is full", "readonly")


def _sqlstate(error: BaseException | None) -> str | None:
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return state if isinstance(state, str) else None


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the database cannot be used right now (rather than that a statement is wrong)."""
    if isinstance(error, StoreUnavailableError | OSError | ConnectionError | TimeoutError):
        return True
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        original = error.orig
        if isinstance(original, sqlite3.OperationalError):
            text = str(original).lower()
            return any(marker in text for marker in _SQLITE_OUTAGE_MESSAGES)
        state = _sqlstate(original)
        if state is not None:
            return state[:2] in _OUTAGE_SQLSTATE_CLASSES or state in _OUTAGE_SQLSTATES
        # asyncpg reports a closed or broken connection without a SQLSTATE.
        return isinstance(error, sa.exc.InterfaceError | sa.exc.OperationalError)
    return False


def _is_conflict(error: BaseException) -> bool:
    return isinstance(error, sa.exc.DBAPIError) and _sqlstate(error.orig) in _CONFLICT_SQLSTATES


def _unavailable(error: BaseException) -> StoreUnavailableError:
    if isinstance(error, StoreUnavailableError):
        return error
    # The driver's own message: the statement and its parameters (call arguments) stay out of the logs.
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error
    return StoreUnavailableError(f"the executor's database is unavailable: {type(cause).__name__}: {cause}")


# --- rows and records ------------------------------------------------------------------------------------


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


def _result_from_json(data: Any) -> ToolResult | None:
    if not data:
        return None
    return ToolResult(
        ok=bool(data["ok"]),
        content=str(data["content"]),
        error_code=data.get("error_code"),
        error_message=data.get("error_message"),
        citations=tuple(data.get("citations") or ()),
    )


def _approval(row: sa.Row[Any]) -> ApprovalRecord:
    m = row._mapping
    return ApprovalRecord(
        approval_id=m["approval_id"],
        call_id=m["call_id"],
        tenant=m["tenant"],
        task_id=m["task_id"],
        agent=m["agent"],
        tool=m["tool"],
        arguments=m["arguments"],
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


def _withdrawal(row: sa.Row[Any]) -> Withdrawal | None:
    m = row._mapping
    if m["withdrawn_at"] is None:
        return None
    return Withdrawal(m["call_id"], m["tenant"], m["task_id"], m["withdrawn_reason"] or "", m["withdrawn_at"])


def _call(row: sa.Row[Any]) -> CallRecord | None:
    m = row._mapping
    if m["tool"] is None:
        return None  # known only from its withdrawal
    return CallRecord(
        call_id=m["call_id"],
        tool_call_id=m["tool_call_id"],
        tenant=m["tenant"],
        task_id=m["task_id"],
        agent=m["agent"],
        tool=m["tool"],
        step=m["step"],
        arguments=m["arguments"],
        submitted_by=m["submitted_by"],
        status=CallStatus(m["status"]),
        approval_id=m["approval_id"],
        traceparent=m["traceparent"],
        created_at=m["created_at"],
        lease_owner=m["lease_owner"],
        lease_until=m["lease_until"],
        attempts=m["attempts"],
        result=_result_from_json(m["result"]),
        withdrawn=_withdrawal(row),
    )


def _audit(row: sa.Row[Any]) -> AuditEntry:
    return AuditEntry(**{k: v for k, v in row._mapping.items() if k != "id"})


def _call_values(call: CallRecord, now: datetime) -> dict[str, Any]:
    return {
        "call_id": call.call_id,
        "tool_call_id": call.tool_call_id,
        "tenant": call.tenant,
        "task_id": call.task_id,
        "agent": call.agent,
        "tool": call.tool,
        "step": call.step,
        "arguments": call.arguments,
        "submitted_by": call.submitted_by,
        "status": call.status.value,
        "approval_id": call.approval_id,
        "traceparent": call.traceparent,
        "attempts": 0,
        "result": _result_to_json(call.result),
        "created_at": call.created_at,
        "updated_at": now,
    }


# --- the statements --------------------------------------------------------------------------------------


def _where_call(*conditions: sa.ColumnElement[bool]) -> list[sa.ColumnElement[bool]]:
    # Bound parameters in WHERE clauses of UPDATEs are named b_*: the column names are the SET parameters.
    return [calls.c.call_id == sa.bindparam("b_call_id"), *conditions]


class _Statements:
    """Every statement the store runs, built once for its dialect."""

    def __init__(self, dialect: Dialect) -> None:
        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        c, a, d, o = calls.c, approvals.c, decision_audit.c, outbox.c
        running = CallStatus.RUNNING.value
        self.call = sa.select(calls).where(c.call_id == sa.bindparam("call_id"))
        self.approval = sa.select(approvals).where(a.approval_id == sa.bindparam("approval_id"))
        self.audit_entry = sa.select(decision_audit).where(d.message_seq == sa.bindparam("message_seq"))
        self.insert_call = insert(calls).on_conflict_do_nothing(index_elements=["call_id"])
        self.insert_approval = approvals.insert()
        self.insert_withdrawal = insert(calls).on_conflict_do_nothing(index_elements=["call_id"])
        self.register_withdrawn = calls.update().where(
            *_where_call(c.status == CallStatus.WITHDRAWN.value, c.tool.is_(None))
        )
        self.mark_withdrawn = calls.update().where(*_where_call(c.withdrawn_at.is_(None)))
        self.withdraw_call = calls.update().where(*_where_call(c.status == sa.bindparam("b_expected")))
        self.resolve_approval = (
            approvals.update()
            .where(
                a.approval_id == sa.bindparam("b_approval_id"),
                a.status == ApprovalStatus.PENDING.value,
            )
            .returning(a.call_id)
        )
        self.resolve_call = calls.update().where(*_where_call(c.status == CallStatus.AWAITING_APPROVAL.value))
        self.insert_audit = insert(decision_audit).on_conflict_do_nothing(index_elements=["message_seq"])
        # One statement takes the call: concurrent claims (other executors) re-check the row and find it taken.
        self.claim = (
            calls.update()
            .where(
                *_where_call(
                    c.tool.is_not(None),
                    sa.or_(
                        c.status == CallStatus.READY.value,
                        sa.and_(c.status == running, c.lease_until <= sa.bindparam("b_now")),
                    ),
                )
            )
            .values(
                status=running,
                lease_owner=sa.bindparam("b_owner"),
                lease_until=sa.bindparam("b_lease_until"),
                attempts=c.attempts + 1,
                updated_at=sa.bindparam("b_now"),
            )
            .returning(*calls.c)
        )
        held = _where_call(
            c.status == running, c.lease_owner == sa.bindparam("b_owner"), c.attempts == sa.bindparam("b_attempt")
        )
        self.renew_lease = calls.update().where(*held)
        self.finish = calls.update().where(*held)
        self.insert_outbox = outbox.insert()
        unpublished = sa.select(outbox).where(o.published_at.is_(None))
        self.unpublished = {
            (by_call, by_age): unpublished.where(
                *([o.call_id == sa.bindparam("call_id")] if by_call else []),
                *([o.created_at <= sa.bindparam("created_before")] if by_age else []),
            )
            .order_by(o.id)
            .limit(sa.bindparam("limit"))
            for by_call in (False, True)
            for by_age in (False, True)
        }
        self.mark_published = (
            outbox.update()
            .where(o.msg_id.in_(sa.bindparam("msg_ids", expanding=True)), o.published_at.is_(None))
            .values(published_at=sa.bindparam("at"))
        )
        self.due_for_expiry = (
            sa.select(approvals)
            .where(a.status == ApprovalStatus.PENDING.value, a.expires_at <= sa.bindparam("now"))
            .order_by(a.expires_at)
            .limit(sa.bindparam("limit"))
        )
        self.calls_to_resume = (
            sa.select(calls)
            .where(
                c.tool.is_not(None),
                sa.or_(
                    sa.and_(c.status == CallStatus.READY.value, c.updated_at <= sa.bindparam("ready_before")),
                    sa.and_(c.status == running, c.lease_until <= sa.bindparam("now")),
                ),
            )
            .order_by(c.created_at)
            .limit(sa.bindparam("limit"))
        )
        self.count_pending = (
            sa.select(sa.func.count()).select_from(approvals).where(a.status == ApprovalStatus.PENDING.value)
        )
        listed = sa.select(approvals).where(a.tenant == sa.bindparam("tenant"))
        order = (a.requested_at, a.approval_id)
        self.approvals_pending = (
            listed.where(a.status == ApprovalStatus.PENDING.value).order_by(*order).limit(sa.bindparam("limit"))
        )
        self.approvals_all = listed.order_by(*order).limit(sa.bindparam("limit"))
        self.approval_of_tenant = listed.where(a.approval_id == sa.bindparam("approval_id"))
        self.audit_all = sa.select(decision_audit).order_by(d.id)
        self.audit_of_approval = self.audit_all.where(d.approval_id == sa.bindparam("approval_id"))


class SqlLedger:
    """The `Ledger` on one connection inside the writer's transaction."""

    def __init__(self, connection: sa.Connection, statements: _Statements) -> None:
        self._conn = connection
        self._s = statements

    def _first(self, statement: sa.Executable, **params: Any) -> sa.Row[Any] | None:
        return self._conn.execute(statement, params).first()

    def _all(self, statement: sa.Executable, **params: Any) -> list[sa.Row[Any]]:
        return list(self._conn.execute(statement, params).all())

    def _changed(self, statement: sa.Executable, params: dict[str, Any]) -> bool:
        return self._conn.execute(statement, params).rowcount == 1

    def call(self, call_id: str) -> CallRecord | None:
        row = self._first(self._s.call, call_id=call_id)
        return None if row is None else _call(row)

    def withdrawal(self, call_id: str) -> Withdrawal | None:
        row = self._first(self._s.call, call_id=call_id)
        return None if row is None else _withdrawal(row)

    def approval(self, approval_id: str) -> ApprovalRecord | None:
        row = self._first(self._s.approval, approval_id=approval_id)
        return None if row is None else _approval(row)

    def audit_entry(self, message_seq: int) -> AuditEntry | None:
        row = self._first(self._s.audit_entry, message_seq=message_seq)
        return None if row is None else _audit(row)

    def insert_call(self, call: CallRecord, approval: ApprovalRecord | None, messages: list[OutgoingMessage]) -> bool:
        now = datetime.now(UTC)
        if not self._changed(self._s.insert_call, _call_values(call, now)):
            return False
        if approval is not None:
            self._conn.execute(
                self._s.insert_approval,
                {
                    "approval_id": approval.approval_id,
                    "call_id": approval.call_id,
                    "tenant": approval.tenant,
                    "task_id": approval.task_id,
                    "agent": approval.agent,
                    "tool": approval.tool,
                    "arguments": approval.arguments,
                    "arguments_sha256": approval.arguments_sha256,
                    "risk": approval.risk,
                    "reason": approval.reason,
                    "requested_by": approval.requested_by,
                    "requested_at": approval.requested_at,
                    "expires_at": approval.expires_at,
                    "status": approval.status.value,
                },
            )
        self._add_outbox(call.call_id, messages, now)
        return True

    def register_withdrawn(self, call: CallRecord, messages: list[OutgoingMessage]) -> bool:
        now = datetime.now(UTC)
        values = _call_values(call, now)
        values["b_call_id"] = values.pop("call_id")
        for kept in ("tenant", "task_id", "created_at", "attempts"):
            values.pop(kept)
        if not self._changed(self._s.register_withdrawn, values):
            return False
        self._add_outbox(call.call_id, messages, now)
        return True

    def insert_withdrawal(self, withdrawal: Withdrawal) -> bool:
        return self._changed(
            self._s.insert_withdrawal,
            {
                "call_id": withdrawal.call_id,
                "tenant": withdrawal.tenant,
                "task_id": withdrawal.task_id,
                "status": CallStatus.WITHDRAWN.value,
                "attempts": 0,
                "created_at": withdrawal.at,
                "updated_at": withdrawal.at,
                "withdrawn_at": withdrawal.at,
                "withdrawn_reason": withdrawal.reason,
            },
        )

    def mark_withdrawn(self, withdrawal: Withdrawal) -> None:
        self._conn.execute(
            self._s.mark_withdrawn,
            {
                "b_call_id": withdrawal.call_id,
                "withdrawn_at": withdrawal.at,
                "withdrawn_reason": withdrawal.reason,
            },
        )

    def withdraw_call(
        self, call_id: str, expected: CallStatus, result: ToolResult, messages: list[OutgoingMessage]
    ) -> bool:
        now = datetime.now(UTC)
        changed = self._changed(
            self._s.withdraw_call,
            {
                "b_call_id": call_id,
                "b_expected": expected.value,
                "status": CallStatus.WITHDRAWN.value,
                "result": _result_to_json(result),
                "updated_at": now,
            },
        )
        if changed:
            self._add_outbox(call_id, messages, now)
        return changed

    def resolve_approval(self, resolution: Resolution) -> bool:
        call_id = self._conn.execute(
            self._s.resolve_approval,
            {
                "b_approval_id": resolution.approval_id,
                "status": resolution.status.value,
                "decided_by": resolution.by,
                "decided_at": resolution.at,
                "decision_reason": resolution.reason,
                "decision_seq": resolution.decision_seq,
            },
        ).scalar_one_or_none()
        if call_id is None:
            return False
        self._conn.execute(
            self._s.resolve_call,
            {
                "b_call_id": call_id,
                "status": resolution.call_status.value,
                "result": _result_to_json(resolution.call_result),
                "updated_at": resolution.at,
            },
        )
        self._add_outbox(call_id, resolution.outbox, resolution.at)
        return True

    def add_audit(self, entry: AuditEntry) -> bool:
        payload = entry.payload[:MAX_AUDIT_PAYLOAD] if entry.payload is not None else None
        return self._changed(
            self._s.insert_audit,
            {
                "message_seq": entry.message_seq,
                "received_at": entry.received_at,
                "tenant": entry.tenant,
                "subject_approver": entry.subject_approver,
                "approver": entry.approver,
                "approval_id": entry.approval_id,
                "decision": entry.decision,
                "outcome": entry.outcome,
                "reason_code": entry.reason_code,
                "detail": entry.detail,
                "payload": payload,
            },
        )

    def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        row = self._first(self._s.claim, b_call_id=call_id, b_owner=owner, b_now=now, b_lease_until=lease_until)
        return None if row is None else _call(row)

    def renew_lease(self, claim: Claim, lease_until: datetime) -> bool:
        return self._changed(
            self._s.renew_lease,
            {
                "b_call_id": claim.call_id,
                "b_owner": claim.owner,
                "b_attempt": claim.attempt,
                "lease_until": lease_until,
            },
        )

    def finish(self, claim: Claim, completion: Completion) -> bool:
        now = datetime.now(UTC)
        changed = self._changed(
            self._s.finish,
            {
                "b_call_id": claim.call_id,
                "b_owner": claim.owner,
                "b_attempt": claim.attempt,
                "status": completion.status.value,
                "result": _result_to_json(completion.result),
                "lease_owner": None,
                "lease_until": None,
                "updated_at": now,
            },
        )
        if changed:
            self._add_outbox(claim.call_id, completion.outbox, now)
        return changed

    def unpublished(
        self, call_id: str | None = None, *, created_before: datetime | None = None, limit: int = 500
    ) -> list[StoredMessage]:
        statement = self._s.unpublished[(call_id is not None, created_before is not None)]
        params: dict[str, Any] = {"limit": limit}
        if call_id is not None:
            params["call_id"] = call_id
        if created_before is not None:
            params["created_before"] = created_before
        return [
            StoredMessage(row.id, row.call_id, OutgoingMessage(row.subject, row.msg_id, row.payload, row.traceparent))
            for row in self._all(statement, **params)
        ]

    def mark_published(self, msg_ids: list[str], at: datetime) -> None:
        if msg_ids:
            self._conn.execute(self._s.mark_published, {"msg_ids": msg_ids, "at": at})

    def due_for_expiry(self, now: datetime, limit: int = 500) -> list[ApprovalRecord]:
        return [_approval(row) for row in self._all(self._s.due_for_expiry, now=now, limit=limit)]

    def calls_to_resume(self, now: datetime, *, ready_before: datetime, limit: int = 500) -> list[CallRecord]:
        rows = self._all(self._s.calls_to_resume, now=now, ready_before=ready_before, limit=limit)
        found = (_call(row) for row in rows)
        return [call for call in found if call is not None]

    def count_pending(self) -> int:
        return int(self._conn.execute(self._s.count_pending).scalar_one())

    def approvals(
        self, tenant: str, *, include_resolved: bool, approval_id: str | None = None, limit: int = 500
    ) -> list[ApprovalRecord]:
        if approval_id is not None:
            rows = self._all(self._s.approval_of_tenant, tenant=tenant, approval_id=approval_id)
        elif include_resolved:
            rows = self._all(self._s.approvals_all, tenant=tenant, limit=limit)
        else:
            rows = self._all(self._s.approvals_pending, tenant=tenant, limit=limit)
        return [_approval(row) for row in rows]

    def audit_entries(self, approval_id: str | None = None) -> list[AuditEntry]:
        if approval_id is None:
            return [_audit(row) for row in self._all(self._s.audit_all)]
        return [_audit(row) for row in self._all(self._s.audit_of_approval, approval_id=approval_id)]

    def _add_outbox(self, call_id: str, messages: list[OutgoingMessage], now: datetime) -> None:
        if messages:
            self._conn.execute(
                self._s.insert_outbox,
                [
                    {
                        "call_id": call_id,
                        "subject": m.subject,
                        "msg_id": m.msg_id,
                        "payload": m.payload,
                        "traceparent": m.traceparent,
                        "created_at": now,
                        "published_at": None,
                    }
                    for m in messages
                ],
            )


# --- the writer ------------------------------------------------------------------------------------------

Unit = Callable[[sa.Connection], Any]
"""A unit of work as the writer sees it: a function of the open connection."""


class _RollbackError(Exception):
    """Ends an exclusive transaction without committing it."""


@dataclass
class _Job(Generic[T]):
    future: asyncio.Future[T]
    unit: Unit | None = None
    exclusive: Callable[[_Transaction], Awaitable[T]] | None = None


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None


class _Transaction:
    """An exclusive transaction of the writer: statements from async code, and units of work, on its connection."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend

    async def run(self, unit: Unit) -> Any:
        return await self._backend.in_transaction(unit)

    async def execute(self, statement: sa.Executable) -> EffectResult:
        def execute(connection: sa.Connection) -> EffectResult:
            result = connection.execute(statement)
            rows = list(result.all()) if result.returns_rows else []
            return EffectResult(result.rowcount, rows)

        result: EffectResult = await self.run(execute)
        return result

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        nested: list[sa.NestedTransaction] = []
        await self.run(lambda connection: nested.append(connection.begin_nested()))
        try:
            yield
        except BaseException:
            await self.run(lambda _: nested[0].rollback())
            raise
        await self.run(lambda _: nested[0].commit())


class _Backend:
    """What runs units on the store's one connection: a transaction of many, or one held open across awaits."""

    dialect: Dialect

    async def run_batch(self, units: list[Unit]) -> list[_Outcome]:
        raise NotImplementedError

    async def run_exclusive(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def in_transaction(self, unit: Unit) -> Any:
        """Inside `run_exclusive` only: run one unit in its open transaction."""
        raise NotImplementedError

    async def migrate(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _run_units(connection: sa.Connection, units: list[Unit]) -> list[_Outcome]:
    """Run the units in one transaction; if that fails (and not for an outage), each again in its own."""
    try:
        with connection.begin():
            values = [unit(connection) for unit in units]
        return [_Outcome(value) for value in values]
    except Exception as error:
        if is_outage(error):
            raise
        failed = error
    if len(units) == 1 and not _is_conflict(failed):
        return [_Outcome(error=failed)]
    return [_run_alone(connection, unit) for unit in units]


def _run_alone(connection: sa.Connection, unit: Unit) -> _Outcome:
    for attempt in range(_RETRIES_PER_UNIT):
        try:
            with connection.begin():
                return _Outcome(unit(connection))
        except Exception as error:
            if is_outage(error):
                raise
            if not _is_conflict(error) or attempt + 1 == _RETRIES_PER_UNIT:
                return _Outcome(error=error)
    raise AssertionError("unreachable")


def _prepare_sqlite(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, begin transactions, so BEGIN IMMEDIATE can take the write lock up front:
        # two processes then never deadlock upgrading read locks. WAL lets readers in other processes proceed
        # during a write; FULL makes every commit durable before the writer reports it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class _SqliteBackend(_Backend):
    """The connection lives in a thread of its own; a whole batch runs there in one hop from the event loop."""

    def __init__(self, url: URL, busy_timeout_seconds: float) -> None:
        database = url.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = sa.create_engine(
            url.set(drivername="sqlite"), connect_args={"timeout": busy_timeout_seconds}, poolclass=sa.pool.NullPool
        )
        _prepare_sqlite(self._engine)
        self.dialect = self._engine.dialect
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-sqlite")
        self._connection: sa.Connection | None = None

    def _connected(self) -> sa.Connection:
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    async def _in_thread(self, work: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return work()
            except Exception as error:
                if is_outage(error):
                    self._drop()
                    raise _unavailable(error) from error
                raise

        return await asyncio.get_running_loop().run_in_executor(self._thread, guarded)

    async def run_batch(self, units: list[Unit]) -> list[_Outcome]:
        return await self._in_thread(lambda: _run_units(self._connected(), units))

    async def in_transaction(self, unit: Unit) -> Any:
        return await self._in_thread(lambda: unit(self._connected()))

    async def run_exclusive(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        transaction: list[sa.Transaction] = []
        await self._in_thread(lambda: transaction.append(self._connected().begin()))
        try:
            value = await work(_Transaction(self))
        except BaseException:
            with contextlib.suppress(Exception):
                await self._in_thread(transaction[0].rollback)
            raise
        await self._in_thread(transaction[0].commit)
        return value

    async def migrate(self) -> None:
        def upgrade() -> None:
            connection = self._connected()
            with connection.begin():
                _upgrade(connection)

        await self._in_thread(upgrade)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)
        self._thread.shutdown(wait=True)
        self._engine.dispose()


class _PostgresBackend(_Backend):
    """One asyncpg connection; a batch runs on it in one greenlet (`run_sync`), statement after statement."""

    def __init__(self, url: URL) -> None:
        self._engine: AsyncEngine = create_async_engine(
            url,
            pool_size=1,
            max_overflow=0,
            connect_args={"timeout": _POSTGRES_CONNECT_TIMEOUT_SECONDS},
        )
        self.dialect = self._engine.dialect
        self._connection: AsyncConnection | None = None

    async def _connected(self) -> AsyncConnection:
        if self._connection is None:
            try:
                self._connection = await self._engine.connect()
            except Exception as error:
                # Whatever stops a connection from opening is the database not being there.
                raise _unavailable(error) from error
        return self._connection

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _guarded(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        connection = await self._connected()
        try:
            return await work(connection)
        except Exception as error:
            if is_outage(error):
                await self._drop()
                raise _unavailable(error) from error
            if connection.invalidated or connection.closed:
                await self._drop()
            raise

    async def run_batch(self, units: list[Unit]) -> list[_Outcome]:
        return await self._guarded(lambda connection: connection.run_sync(_run_units, units))

    async def in_transaction(self, unit: Unit) -> Any:
        return await self._guarded(lambda connection: connection.run_sync(unit))

    async def run_exclusive(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        async def exclusive(connection: AsyncConnection) -> T:
            async with connection.begin():
                return await work(_Transaction(self))

        return await self._guarded(exclusive)

    async def migrate(self) -> None:
        async def upgrade(connection: AsyncConnection) -> None:
            async with connection.begin():
                # Replicas starting together take turns.
                await connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                await connection.run_sync(_upgrade)

        await self._guarded(upgrade)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        await self._engine.dispose()


def _upgrade(connection: sa.Connection) -> None:
    """`alembic upgrade head` with the migrations shipped in the package. A database made before migrations
    existed (tables, no version) is stamped with the baseline first: its tables are the baseline's."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    inspector = sa.inspect(connection)
    if inspector.has_table(calls.name) and MigrationContext.configure(connection).get_current_revision() is None:
        command.stamp(config, BASELINE_REVISION)
    command.upgrade(config, "head")


@dataclass
class _Queue:
    jobs: deque[_Job[Any]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class SqlApprovalStore:
    """The executor's store on a SQLAlchemy URL (`sqlite:///path`, `sqlite+aiosqlite:///path`,
    `postgresql+asyncpg://...`). Call `migrate()` once before use (idempotent) and `close()` at the end.

    Implements `ExecutorStore`; `list_pending`, `get`, `get_call`, `audit_entries` and `query` are reads for
    tools and tests.
    """

    def __init__(self, database_url: str, *, sqlite_busy_timeout_seconds: float = 30.0) -> None:
        self.url = database_url
        url = make_url(database_url)
        self._backend: _Backend = (
            _SqliteBackend(url, sqlite_busy_timeout_seconds)
            if url.get_backend_name() == "sqlite"
            else _PostgresBackend(url)
        )
        self._statements = _Statements(self._backend.dialect)
        self._queue: _Queue | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        await self._backend.migrate()

    async def close(self) -> None:
        """Finish what is queued, then close the connection."""
        self._closed = True
        if self._writer is not None:
            assert self._queue is not None
            self._queue.wake.set()
            await self._writer
            self._writer = None
        await self._backend.close()

    # --- units of work -----------------------------------------------------------------------------------

    async def transact(self, work: Callable[[Ledger], T]) -> T:
        statements = self._statements

        def unit(connection: sa.Connection) -> T:
            return work(SqlLedger(connection, statements))

        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, unit=unit))
        return await future

    async def complete_with_effects(
        self, claim: Claim, work: Callable[[EffectConnection], Awaitable[Completion]]
    ) -> Completion | None:
        statements = self._statements

        async def exclusive(transaction: _Transaction) -> Completion:
            completion = await work(transaction)
            recorded = await transaction.run(lambda c: SqlLedger(c, statements).finish(claim, completion))
            if not recorded:
                raise _RollbackError
            return completion

        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, exclusive=exclusive))
        try:
            return await future
        except _RollbackError:
            return None

    def _enqueue(self, job: _Job[Any]) -> None:
        if self._closed:
            raise StoreUnavailableError("the store is closed")
        if self._queue is None:
            self._queue = _Queue()
        self._queue.jobs.append(job)
        self._queue.wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(self._queue), name="executor-store-writer")

    async def _write(self, queue: _Queue) -> None:
        while queue.jobs or not self._closed:
            if not queue.jobs:
                queue.wake.clear()
                await queue.wake.wait()
                continue
            if queue.jobs[0].exclusive is not None:
                await self._run_exclusive(queue.jobs.popleft())
                continue
            batch: list[_Job[Any]] = []
            while queue.jobs and queue.jobs[0].exclusive is None and len(batch) < MAX_BATCH_UNITS:
                batch.append(queue.jobs.popleft())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Job[Any]]) -> None:
        units = [job.unit for job in batch if job.unit is not None]
        try:
            outcomes = await self._backend.run_batch(units)
        except BaseException as error:
            for job in batch:
                _fail(job, error)
            if not isinstance(error, Exception):
                raise
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            if outcome.error is not None:
                _fail(job, outcome.error)
            elif not job.future.done():
                job.future.set_result(outcome.value)

    async def _run_exclusive(self, job: _Job[Any]) -> None:
        assert job.exclusive is not None
        try:
            value = await self._backend.run_exclusive(job.exclusive)
        except BaseException as error:
            _fail(job, error)
            if not isinstance(error, Exception):
                raise
            return
        if not job.future.done():
            job.future.set_result(value)

    # --- reads for tools and tests -----------------------------------------------------------------------

    async def list_pending(self, tenant: str) -> list[ApprovalRecord]:
        return await self.transact(lambda ledger: ledger.approvals(tenant, include_resolved=False))

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        return await self.transact(lambda ledger: ledger.approval(approval_id))

    async def get_call(self, call_id: str) -> CallRecord | None:
        return await self.transact(lambda ledger: ledger.call(call_id))

    async def audit_entries(self, approval_id: str | None = None) -> list[AuditEntry]:
        return await self.transact(lambda ledger: ledger.audit_entries(approval_id))

    async def query(self, statement: sa.Select[Any]) -> list[sa.Row[Any]]:
        """Any read (of the tickets table, say), through the writer."""
        future: asyncio.Future[list[sa.Row[Any]]] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, unit=lambda connection: list(connection.execute(statement).all())))
        return await future


def _fail(job: _Job[Any], error: BaseException) -> None:
    if job.future.done():
        return
    if isinstance(error, Exception) and is_outage(error):
        error = _unavailable(error)
    job.future.set_exception(error)


__all__ = ["SqlApprovalStore", "SqlLedger", "is_outage", "metadata"]
