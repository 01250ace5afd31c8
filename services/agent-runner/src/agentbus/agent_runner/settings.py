"""agent-runner settings, from AGENTBUS_RUNNER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RunnerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_RUNNER_", extra="ignore", frozen=True)

    agents_dir: Path = Field(default=Path("agents"), description="Folder of agent spec YAML files.")
    tools_dir: Path = Field(
        default=Path("tools"),
        description="Folder of the tool-executor's tool YAML files, offered to agents that name them. May be absent.",
    )
    guardrails_file: Path = Field(
        default=Path("config/guardrails.yaml"),
        description="Guardrail policies that agents name in `guardrails:`. Absent: no policies, and no agent may "
        "name one.",
    )
    routing_file: Path = Field(
        default=Path("config/models.yaml"),
        description="Model routing table (deployments, weights, fallbacks). Absent: every model routes to itself.",
    )
    budgets_enabled: bool = Field(
        default=True,
        description="Reserve each call's cost with the cost-accountant first, and price finished runs. "
        "Off: nothing is reserved and `cost_usd` is 0.",
    )
    budget_timeout_seconds: float = Field(default=2.0, gt=0, description="How long to wait for the accountant.")
    cost_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        le=30,
        description="How long the accountant may wait for a finishing run's last usage records before pricing it.",
    )
    default_deadline_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Deadline of a task whose submission and agent name none: then it fails deadline_exceeded.",
    )
    redrive_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A run still waiting on the same step this long has it published again (then at doubling "
        "intervals up to an hour): nothing depends on a redelivery arriving.",
    )
    request_concurrency: int = Field(default=16, ge=1, description="Replay requests answered at once.")
    memory_dir: Path = Field(
        default=Path("memory"),
        description="Folder of memory store YAML files (`memory/*.yaml`) that agents name for their sessions and "
        "long-term memory. May be absent: then no agent may name one.",
    )
    memory_timeout_seconds: float = Field(
        default=5.0, gt=0, description="How long to wait for the retriever on a remember or recall."
    )
