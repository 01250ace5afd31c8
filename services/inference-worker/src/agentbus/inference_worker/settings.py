"""inference-worker settings, from AGENTBUS_WORKER_* environment variables."""

from __future__ import annotations

from typing import Literal

from agentbus.contracts.registry import DEFAULT_MODELS
from agentbus.runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class WorkerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_WORKER_", extra="ignore", frozen=True)

    engine: Literal["scripted"] = Field(
        default="scripted", description="Which engine generates: 'scripted' is the offline engine."
    )
    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS), description="Model routing names this worker serves."
    )
    max_concurrency: int = Field(default=64, ge=1, description="LLM requests in flight at once per model.")
    scripted_token_delay_seconds: float = Field(
        default=0.0, ge=0, description="Scripted engine only: simulated time per generated token."
    )
