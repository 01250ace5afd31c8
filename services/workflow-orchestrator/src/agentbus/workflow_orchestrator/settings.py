"""workflow-orchestrator settings, from AGENTBUS_ORCHESTRATOR_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_ORCHESTRATOR_", extra="ignore", frozen=True)

    workflows_dir: Path = Field(
        default=Path("workflows"), description="Folder of workflow spec YAML files. May be absent (no workflows)."
    )
    agents_dir: Path = Field(
        default=Path("agents"), description="Folder of the runner's agent specs: the agents a step may name."
    )
    request_concurrency: int = Field(default=16, ge=1, description="Replay and list requests answered at once.")
