"""cost-accountant settings, from AGENTBUS_ACCOUNTANT_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


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
    ingest_max_batch: int = Field(default=500, ge=1, le=1000, description="Most usage records per transaction.")
    request_concurrency: int = Field(default=64, ge=1, description="Budget and report requests answered at once.")
