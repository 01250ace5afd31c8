"""The executor's tables as `metadata.create_all` made them before the executor had migrations: databases in
this shape exist, and the migrations must upgrade them in place, rows and all. Frozen; never edit."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


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
