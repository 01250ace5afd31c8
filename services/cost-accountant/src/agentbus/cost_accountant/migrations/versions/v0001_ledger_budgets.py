"""The ledger, reservations, budget counters, task attributions and the alert outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column(
            "usage_id",
            sa.String(200),
            primary_key=True,
            comment="The usage record's id: one row per billable effect.",
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64)),
        sa.Column("agent", sa.String(64)),
        sa.Column("submitted_by", sa.String(64)),
        sa.Column("model", sa.String(200)),
        sa.Column("tool", sa.String(200)),
        sa.Column("node_class", sa.String(100)),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger, nullable=False),
        sa.Column("priced_by_default", sa.Boolean, nullable=False),
        sa.Column("reservation_id", sa.String(200)),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_ledger_tenant_task", "ledger", ["tenant", "task_id"])
    op.create_index("ix_ledger_tenant_at", "ledger", ["tenant", "at"])

    op.create_table(
        "reservations",
        sa.Column("reservation_id", sa.String(200), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("submitted_by", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("tool", sa.String(200)),
        sa.Column("amount_nanousd", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="open, settled, released, expired or denied"),
        sa.Column("denied_budget", sa.String(300)),
        sa.Column("limit_nanousd", sa.BigInteger),
        sa.Column("committed_nanousd", sa.BigInteger),
        sa.Column("scopes", sa.Text, nullable=False, comment="JSON [[scope, period], ...] the amount is held in."),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("closed_at", sa.DateTime),
    )
    op.create_index("ix_reservations_status_expires", "reservations", ["status", "expires_at"])
    op.create_index("ix_reservations_task", "reservations", ["tenant", "task_id", "status"])

    op.create_table(
        "budget_counters",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("spent_nanousd", sa.BigInteger, nullable=False),
        sa.Column("reserved_nanousd", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "scope", "period", name="pk_budget_counters"),
    )

    op.create_table(
        "tasks",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("submitted_by", sa.String(64)),
        sa.Column("budget_nanousd", sa.BigInteger),
        sa.Column("first_seen_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "task_id", name="pk_tasks"),
    )

    op.create_table(
        "budget_alerts",
        sa.Column("alert_id", sa.String(200), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False, comment="The BudgetAlert as JSON, published after commit."),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("published_at", sa.DateTime),
    )
    op.create_index("ix_budget_alerts_unpublished", "budget_alerts", ["published_at"])


def downgrade() -> None:
    op.drop_table("budget_alerts")
    op.drop_table("tasks")
    op.drop_table("budget_counters")
    op.drop_table("reservations")
    op.drop_table("ledger")
