"""The accountant's tables. Migrations under `migrations/versions` create them; a test keeps the two equal.

Money columns are integer nano-dollars (1e-9 USD); times are naive UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData()

ledger = Table(
    "ledger",
    metadata,
    Column("usage_id", String(200), primary_key=True, comment="The usage record's id: one row per billable effect."),
    Column("kind", String(16), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("task_id", String(64)),
    Column("agent", String(64)),
    Column("submitted_by", String(64)),
    Column("model", String(200)),
    Column("tool", String(200)),
    Column("node_class", String(100)),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
    Column("cost_nanousd", BigInteger, nullable=False),
    Column("priced_by_default", Boolean, nullable=False),
    Column("reservation_id", String(200)),
    Column("at", DateTime, nullable=False),
    Column("day", String(10), nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_ledger_tenant_task", "tenant", "task_id"),
    Index("ix_ledger_tenant_at", "tenant", "at"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("reservation_id", String(200), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("submitted_by", String(64)),
    Column("kind", String(16), nullable=False),
    Column("model", String(200)),
    Column("tool", String(200)),
    Column("amount_nanousd", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, comment="open, settled, released, expired or denied"),
    Column("denied_budget", String(300)),
    Column("limit_nanousd", BigInteger),
    Column("committed_nanousd", BigInteger),
    Column("scopes", Text, nullable=False, comment="JSON [[scope, period], ...] the amount is held in."),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("closed_at", DateTime),
    Index("ix_reservations_status_expires", "status", "expires_at"),
    Index("ix_reservations_task", "tenant", "task_id", "status"),
)

budget_counters = Table(
    "budget_counters",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("scope", String(300), nullable=False),
    Column("period", String(16), nullable=False),
    Column("spent_nanousd", BigInteger, nullable=False),
    Column("reserved_nanousd", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "scope", "period", name="pk_budget_counters"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("submitted_by", String(64)),
    Column("budget_nanousd", BigInteger),
    Column("first_seen_at", DateTime, nullable=False),
    PrimaryKeyConstraint("tenant", "task_id", name="pk_tasks"),
)

budget_alerts = Table(
    "budget_alerts",
    metadata,
    Column("alert_id", String(200), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("payload", Text, nullable=False, comment="The BudgetAlert as JSON, published after commit."),
    Column("created_at", DateTime, nullable=False),
    Column("published_at", DateTime),
    Index("ix_budget_alerts_unpublished", "published_at"),
)
