"""Rate limits: the estimated tokens of each admitted LLM reservation, and an index to read a window's.

A partition's new owner counts the LLM reservations admitted in the current rate window again (requests and
tokens per bucket), so a restart or a take-over never refills a bucket. Rows written before this revision
have no tokens: they count as calls of none.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(
            sa.Column(
                "tokens",
                sa.BigInteger,
                comment="Admitted LLM calls: the estimated tokens the rate limits counted (the rebuild counts them "
                "again).",
            )
        )
    op.create_index("ix_reservations_created", "reservations", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_reservations_created", table_name="reservations")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("tokens")
