"""agent-runner settings, from AGENTBUS_RUNNER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RunnerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_RUNNER_", extra="ignore", frozen=True)

    agents_dir: Path = Field(default=Path("agents"), description="Folder of agent spec YAML files.")
