"""The executor's SQL store: approvals, the execution ledger, the decision audit, the outbox and the tickets of
the `create_ticket` built-in. SQLite by default, Postgres (asyncpg) in production; Alembic migrations.

One writer connection per store, group commit
---------------------------------------------
Every read and write is a unit of work (a function of a `Ledger`) handed to one writer, which owns the
store's only connection. The writer takes every unit queued while its previous transaction committed and
runs them together in one transaction: many decisions, claims and completions share one commit (one fsync)
instead of paying one each. A unit's result is returned only after its transaction committed, so nothing is
published about a change that might still be lost. If a batch fails, it is rolled back and each of its units
runs again in a transaction of its own, so one bad unit fails alone. The outbox rows of a whole batch are
written in one statement just before its commit.

On SQLite the statements run on the event loop (microseconds each) and only BEGIN IMMEDIATE and COMMIT, which
may wait for a lock or an fsync, go to the store's thread: two hops per batch, none per statement. On Postgres a
batch runs on one asyncpg connection, one round trip per statement, so the hot paths take as few as possible
(a decision's reads are one query; an accepted decision's writes are one statement).

A transactional tool (python `transactional: true`) runs inside a transaction of its own on the writer: its
effects commit with the call's outcome, and other units wait until it is done, so such tools must be quick.

Every state change is a compare-and-set (`UPDATE ... WHERE status = <expected>`), so two decisions can never
both win, even between executors sharing a database. The statements are Core statements compiled once per
store and run on the driver's cursor (see `_Prepared`), not the ORM.

A database that cannot be reached raises `StoreUnavailableError`: the message being handled waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from agentbus.runtime.logging import get_logger
from agentbus.tool_executor.adapters.schema import UtcDateTime, approvals, calls, decision_audit, metadata, outbox
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
    ClaimRequest,
    Completion,
    DecisionAuditedError,
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
_DRIVER_OUTAGE_ERRORS = frozenset({"InterfaceError", "OperationalError", "InternalClientError"})
_SQLITE_OUTAGE_MESSAGES = ("locked", "busy", "disk i/o", "unable to open", "disk is full", "readonly")


def _sqlstate(error: BaseException | None) -> str | None:
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return state if isinstance(state, str) else None


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the database cannot be used right now (rather than that a statement is wrong).

    Hot statements run on the driver's cursor, so the error may be the driver's own rather than SQLAlchemy's."""
    if isinstance(error, StoreUnavailableError | OSError | ConnectionError | TimeoutError):
        return True
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    original = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    if isinstance(original, sqlite3.Error):
        text = str(original).lower()
        return isinstance(original, sqlite3.OperationalError) and any(m in text for m in _SQLITE_OUTAGE_MESSAGES)
    state = _sqlstate(original)
    if state is not None:
        return state[:2] in _OUTAGE_SQLSTATE_CLASSES or state in _OUTAGE_SQLSTATES
    # asyncpg reports a closed or broken connection without a SQLSTATE, as an interface or operational error.
    return type(original).__name__ in _DRIVER_OUTAGE_ERRORS


def _is_conflict(error: BaseException) -> bool:
    original = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    return _sqlstate(original) in _CONFLICT_SQLSTATES


def _unavailable(error: BaseException) -> StoreUnavailableError:
    if isinstance(error, StoreUnavailableError):
        return error
    # The driver's own message: the statement and its parameters (call arguments) stay out of the logs.
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error
    return StoreUnavailableError(f"the executor's database is unavailable: {type(cause).__name__}: {cause}")


# --- rows and records ------------------------------------------------------------------------------------

Row = Mapping[str, Any]


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


def _approval(m: Row) -> ApprovalRecord:
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


def _withdrawal(m: Row) -> Withdrawal | None:
    if m["withdrawn_at"] is None:
        return None
    return Withdrawal(m["call_id"], m["tenant"], m["task_id"], m["withdrawn_reason"] or "", m["withdrawn_at"])


def _call(m: Row) -> CallRecord | None:
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
        withdrawn=_withdrawal(m),
        approved_by=m.get("approved_by"),
    )


def _prefixed(row: Row, prefix: str) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in row.items() if key.startswith(prefix)}


def _audit(m: Row) -> AuditEntry:
    return AuditEntry(**{k: v for k, v in m.items() if k != "id"})


def _audit_values(entry: AuditEntry) -> dict[str, Any]:
    return {
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
        "payload": entry.payload[:MAX_AUDIT_PAYLOAD] if entry.payload is not None else None,
    }


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


