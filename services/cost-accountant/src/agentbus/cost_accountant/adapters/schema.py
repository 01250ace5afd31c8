"""The accountant's tables. Migrations under `migrations/versions` create them; a test keeps the two equal.

Money columns are integer nano-dollars (1e-9 USD); times are naive UTC. Budget counters are not stored: a
partition's owner rebuilds them from the ledger (spent) and the open reservations (reserved) when it takes
the partition, and keeps them in memory while it owns it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
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
    Column("usage_id", String(200), nullable=False, comment="The usage record's id: one row per billable effect."),
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
    # Usage ids are unique within a tenant (they are built from task ids, which are).
    PrimaryKeyConstraint("tenant", "usage_id", name="pk_ledger"),
    Index("ix_ledger_tenant_task", "tenant", "task_id"),
    Index("ix_ledger_at", "at"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("reservation_id", String(200), nullable=False),
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
    Column(
        "tokens",
        BigInteger,
        comment="Admitted LLM calls: the estimated tokens the rate limits counted (the rebuild counts them again).",
    ),
    # A reservation id is idempotent within its task: a task's reservations are read together.
    PrimaryKeyConstraint("tenant", "task_id", "reservation_id", name="pk_reservations"),
    Index("ix_reservations_status_expires", "status", "expires_at"),
    Index("ix_reservations_created", "created_at"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("agent", String(64), comment="From the first reservation; none for a task closed before any."),
    Column("submitted_by", String(64)),
    Column("budget_nanousd", BigInteger),
    Column("first_seen_at", DateTime, nullable=False),
    Column("closed_at", DateTime, comment="Set by the task's close: later reservations are refused."),
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

budget_partitions = Table(
    "budget_partitions",
    metadata,
    Column("partition_id", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(200), comment="The replica holding the lease; none when free."),
    Column(
        "epoch",
        BigInteger,
        nullable=False,
        comment="Raised by every take-over; each group commit checks it (the fence).",
    ),
    Column("lease_expires_at", DateTime),
)

accountant_replicas = Table(
    "accountant_replicas",
    metadata,
    Column("replica_id", String(200), primary_key=True),
    Column("heartbeat_at", DateTime, nullable=False, comment="Replicas share the partitions among those alive."),
)
