"""gateway settings, from AGENTBUS_GATEWAY_* environment variables."""

from __future__ import annotations

from pathlib import Path

from agentbus.contracts.registry import DEFAULT_MODELS
from agentbus.runtime.settings import ServiceSettings
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

MIN_SECRET_CHARACTERS = 32


class GatewaySettings(ServiceSettings):
    """Who may log in and as which NATS users the gateway acts for them, how sessions and tokens are signed,
    and where the operator pages read from."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_GATEWAY_", extra="ignore", frozen=True)

    identities_file: Path = Field(
        default=Path(".agentbus/identities.yaml"),
        description="Tenants with their submitters and approvers: the file `agentbus up` derives NATS users from.",
    )
    credentials_dir: Path = Field(
        default=Path(".agentbus/credentials"),
        description="One `<nats user>.json` ({user, password, inbox_prefix}) per NATS user the gateway acts as.",
    )
    session_secret: SecretStr | None = Field(
        default=None, description="Signs session cookies and API tokens (32 characters or more)."
    )
    session_secret_file: Path | None = Field(
        default=None, description="A file holding the signing secret, when session_secret is not set."
    )
    trusted_user_header: str | None = Field(
        default=None,
        description=(
            "A header set by an authenticating proxy in front of the gateway (oauth2-proxy: X-Forwarded-User) "
            "that names the identity. Only set it when nothing but the proxy can reach the gateway."
        ),
    )
    operators: list[str] = Field(
        default_factory=lambda: ["admin"],
        description=(
            "Identities that may see the cost and health pages (read with the gateway's own NATS user). "
            "`admin` logs in with the password of the NATS user admin."
        ),
    )
    service_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Each service's HTTP base URL, whose /readyz the health page shows (JSON object).",
    )
    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS), description="Models served: their consumers are shown too."
    )
    budgets_file: Path | None = Field(
        default=None, description="The cost-accountant's budgets file, for the limits drawn on the cost page."
    )
    secure_cookies: bool = Field(default=False, description="Send the session cookie over HTTPS only.")
    session_max_age_seconds: int = Field(default=12 * 3600, ge=60, description="How long a console login lasts.")
    token_max_age_seconds: int = Field(default=30 * 86400, ge=60, description="How long an API token is valid.")
    submit_wait_seconds: float = Field(
        default=5.0, ge=0, le=60, description="How long a submission waits for the runner's first event."
    )
    verdict_timeout_seconds: float = Field(
        default=15.0, gt=0, le=120, description="How long a decision waits for the tool-executor's verdict."
    )
    request_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="Timeout of each request to a service (replays, lists, reports)."
    )
    catch_up_seconds: float = Field(
        default=3.0, gt=0, le=60, description="With no live event for this long, a stream asks what it missed."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> GatewaySettings:
        if self.session_secret is None and self.session_secret_file is None:
            raise ValueError("set session_secret or session_secret_file")
        return self

    def signing_secret(self) -> str:
        """The secret that signs sessions and tokens: session_secret, else the content of session_secret_file."""
        if self.session_secret is not None:
            secret = self.session_secret.get_secret_value()
        else:
            assert self.session_secret_file is not None
            try:
                secret = self.session_secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"session_secret_file {self.session_secret_file}: {exc}") from exc
        if len(secret) < MIN_SECRET_CHARACTERS:
            raise ValueError(f"the signing secret must have at least {MIN_SECRET_CHARACTERS} characters")
        return secret
