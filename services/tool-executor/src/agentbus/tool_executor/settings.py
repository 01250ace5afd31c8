"""tool-executor settings, from AGENTBUS_EXECUTOR_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

FAULT_POINTS = (
    "call_published",
    "decision_committed",
    "effect_applied",
    "execution_finished",
    "execution_committed",
    "call_before_ack",
    "decision_before_ack",
)
"""Where `fault_pause_at` can stop the executor (see service/faults.py)."""


class ExecutorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_EXECUTOR_", extra="ignore", frozen=True)

    # Each call or decision spends most of its time waiting: on the group commits of the store and on stream
    # acks. More of them in flight keep each commit full; the consumers' max_ack_pending is 256.
    consumer_concurrency: int = Field(default=256, ge=1, description="Messages handled at once per consumer.")
    fetch_batch: int = Field(default=64, ge=1, description="Messages pulled per fetch request.")
    tools_dir: Path = Field(default=Path("tools"), description="Folder of tool definition files (*.yaml).")
    database_url: str = Field(
        default="sqlite+aiosqlite:///.agentbus/tool-executor.db",
        description="Approvals, execution ledger, audit and tickets: SQLite by default, postgresql+asyncpg://... "
        "in production. A SQLite file's folder is created.",
    )
    approvers_file: Path = Field(
        default=Path("config/approvers.yaml"), description="Approver groups per tenant (YAML)."
    )
    expiry_sweep_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often to expire overdue approvals, resume executions a stopped executor left, and "
        "re-publish updates whose publish was interrupted.",
    )
    execution_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="An execution's claim lasts this long and is renewed while the tool runs; a claim left by a "
        "stopped executor is taken over after it lapses.",
    )
    max_running_tools: int = Field(
        default=64,
        ge=1,
        description="Tools running at once in this executor (shell commands are processes); calls and decisions "
        "beyond it wait for a slot before their tool starts.",
    )
    request_concurrency: int = Field(default=16, ge=1, description="Approvals-list requests answered at once.")
    fault_pause_at: str | None = Field(
        default=None,
        description=f"Tests only: stop forever at this point ({', '.join(FAULT_POINTS)}) so a test can kill the "
        "process there. Never set in a deployment.",
    )
    fault_marker_dir: Path | None = Field(
        default=None, description="Tests only: where a file named after the fault point is written when reached."
    )
