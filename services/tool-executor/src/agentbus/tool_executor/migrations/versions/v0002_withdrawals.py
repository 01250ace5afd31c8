"""Withdrawn calls, and listing a tenant's approvals in order.

A call can now be known from its withdrawal alone (the task ended before the call arrived), so the columns
that only the call itself carries become nullable; `withdrawn_at`/`withdrawn_reason` record the withdrawal.
An index on (tenant, requested_at) serves the approvals list.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CALL_ONLY_COLUMNS = (
    ("tool_call_id", sa.String(200)),
    ("agent", sa.String(64)),
    ("tool", sa.String(128)),
    ("step", sa.Integer()),
    ("arguments", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("tool_calls") as batch:
        for name, type_ in _CALL_ONLY_COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=True)
        batch.add_column(sa.Column("withdrawn_at", sa.DateTime))
        batch.add_column(sa.Column("withdrawn_reason", sa.Text))
    op.create_index("ix_approvals_tenant_requested", "approvals", ["tenant", "requested_at"])


def downgrade() -> None:
    op.drop_index("ix_approvals_tenant_requested", "approvals")
    op.execute(sa.text("DELETE FROM tool_calls WHERE tool IS NULL"))
    with op.batch_alter_table("tool_calls") as batch:
        batch.drop_column("withdrawn_reason")
        batch.drop_column("withdrawn_at")
        for name, type_ in _CALL_ONLY_COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=False)
