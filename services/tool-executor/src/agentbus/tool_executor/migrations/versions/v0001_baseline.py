"""The approvals, the execution ledger, the decision audit, the outbox and the tickets, as first created.

A database created before the executor had migrations has exactly these tables (made by
`metadata.create_all`): it is stamped with this revision and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tool_calls",
        sa.Column("call_id", sa.String(160), primary_key=True),
        sa.Column("tool_call_id", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("tool", sa.String(128), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("arguments", sa.JSON, nullable=False),
        sa.Column("submitted_by", sa.String(64)),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("approval_id", sa.String(64)),
        sa.Column("traceparent", sa.String(64)),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_tool_calls_status", "tool_calls", ["status"])

    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.String(64), primary_key=True),
        sa.Column("call_id", sa.String(160), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("tool", sa.String(128), nullable=False),
        sa.Column("arguments", sa.JSON, nullable=False),
        sa.Column("arguments_sha256", sa.String(64), nullable=False),
        sa.Column("risk", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("requested_by", sa.String(64)),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decided_by", sa.String(64)),
        sa.Column("decided_at", sa.DateTime),
        sa.Column("decision_reason", sa.Text),
        sa.Column("decision_seq", sa.BigInteger),
    )
    op.create_index("ix_approvals_tenant", "approvals", ["tenant"])
    op.create_index("ix_approvals_expires_at", "approvals", ["expires_at"])
    op.create_index("ix_approvals_status", "approvals", ["status"])

    op.create_table(
        "approval_decision_audit",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("message_seq", sa.BigInteger, nullable=False, unique=True),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("subject_approver", sa.String(64), nullable=False),
        sa.Column("approver", sa.String(64)),
        sa.Column("approval_id", sa.String(64)),
        sa.Column("decision", sa.String(16)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason_code", sa.String(32)),
        sa.Column("detail", sa.Text),
        sa.Column("payload", sa.Text),
    )
    op.create_index("ix_approval_decision_audit_approval_id", "approval_decision_audit", ["approval_id"])

    op.create_table(
        "outbox",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(160), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("msg_id", sa.String(255), nullable=False, unique=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("traceparent", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("published_at", sa.DateTime),
    )
    op.create_index("ix_outbox_call_id", "outbox", ["call_id"])
    op.create_index("ix_outbox_published_at", "outbox", ["published_at"])

    op.create_table(
        "tickets",
        sa.Column("ticket_id", sa.String(32), primary_key=True),
        sa.Column("call_id", sa.String(160), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_tickets_tenant", "tickets", ["tenant"])


def downgrade() -> None:
    for table in ("tickets", "outbox", "approval_decision_audit", "approvals", "tool_calls"):
        op.drop_table(table)