class _Prepared:
    """A Core statement compiled once for the store's dialect and run as the driver's own SQL.

    SQLAlchemy would redo on every execution what is done here once: the statement's cache key (a walk of the
    whole statement), the parameters' order and processing, the result columns' processing. The bind and
    result processors are the dialect's own, so values are converted exactly as SQLAlchemy converts them.
    """

    def __init__(self, statement: sa.Select[Any] | sa.Insert | sa.Update, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._slots = [
            (name, compiled.params.get(name), compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup or ()
        ]
        columns = list(statement.exported_columns)  # selected or returned; none for plain DML
        self._columns = tuple(column.name for column in columns)
        self._readers = [
            (index, reader)
            for index, column in enumerate(columns)
            if (reader := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
        ]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        bound = []
        for name, default, process in self._slots:
            value = values.get(name, default)
            bound.append(process(value) if process is not None else value)
        return tuple(bound)

    def run(self, connection: sa.Connection, values: Mapping[str, Any]) -> Any:
        """Execute on the driver's cursor, inside the transaction the connection holds; returns the cursor."""
        cursor = _cursor(connection)
        cursor.execute(self.sql, self.parameters(values))
        return cursor

    def run_many(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
        cursor = _cursor(connection)
        cursor.executemany(self.sql, [self.parameters(row) for row in rows])
        cursor.close()

    def rows(self, connection: sa.Connection, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        cursor = self.run(connection, values)
        found = []
        for raw in cursor.fetchall():
            row = list(raw)
            for index, reader in self._readers:
                row[index] = reader(row[index])
            found.append(dict(zip(self._columns, row, strict=True)))
        cursor.close()
        return found

    def first(self, connection: sa.Connection, values: Mapping[str, Any]) -> dict[str, Any] | None:
        found = self.rows(connection, values)
        return found[0] if found else None

    def changed(self, connection: sa.Connection, values: Mapping[str, Any]) -> bool:
        cursor = self.run(connection, values)
        changed = bool(cursor.rowcount == 1)
        cursor.close()
        return changed


def _cursor(connection: sa.Connection) -> Any:
    driver_connection = connection.connection.dbapi_connection
    assert driver_connection is not None
    return driver_connection.cursor()


def _bind(name: str, type_: sa.types.TypeEngine[Any] | None = None) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_)


def _values(table: sa.Table, names: list[str]) -> dict[str, sa.BindParameter[Any]]:
    """SET/VALUES clauses whose parameters are named after their columns, typed like them."""
    return {name: sa.bindparam(name, type_=table.c[name].type) for name in names}


_CALL_INSERTED = [
    "call_id",
    "tool_call_id",
    "tenant",
    "task_id",
    "agent",
    "tool",
    "step",
    "arguments",
    "submitted_by",
    "status",
    "approval_id",
    "traceparent",
    "attempts",
    "result",
    "created_at",
    "updated_at",
]
_WITHDRAWAL_INSERTED = [
    "call_id",
    "tenant",
    "task_id",
    "status",
    "attempts",
    "created_at",
    "updated_at",
    "withdrawn_at",
    "withdrawn_reason",
]
_REGISTERED = [
    "tool_call_id",
    "agent",
    "tool",
    "step",
    "arguments",
    "submitted_by",
    "status",
    "approval_id",
    "traceparent",
    "result",
    "updated_at",
]
_AUDIT_COLUMNS = [column.name for column in decision_audit.c if column.name != "id"]
_DECISION_COLUMNS = ["status", "decided_by", "decided_at", "decision_reason", "decision_seq"]
_APPROVAL_COLUMNS = [column.name for column in approvals.c if column.name not in _DECISION_COLUMNS[1:]]
_OUTBOX_COLUMNS = [column.name for column in outbox.c if column.name != "id"]


def _resolve_with_audit() -> sa.Select[Any]:
    """Postgres: an approval's compare-and-set, its call's row and the decision's audit entry in one statement
    (one round trip instead of three), all of it or none: the call and the audit follow only a won CAS."""
    a, c, d = approvals.c, calls.c, decision_audit.c
    at = _bind("r_at", UtcDateTime())
    resolved = (
        approvals.update()
        .where(a.approval_id == _bind("r_approval_id"), a.status == ApprovalStatus.PENDING.value)
        .values(
            status=_bind("r_status", sa.String()),
            decided_by=_bind("r_by", sa.String()),
            decided_at=at,
            decision_reason=_bind("r_reason", sa.Text()),
            decision_seq=_bind("r_seq", sa.BigInteger()),
        )
        .returning(a.call_id)
        .cte("resolved")
    )
    call_updated = (
        calls.update()
        .where(c.call_id == resolved.c.call_id, c.status == CallStatus.AWAITING_APPROVAL.value)
        .values(status=_bind("r_call_status", sa.String()), result=_bind("r_result", sa.JSON()), updated_at=at)
        .returning(c.call_id)
        .cte("call_updated")
    )
    entry = sa.select(*(_bind(f"u_{name}", d[name].type) for name in _AUDIT_COLUMNS)).where(
        sa.exists(sa.select(resolved.c.call_id))
    )
    audited = (
        postgresql.insert(decision_audit)
        .from_select(_AUDIT_COLUMNS, entry)
        .on_conflict_do_nothing(index_elements=["message_seq"])
        .returning(d.id)
        .cte("audited")
    )
    return sa.select(
        sa.select(resolved.c.call_id).scalar_subquery().label("call_id"),
        sa.select(sa.func.count()).select_from(call_updated).scalar_subquery().label("calls"),
        sa.select(sa.func.count()).select_from(audited).scalar_subquery().label("audited"),
    )


def _decision_contexts() -> sa.Select[Any]:
    """Postgres: what the decisions of a whole batch are checked against, in one query (see
    `SqlLedger.decision_context`)."""
    a, c, d = approvals.c, calls.c, decision_audit.c
    keys = sa.select(
        sa.func.unnest(_bind("b_seqs", postgresql.ARRAY(sa.BigInteger()))).label("seq"),
        sa.func.unnest(_bind("b_approval_ids", postgresql.ARRAY(sa.String()))).label("approval_id"),
    ).subquery("keys")
    return sa.select(
        keys.c.seq.label("key_seq"),
        keys.c.approval_id.label("key_approval_id"),
        d.message_seq.label("audited"),
        *(column.label(f"a_{column.name}") for column in approvals.c),
        *(column.label(f"c_{column.name}") for column in calls.c),
    ).select_from(
        keys.outerjoin(decision_audit, d.message_seq == keys.c.seq)
        .outerjoin(approvals, a.approval_id == keys.c.approval_id)
        .outerjoin(calls, c.call_id == a.call_id)
    )


def _approved_by() -> sa.Label[Any]:
    """Who approved a claimed call: its result names the approval."""
    return (
        sa.select(approvals.c.decided_by)
        .where(approvals.c.call_id == calls.c.call_id)
        .scalar_subquery()
        .label("approved_by")
    )


def _claim_many() -> sa.Update:
    """Postgres: the claims of a whole batch in one statement (see `SqlLedger.claim`)."""
    c = calls.c
    requests = sa.select(
        sa.func.unnest(_bind("b_call_ids", postgresql.ARRAY(sa.String()))).label("call_id"),
        sa.func.unnest(_bind("b_nows", postgresql.ARRAY(UtcDateTime()))).label("now"),
        sa.func.unnest(_bind("b_lease_untils", postgresql.ARRAY(UtcDateTime()))).label("lease_until"),
    ).subquery("requests")
    running = CallStatus.RUNNING.value
    return (
        calls.update()
        .where(
            c.call_id == requests.c.call_id,
            c.tool.is_not(None),
            sa.or_(
                c.status == CallStatus.READY.value,
                sa.and_(c.status == running, c.lease_until <= requests.c.now),
            ),
        )
        .values(
            status=running,
            lease_owner=_bind("b_owner", sa.String()),
            lease_until=requests.c.lease_until,
            attempts=c.attempts + 1,
            updated_at=requests.c.now,
        )
        .returning(*calls.c, _approved_by())
    )


def _finish_many() -> sa.Update:
    """Postgres: the completions of a whole batch in one statement (see `SqlLedger.finish`)."""
    c = calls.c
    outcomes = sa.select(
        sa.func.unnest(_bind("b_call_ids", postgresql.ARRAY(sa.String()))).label("call_id"),
        sa.func.unnest(_bind("b_attempts", postgresql.ARRAY(sa.Integer()))).label("attempt"),
        sa.func.unnest(_bind("b_statuses", postgresql.ARRAY(sa.String()))).label("status"),
        sa.func.unnest(_bind("b_results", postgresql.ARRAY(sa.Text()))).label("result"),
    ).subquery("outcomes")
    return (
        calls.update()
        .where(
            c.call_id == outcomes.c.call_id,
            c.status == CallStatus.RUNNING.value,
            c.lease_owner == _bind("b_owner", sa.String()),
            c.attempts == outcomes.c.attempt,
        )
        .values(
            status=outcomes.c.status,
            result=sa.cast(outcomes.c.result, sa.JSON()),
            lease_owner=None,
            lease_until=None,
            updated_at=_bind("b_now", UtcDateTime()),
        )
        .returning(c.call_id)
    )


class _Statements:
    """Every statement the store runs, built and compiled once for its dialect."""

    def __init__(self, dialect: Dialect) -> None:
        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        c, a, d, o = calls.c, approvals.c, decision_audit.c, outbox.c
        running = CallStatus.RUNNING.value
        call_id = c.call_id == _bind("b_call_id")

        def prepare(statement: sa.Select[Any] | sa.Insert | sa.Update) -> _Prepared:
            return _Prepared(statement, dialect)

        self.call = prepare(sa.select(calls).where(call_id))
        self.approval = prepare(sa.select(approvals).where(a.approval_id == _bind("b_approval_id")))
        self.audit_entry = prepare(sa.select(decision_audit).where(d.message_seq == _bind("b_message_seq")))
        # What a decision is checked against, in one round trip: whether its message is audited already, the
        # approval it names, and that approval's call.
        audited = sa.select(d.message_seq).where(d.message_seq == _bind("b_message_seq")).scalar_subquery()
        one_row = sa.select(sa.literal(1).label("one")).subquery()
        self.decision_context = prepare(
            sa.select(
                audited.label("audited"),
                *(column.label(f"a_{column.name}") for column in approvals.c),
                *(column.label(f"c_{column.name}") for column in calls.c),
            ).select_from(
                one_row.outerjoin(approvals, a.approval_id == _bind("b_approval_id")).outerjoin(
                    calls, c.call_id == a.call_id
                )
            )
        )
        self.insert_call = prepare(
            insert(calls).values(_values(calls, _CALL_INSERTED)).on_conflict_do_nothing(index_elements=["call_id"])
        )
        self.insert_approval = prepare(approvals.insert().values(_values(approvals, _APPROVAL_COLUMNS)))
        self.insert_withdrawal = prepare(
            insert(calls)
            .values(_values(calls, _WITHDRAWAL_INSERTED))
            .on_conflict_do_nothing(index_elements=["call_id"])
        )
        self.register_withdrawn = prepare(
            calls.update()
            .where(call_id, c.status == CallStatus.WITHDRAWN.value, c.tool.is_(None))
            .values(_values(calls, _REGISTERED))
        )
        self.mark_withdrawn = prepare(
            calls.update()
            .where(call_id, c.withdrawn_at.is_(None))
            .values(_values(calls, ["withdrawn_at", "withdrawn_reason"]))
        )
        self.withdraw_call = prepare(
            calls.update()
            .where(call_id, c.status == _bind("b_expected"))
            .values(_values(calls, ["status", "result", "updated_at"]))
        )
        self.resolve_approval = prepare(
            approvals.update()
            .where(a.approval_id == _bind("b_approval_id"), a.status == ApprovalStatus.PENDING.value)
            .values(_values(approvals, _DECISION_COLUMNS))
            .returning(a.call_id)
        )
        self.resolve_call = prepare(
            calls.update()
            .where(call_id, c.status == CallStatus.AWAITING_APPROVAL.value)
            .values(_values(calls, ["status", "result", "updated_at"]))
        )
        self.insert_audit = prepare(
            insert(decision_audit)
            .values(_values(decision_audit, _AUDIT_COLUMNS))
            .on_conflict_do_nothing(index_elements=["message_seq"])
        )
        postgres = dialect.name == "postgresql"
        self.resolve_with_audit = prepare(_resolve_with_audit()) if postgres else None
        self.claim_many = prepare(_claim_many()) if postgres else None
        self.decision_contexts = prepare(_decision_contexts()) if postgres else None
        self.finish_many = prepare(_finish_many()) if postgres else None
        # One statement takes the call: concurrent claims (other executors) re-check the row and find it taken.
        self.claim = prepare(
            calls.update()
            .where(
                call_id,
                c.tool.is_not(None),
                sa.or_(
                    c.status == CallStatus.READY.value,
                    sa.and_(c.status == running, c.lease_until <= _bind("b_now", UtcDateTime())),
                ),
            )
            .values(
                status=running,
                lease_owner=_bind("b_owner", sa.String()),
                lease_until=_bind("b_lease_until", UtcDateTime()),
                attempts=c.attempts + 1,
                updated_at=_bind("b_now", UtcDateTime()),
            )
            .returning(*calls.c, _approved_by())
        )
        held = (call_id, c.status == running, c.lease_owner == _bind("b_owner"), c.attempts == _bind("b_attempt"))
        self.renew_lease = prepare(calls.update().where(*held).values(_values(calls, ["lease_until"])))
        self.finish = prepare(
            calls.update()
            .where(*held)
            .values(_values(calls, ["status", "result", "lease_owner", "lease_until", "updated_at"]))
        )
        self.insert_outbox = prepare(outbox.insert().values(_values(outbox, _OUTBOX_COLUMNS)))
        unpublished = sa.select(outbox).where(o.published_at.is_(None))
        self.unpublished = {
            (by_call, by_age): prepare(
                unpublished.where(
                    *([o.call_id == _bind("b_call_id")] if by_call else []),
                    *([o.created_at <= _bind("b_created_before", UtcDateTime())] if by_age else []),
                )
                .order_by(o.id)
                .limit(_bind("b_limit", sa.Integer()))
            )
            for by_call in (False, True)
            for by_age in (False, True)
        }
        # The ids are a list of any length: compiled per execution (a batch of marks every few milliseconds).
        self.mark_published = (
            outbox.update()
            .where(o.msg_id.in_(sa.bindparam("msg_ids", expanding=True)), o.published_at.is_(None))
            .values(published_at=sa.bindparam("at"))
        )
        self.due_for_expiry = prepare(
            sa.select(approvals)
            .where(a.status == ApprovalStatus.PENDING.value, a.expires_at <= _bind("b_now", UtcDateTime()))
            .order_by(a.expires_at)
            .limit(_bind("b_limit", sa.Integer()))
        )
        self.calls_to_resume = prepare(
            sa.select(calls)
            .where(
                c.tool.is_not(None),
                sa.or_(
                    sa.and_(
                        c.status == CallStatus.READY.value,
                        c.updated_at <= _bind("b_ready_before", UtcDateTime()),
                    ),
                    sa.and_(c.status == running, c.lease_until <= _bind("b_now", UtcDateTime())),
                ),
            )
            .order_by(c.created_at)
            .limit(_bind("b_limit", sa.Integer()))
        )
        self.count_pending = prepare(
            sa.select(sa.func.count().label("pending"))
            .select_from(approvals)
            .where(a.status == ApprovalStatus.PENDING.value)
        )
        listed = sa.select(approvals).where(a.tenant == _bind("b_tenant"))
        order = (a.requested_at, a.approval_id)
        limit = _bind("b_limit", sa.Integer())
        self.approvals_pending = prepare(
            listed.where(a.status == ApprovalStatus.PENDING.value).order_by(*order).limit(limit)
        )
        self.approvals_all = prepare(listed.order_by(*order).limit(limit))
        self.approval_of_tenant = prepare(listed.where(a.approval_id == _bind("b_approval_id")))
        self.audit_all = prepare(sa.select(decision_audit).order_by(d.id))
        self.audit_of_approval = prepare(
            sa.select(decision_audit).where(d.approval_id == _bind("b_approval_id")).order_by(d.id)
        )


class SqlLedger:
    """The `Ledger` on one connection inside the writer's transaction."""

    def __init__(self, connection: sa.Connection, statements: _Statements) -> None:
        self._conn = connection
        self._s = statements

    def call(self, call_id: str) -> CallRecord | None:
        row = self._s.call.first(self._conn, {"b_call_id": call_id})
        return None if row is None else _call(row)

    def withdrawal(self, call_id: str) -> Withdrawal | None:
        row = self._s.call.first(self._conn, {"b_call_id": call_id})
        return None if row is None else _withdrawal(row)

    def approval(self, approval_id: str) -> ApprovalRecord | None:
        row = self._s.approval.first(self._conn, {"b_approval_id": approval_id})
        return None if row is None else _approval(row)

    def audit_entry(self, message_seq: int) -> AuditEntry | None:
        row = self._s.audit_entry.first(self._conn, {"b_message_seq": message_seq})
        return None if row is None else _audit(row)

    def prefetch_decisions(self, keys: list[tuple[int, str]]) -> None:
        """Read the contexts of several decisions in one query, for `decision_context` to find in this transaction.
        A context read here may be overtaken by a unit earlier in the batch; the compare-and-set that applies a
        decision is what decides, so a decision beaten that way is refused as already resolved, as it would be."""
        if self._s.decision_contexts is None or not keys:
            return
        values = {"b_seqs": [seq for seq, _ in keys], "b_approval_ids": [approval_id for _, approval_id in keys]}
        found = _prefetched(self._conn)
        for row in self._s.decision_contexts.rows(self._conn, values):
            found[(row["key_seq"], row["key_approval_id"])] = row

    def decision_context(
        self, message_seq: int, approval_id: str
    ) -> tuple[AuditEntry | None, ApprovalRecord | None, CallRecord | None]:
        row = _prefetched(self._conn).pop((message_seq, approval_id), None)
        if row is None:
            row = self._s.decision_context.first(
                self._conn, {"b_message_seq": message_seq, "b_approval_id": approval_id}
            )
        assert row is not None
        audited = self.audit_entry(message_seq) if row["audited"] is not None else None
        if row["a_approval_id"] is None:
            return audited, None, None
        approval = _approval(_prefixed(row, "a_"))
        call = _call(_prefixed(row, "c_")) if row["c_call_id"] is not None else None
        return audited, approval, call

    def insert_call(self, call: CallRecord, approval: ApprovalRecord | None, messages: list[OutgoingMessage]) -> bool:
        now = datetime.now(UTC)
        if not self._s.insert_call.changed(self._conn, _call_values(call, now)):
            return False
        if approval is not None:
            self._s.insert_approval.run(
                self._conn,
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
        values = {**_call_values(call, now), "b_call_id": call.call_id}
        if not self._s.register_withdrawn.changed(self._conn, values):
            return False
        self._add_outbox(call.call_id, messages, now)
        return True

    def insert_withdrawal(self, withdrawal: Withdrawal) -> bool:
        return self._s.insert_withdrawal.changed(
            self._conn,
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
        self._s.mark_withdrawn.run(
            self._conn,
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
        changed = self._s.withdraw_call.changed(
            self._conn,
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
        row = self._s.resolve_approval.first(
            self._conn,
            {
                "b_approval_id": resolution.approval_id,
                "status": resolution.status.value,
                "decided_by": resolution.by,
                "decided_at": resolution.at,
                "decision_reason": resolution.reason,
                "decision_seq": resolution.decision_seq,
            },
        )
        if row is None:
            return False
        call_id = row["call_id"]
        self._s.resolve_call.run(
            self._conn,
            {
                "b_call_id": call_id,
                "status": resolution.call_status.value,
                "result": _result_to_json(resolution.call_result),
                "updated_at": resolution.at,
            },
        )
        self._add_outbox(call_id, resolution.outbox, resolution.at)
        return True

    def resolve_with_audit(self, resolution: Resolution, entry: AuditEntry) -> bool:
        statement = self._s.resolve_with_audit
        if statement is None:
            if not self.resolve_approval(resolution):
                return False
            if not self.add_audit(entry):
                raise DecisionAuditedError(f"decision {entry.message_seq} was audited by another delivery")
            return True
        row = statement.first(
            self._conn,
            {
                "r_approval_id": resolution.approval_id,
                "r_status": resolution.status.value,
                "r_by": resolution.by,
                "r_at": resolution.at,
                "r_reason": resolution.reason,
                "r_seq": resolution.decision_seq,
                "r_call_status": resolution.call_status.value,
                "r_result": _result_to_json(resolution.call_result),
                **{f"u_{name}": value for name, value in _audit_values(entry).items()},
            },
        )
        assert row is not None
        if row["call_id"] is None:
            return False
        if row["audited"] != 1:
            raise DecisionAuditedError(f"decision {entry.message_seq} was audited by another delivery")
        self._add_outbox(row["call_id"], resolution.outbox, resolution.at)
        return True

    def add_audit(self, entry: AuditEntry) -> bool:
        return self._s.insert_audit.changed(self._conn, _audit_values(entry))

    def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        row = self._s.claim.first(
            self._conn, {"b_call_id": call_id, "b_owner": owner, "b_now": now, "b_lease_until": lease_until}
        )
        return None if row is None else _call(row)

    def claim_many(self, requests: list[ClaimRequest]) -> list[CallRecord | None]:
        """Several claims at once: on Postgres one statement per owner. Each call is claimed once; a second
        request for the same call gets None, as a concurrent claim would."""
        taken: dict[str, CallRecord | None] = {}
        for owner in dict.fromkeys(request.owner for request in requests):
            mine = {r.call_id: r for r in requests if r.owner == owner and r.call_id not in taken}
            if self._s.claim_many is None:
                for request in mine.values():
                    taken[request.call_id] = self.claim(request.call_id, owner, request.now, request.lease_until)
                continue
            values = {
                "b_owner": owner,
                "b_call_ids": list(mine),
                "b_nows": [r.now for r in mine.values()],
                "b_lease_untils": [r.lease_until for r in mine.values()],
            }
            claimed = {row["call_id"]: _call(row) for row in self._s.claim_many.rows(self._conn, values)}
            taken.update({call_id: claimed.get(call_id) for call_id in mine})
        answers: list[CallRecord | None] = []
        for request in requests:
            answers.append(taken.pop(request.call_id, None))
        return answers

    def finish_many(self, outcomes: list[tuple[Claim, Completion]]) -> list[bool]:
        """Several completions at once: on Postgres one statement per owner."""
        if self._s.finish_many is None:
            return [self.finish(claim, completion) for claim, completion in outcomes]
        now = datetime.now(UTC)
        finished: set[tuple[str, int]] = set()
        for owner in dict.fromkeys(claim.owner for claim, _ in outcomes):
            mine = [(claim, completion) for claim, completion in outcomes if claim.owner == owner]
            values = {
                "b_owner": owner,
                "b_now": now,
                "b_call_ids": [claim.call_id for claim, _ in mine],
                "b_attempts": [claim.attempt for claim, _ in mine],
                "b_statuses": [completion.status.value for _, completion in mine],
                "b_results": [json.dumps(_result_to_json(completion.result)) for _, completion in mine],
            }
            done = {row["call_id"] for row in self._s.finish_many.rows(self._conn, values)}
            finished.update((claim.call_id, claim.attempt) for claim, _ in mine if claim.call_id in done)
        answers = []
        for claim, completion in outcomes:
            recorded = (claim.call_id, claim.attempt) in finished
            finished.discard((claim.call_id, claim.attempt))
            if recorded:
                self._add_outbox(claim.call_id, completion.outbox, now)
            answers.append(recorded)
        return answers

    def renew_lease(self, claim: Claim, lease_until: datetime) -> bool:
        return self._s.renew_lease.changed(
            self._conn,
            {
                "b_call_id": claim.call_id,
                "b_owner": claim.owner,
                "b_attempt": claim.attempt,
                "lease_until": lease_until,
            },
        )

    def finish(self, claim: Claim, completion: Completion) -> bool:
        now = datetime.now(UTC)
        changed = self._s.finish.changed(
            self._conn,
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
        rows = statement.rows(self._conn, {"b_call_id": call_id, "b_created_before": created_before, "b_limit": limit})
        return [
            StoredMessage(
                row["id"],
                row["call_id"],
                OutgoingMessage(row["subject"], row["msg_id"], row["payload"], row["traceparent"]),
            )
            for row in rows
        ]

    def mark_published(self, msg_ids: list[str], at: datetime) -> None:
        if msg_ids:
            self._conn.execute(self._s.mark_published, {"msg_ids": msg_ids, "at": at})

    def due_for_expiry(self, now: datetime, limit: int = 500) -> list[ApprovalRecord]:
        return [_approval(row) for row in self._s.due_for_expiry.rows(self._conn, {"b_now": now, "b_limit": limit})]

    def calls_to_resume(self, now: datetime, *, ready_before: datetime, limit: int = 500) -> list[CallRecord]:
        rows = self._s.calls_to_resume.rows(
            self._conn, {"b_now": now, "b_ready_before": ready_before, "b_limit": limit}
        )
        found = (_call(row) for row in rows)
        return [call for call in found if call is not None]

    def count_pending(self) -> int:
        row = self._s.count_pending.first(self._conn, {})
        assert row is not None
        return int(row["pending"])

    def approvals(
        self, tenant: str, *, include_resolved: bool, approval_id: str | None = None, limit: int = 500
    ) -> list[ApprovalRecord]:
        values = {"b_tenant": tenant, "b_approval_id": approval_id, "b_limit": limit}
        if approval_id is not None:
            statement = self._s.approval_of_tenant
        elif include_resolved:
            statement = self._s.approvals_all
        else:
            statement = self._s.approvals_pending
        return [_approval(row) for row in statement.rows(self._conn, values)]

    def audit_entries(self, approval_id: str | None = None) -> list[AuditEntry]:
        if approval_id is None:
            return [_audit(row) for row in self._s.audit_all.rows(self._conn, {})]
        return [_audit(row) for row in self._s.audit_of_approval.rows(self._conn, {"b_approval_id": approval_id})]

    def _add_outbox(self, call_id: str, messages: list[OutgoingMessage], now: datetime) -> None:
        # Written with every other unit's messages, in one statement just before the transaction commits.
        _pending_outbox(self._conn).extend(
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
        )


_OUTBOX_ROWS = "agentbus_outbox_rows"


def _pending_outbox(connection: sa.Connection) -> list[dict[str, Any]]:
    """The outbox rows of the transaction under way, kept with the connection until it commits."""
    rows: list[dict[str, Any]] = connection.info.setdefault(_OUTBOX_ROWS, [])
    return rows


_PREFETCHED = "agentbus_prefetched_decisions"


def _prefetched(connection: sa.Connection) -> dict[tuple[int, str], dict[str, Any]]:
    """Decision contexts read ahead for the transaction under way."""
    found: dict[tuple[int, str], dict[str, Any]] = connection.info.setdefault(_PREFETCHED, {})
    return found


def _begin_buffering(connection: sa.Connection) -> None:
    connection.info.pop(_OUTBOX_ROWS, None)
    connection.info.pop(_PREFETCHED, None)


def _write_outbox(connection: sa.Connection, statements: _Statements) -> None:
    """Insert the transaction's outbox rows in one statement (one round trip), oldest first."""
    rows = connection.info.pop(_OUTBOX_ROWS, None)
    if rows:
        statements.insert_outbox.run_many(connection, rows)


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
    claim: ClaimRequest | None = None
    finish: tuple[Claim, Completion] | None = None
    decision: tuple[int, str] | None = None
    """(message seq, approval id) of the decision the unit checks, read ahead with the batch's others."""


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
    statements: _Statements

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


def _run_units(connection: sa.Connection, units: list[Unit], statements: _Statements) -> list[_Outcome]:
    """Postgres: run the units in one transaction; if that fails (and not for an outage), each again in its own."""
    try:
        _begin_buffering(connection)
        with connection.begin():
            values = [unit(connection) for unit in units]
            _write_outbox(connection, statements)
        return [_Outcome(value) for value in values]
    except Exception as error:
        if is_outage(error):
            raise
        failed = error
    if len(units) == 1 and not _is_conflict(failed):
        return [_Outcome(error=failed)]
    return [_run_alone(connection, unit, statements) for unit in units]


def _run_alone(connection: sa.Connection, unit: Unit, statements: _Statements) -> _Outcome:
    for attempt in range(_RETRIES_PER_UNIT):
        try:
            _begin_buffering(connection)
            with connection.begin():
                value = unit(connection)
                _write_outbox(connection, statements)
                return _Outcome(value)
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
    """One sqlite3 connection. Its statements run on the event loop, where each takes microseconds; what may block
    runs on a thread of its own: BEGIN IMMEDIATE (which may wait for another process's write lock) and COMMIT
    (the fsync). Handing every statement to a thread would cost more than the statement: sqlite3 gives up the
    interpreter lock on each one and the thread must win it back from a busy event loop."""

    def __init__(self, url: URL, busy_timeout_seconds: float) -> None:
        database = url.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = sa.create_engine(
            url.set(drivername="sqlite"),
            # Used from the event loop and the store's thread, never from both at once: the writer is sequential.
            connect_args={"timeout": busy_timeout_seconds, "check_same_thread": False},
            poolclass=sa.pool.NullPool,
        )
        _prepare_sqlite(self._engine)
        self.dialect = self._engine.dialect
        self.statements = _Statements(self.dialect)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor-sqlite")
        self._connection: sa.Connection | None = None
        self._transaction: sa.Transaction | None = None

    def _connected(self) -> sa.Connection:
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    def _drop(self) -> None:
        self._transaction = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def _guarded(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except Exception as error:
            if is_outage(error):
                self._drop()
                raise _unavailable(error) from error
            raise

    async def _in_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._guarded, work)

    def _begin(self) -> sa.Connection:
        connection = self._connected()
        _begin_buffering(connection)
        self._transaction = connection.begin()
        return connection

    def _rollback(self) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            with contextlib.suppress(Exception):
                transaction.rollback()

    async def _transact(self, work: Callable[[sa.Connection], T]) -> T:
        connection = await self._in_thread(self._begin)
        try:
            value = self._guarded(lambda: work(connection))
            # The outbox rows go in with the statements: only the commit's fsync waits on the thread.
            self._guarded(lambda: _write_outbox(connection, self.statements))
        except BaseException:
            await self._in_thread(self._rollback)
            raise
        transaction, self._transaction = self._transaction, None
        assert transaction is not None
        await self._in_thread(transaction.commit)
        return value

    async def run_batch(self, units: list[Unit]) -> list[_Outcome]:
        try:
            values = await self._transact(lambda connection: [unit(connection) for unit in units])
            return [_Outcome(value) for value in values]
        except StoreUnavailableError:
            raise
        except Exception as error:
            failed = error
        if len(units) == 1 and not _is_conflict(failed):
            return [_Outcome(error=failed)]
        return [await self._alone(unit) for unit in units]

    async def _alone(self, unit: Unit) -> _Outcome:
        for attempt in range(_RETRIES_PER_UNIT):
            try:
                return _Outcome(await self._transact(unit))
            except StoreUnavailableError:
                raise
            except Exception as error:
                if not _is_conflict(error) or attempt + 1 == _RETRIES_PER_UNIT:
                    return _Outcome(error=error)
        raise AssertionError("unreachable")

    async def in_transaction(self, unit: Unit) -> Any:
        return self._guarded(lambda: unit(self._connected()))

    async def run_exclusive(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        await self._in_thread(self._begin)
        try:
            value = await work(_Transaction(self))
            self._guarded(lambda: _write_outbox(self._connected(), self.statements))
        except BaseException:
            await self._in_thread(self._rollback)
            raise
        transaction, self._transaction = self._transaction, None
        assert transaction is not None
        await self._in_thread(transaction.commit)
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
        self.statements = _Statements(self.dialect)
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
        return await self._guarded(lambda connection: connection.run_sync(_run_units, units, self.statements))

    async def in_transaction(self, unit: Unit) -> Any:
        return await self._guarded(lambda connection: connection.run_sync(unit))

    async def run_exclusive(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        async def exclusive(connection: AsyncConnection) -> T:
            await connection.run_sync(_begin_buffering)
            async with connection.begin():
                value = await work(_Transaction(self))
                await connection.run_sync(_write_outbox, self.statements)
                return value

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
        self._statements = self._backend.statements
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

    async def transact(self, work: Callable[[Ledger], T], *, decision: tuple[int, str] | None = None) -> T:
        statements = self._statements

        def unit(connection: sa.Connection) -> T:
            return work(SqlLedger(connection, statements))

        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, unit=unit, decision=decision))
        return await future

    async def claim(self, call_id: str, owner: str, now: datetime, lease_until: datetime) -> CallRecord | None:
        future: asyncio.Future[CallRecord | None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, claim=ClaimRequest(call_id, owner, now, lease_until)))
        return await future

    async def finish(self, claim: Claim, completion: Completion) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future, finish=(claim, completion)))
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
            try:
                await self._run_batch(batch)
            except Exception as error:
                # Whatever went wrong, no caller may be left waiting for an answer that will not come.
                _log.exception("store_batch_failed", units=len(batch))
                for job in batch:
                    _fail(job, error)

    async def _run_batch(self, batch: list[_Job[Any]]) -> None:
        statements = self._statements
        plain = [job for job in batch if job.unit is not None]
        claims = [job for job in batch if job.claim is not None]
        finishes = [job for job in batch if job.finish is not None]
        units: list[Unit] = [job.unit for job in plain if job.unit is not None]
        groups: list[list[_Job[Any]]] = [[job] for job in plain]
        decisions = [job.decision for job in plain if job.decision is not None]
        if len(decisions) > 1 and statements.decision_contexts is not None:
            units.insert(0, lambda connection: SqlLedger(connection, statements).prefetch_decisions(decisions))
            groups.insert(0, [])
        # The batch's claims, and its completions, each as one unit: one statement apiece on Postgres.
        if claims:
            requests = [job.claim for job in claims if job.claim is not None]
            units.append(lambda connection: SqlLedger(connection, statements).claim_many(requests))
            groups.append(claims)
        if finishes:
            outcomes = [job.finish for job in finishes if job.finish is not None]
            units.append(lambda connection: SqlLedger(connection, statements).finish_many(outcomes))
            groups.append(finishes)
        try:
            results = await self._backend.run_batch(units)
        except BaseException as error:
            for job in batch:
                _fail(job, error)
            if not isinstance(error, Exception):
                raise
            return
        for group, result in zip(groups, results, strict=True):
            if not group:
                continue
            values = result.value if len(group) > 1 or group[0].unit is None else [result.value]
            for index, job in enumerate(group):
                if result.error is not None:
                    _fail(job, result.error)
                elif not job.future.done():
                    job.future.set_result(values[index])

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
