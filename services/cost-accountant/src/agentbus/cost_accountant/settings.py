"""cost-accountant settings, from AGENTBUS_ACCOUNTANT_* environment variables."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

FAULT_POINTS = ("decided", "committed")
"""Where `fault_pause_at` can stop the accountant (see FaultPoints in committer.py)."""


def _replica_id() -> str:
    # Unique per process start: a restarted replica must never pass for the one whose leases it finds.
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class AccountantSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_ACCOUNTANT_", extra="ignore", frozen=True)

    database_url: str = Field(
        default="sqlite+aiosqlite:///.agentbus/cost-accountant.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db.",
    )
    database_schema: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Postgres only: the schema the tables live in (search_path). Default: the server's.",
    )
    migrate_on_start: bool = Field(default=True, description="Run `alembic upgrade head` at start-up.")
    prices_file: Path = Field(default=Path("config/prices.yaml"), description="The price table (YAML).")
    budgets_file: Path = Field(default=Path("config/budgets.yaml"), description="Budgets and limits (YAML).")
    limits_file: Path | None = Field(
        default=None, description="Rate limits (YAML), e.g. config/limits.yaml. None: no rate limits."
    )
    reservation_ttl_seconds: float = Field(
        default=1800.0, gt=0, description="An unsettled reservation is released this long after it was made."
    )
    expiry_sweep_seconds: float = Field(default=30.0, gt=0, description="How often expired reservations are released.")
    alert_retry_seconds: float = Field(
        default=5.0, gt=0, description="How often unpublished budget alerts are published again."
    )
    ingest_concurrency: int = Field(
        default=512, ge=1, description="Usage messages in flight at once; they are written in shared transactions."
    )
    ingest_fetch_batch: int = Field(default=256, ge=1, description="Usage messages pulled per fetch request.")
    ingest_max_batch: int = Field(
        default=1000,
        ge=1,
        le=5000,
        description="Most operations (reservations, usage records, closes) decided and written per group commit.",
    )
    request_concurrency: int = Field(default=256, ge=1, description="Budget and report requests answered at once.")
    replica_id: str = Field(
        default_factory=_replica_id,
        min_length=1,
        max_length=200,
        description="This replica's name in the partition leases. Default: host, pid and a random suffix.",
    )
    lease_ttl_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A budget partition's lease lapses this long after its owner last renewed it.",
    )
    lease_renew_seconds: float = Field(
        default=2.0, gt=0, description="How often leases are renewed and partitions shared out among replicas."
    )
    task_idle_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A task untouched this long, holding nothing, is forgotten from memory (read again if needed).",
    )
    fault_pause_at: str | None = Field(
        default=None,
        description=f"Tests only: stop forever at this point of the group commit, one of {', '.join(FAULT_POINTS)}.",
    )
    fault_marker_dir: Path | None = Field(
        default=None, description="Tests only: where a file named after the fault point is written when reached."
    )
