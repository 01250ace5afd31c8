"""Settings every service shares. Each service subclasses with its own env prefix (AGENTBUS_<SERVICE>_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Connection, HTTP and shutdown settings. Built once at start-up and passed down, never read at import."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_", extra="ignore", frozen=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated.")
    nats_user: str | None = Field(default=None, description="NATS user, when the server requires one.")
    nats_password: str | None = Field(default=None, description="NATS password.")
    http_host: str = Field(default="127.0.0.1", description="Address of /healthz, /readyz and /metrics.")
    http_port: int = Field(default=0, ge=0, le=65535, description="Port of the HTTP endpoints; 0 picks one.")
    log_level: str = Field(default="INFO", description="Lowest level logged.")
    drain_timeout_seconds: float = Field(
        default=20.0, gt=0, description="On SIGTERM, how long in-flight messages may take to finish."
    )
    consumer_concurrency: int = Field(default=64, ge=1, description="Messages handled at once per consumer.")
    fetch_batch: int = Field(default=64, ge=1, description="Messages pulled per fetch request.")
