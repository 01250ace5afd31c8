"""Partitioned budget books: partition leases, closed tasks, per-tenant keys, counters rebuilt not stored.

- `budget_partitions` (one lease per budget partition, with the epoch every group commit checks) and
  `accountant_replicas` (heartbeats, to share the partitions among the replicas alive).
- `tasks.closed_at` (a closed task refuses later reservations); `tasks.agent` may be empty (a task closed
  before its first reservation).
- The ledger is keyed by (tenant, usage_id) and reservations by (tenant, task_id, reservation_id): ids are
  built from task ids, which are unique within a tenant only.
- `budget_counters` is dropped: each partition's owner rebuilds its counters from the ledger and the open
  reservations, so there is nothing to keep in step on every write. The downgrade computes the table again.
- `ix_ledger_at` (the rebuild reads the ledger from the start of last month) replaces `ix_ledger_tenant_at`;
  `ix_reservations_task` is covered by the new primary key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _replace_primary_key(table: str, old_name: str, new_name: str, columns: list[str]) -> None:
    if _sqlite():
        # SQLite cannot change a primary key in place: batch mode copies the table with the new key.
        # SQLAlchemy warns that the copied columns' own primary-key flags differ from the new key, which is
        # the very change being made.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Table '_alembic_tmp_\w+' specifies columns")
            with op.batch_alter_table(table, recreate="always") as batch:
                batch.create_primary_key(new_name, columns)
    else:
        op.drop_constraint(old_name, table, type_="primary")
        op.create_primary_key(new_name, table, columns)


def upgrade() -> None:
    op.create_table(
        "budget_partitions",
        sa.Column("partition_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(200), comment="The replica holding the lease; none when free."),
        sa.Column(
            "epoch",
            sa.BigInteger,
            nullable=False,
            comment="Raised by every take-over; each group commit checks it (the fence).",
        ),
        sa.Column("lease_expires_at", sa.DateTime),
    )
    op.create_table(
        "accountant_replicas",
        sa.Column("replica_id", sa.String(200), primary_key=True),
        sa.Column(
            "heartbeat_at",
            sa.DateTime,
            nullable=False,
            comment="Replicas share the partitions among those alive.",
        ),
    )

    with op.batch_alter_table("tasks") as batch:
        batch.alter_column(
            "agent",
            existing_type=sa.String(64),
            nullable=True,
            comment="From the first reservation; none for a task closed before any.",
        )
        batch.add_column(
            sa.Column("closed_at", sa.DateTime, comment="Set by the task's close: later reservations are refused.")
        )

    op.drop_index("ix_ledger_tenant_at", table_name="ledger")
    _replace_primary_key("ledger", "ledger_pkey", "pk_ledger", ["tenant", "usage_id"])
    op.create_index("ix_ledger_at", "ledger", ["at"])

    op.drop_index("ix_reservations_task", table_name="reservations")
    _replace_primary_key(
        "reservations", "reservations_pkey", "pk_reservations", ["tenant", "task_id", "reservation_id"]
    )

    op.drop_table("budget_counters")


def downgrade() -> None:
    """Back to 0001. Fails if two tenants share a usage id or reservation id (0001 cannot hold that)."""
    counters = op.create_table(
        "budget_counters",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("spent_nanousd", sa.BigInteger, nullable=False),
        sa.Column("reserved_nanousd", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "scope", "period", name="pk_budget_counters"),
    )
    bind = op.get_bind()
    totals: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    spent = bind.execute(
        sa.text(
            "SELECT tenant, task_id, submitted_by, agent, model, substr(day, 1, 7) AS month, "
            "sum(cost_nanousd) AS cost FROM ledger "
            "GROUP BY tenant, task_id, submitted_by, agent, model, substr(day, 1, 7)"
        )
    )
    for row in spent:
        scopes = [(f"tenant:{row.tenant}", row.month)]
        if row.task_id is not None:
            scopes.append((f"task:{row.task_id}", "task"))
        if row.submitted_by is not None:
            scopes.append((f"user:{row.submitted_by}", row.month))
        if row.agent is not None:
            scopes.append((f"agent:{row.agent}", row.month))
        if row.model is not None:
            scopes.append((f"model:{row.model}", row.month))
        for scope, period in scopes:
            totals[(row.tenant, scope, period)][0] += int(row.cost)
    held = bind.execute(sa.text("SELECT tenant, amount_nanousd, scopes FROM reservations WHERE status = 'open'"))
    for row in held:
        for scope, period in json.loads(row.scopes):
            totals[(row.tenant, scope, period)][1] += int(row.amount_nanousd)
    if totals:
        op.bulk_insert(
            counters,
            [
                {"tenant": t, "scope": s, "period": p, "spent_nanousd": spent, "reserved_nanousd": reserved}
                for (t, s, p), (spent, reserved) in totals.items()
            ],
        )

    _replace_primary_key("reservations", "pk_reservations", "reservations_pkey", ["reservation_id"])
    op.create_index("ix_reservations_task", "reservations", ["tenant", "task_id", "status"])
    op.drop_index("ix_ledger_at", table_name="ledger")
    _replace_primary_key("ledger", "pk_ledger", "ledger_pkey", ["usage_id"])
    op.create_index("ix_ledger_tenant_at", "ledger", ["tenant", "at"])

    op.execute("UPDATE tasks SET agent = '' WHERE agent IS NULL")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("closed_at")
        batch.alter_column("agent", existing_type=sa.String(64), nullable=False, comment=None)
    op.drop_table("accountant_replicas")
    op.drop_table("budget_partitions")
