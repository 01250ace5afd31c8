"""trace-exporter settings, from AGENTBUS_TRACES_* environment variables."""

from __future__ import annotations

import re
from pathlib import Path

from agentbus.runtime.settings import ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

DEFAULT_REDACT_PATTERNS: tuple[str, ...] = (
    # Bearer tokens and key-like assignments ("api_key=...", "password: ...").
    r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}",
    r"(?i)\b(api[_-]?key|secret|password|passwd|token|authorization)\b[\"']?\s*[:=]\s*[\"']?[^\s\"',;]{4,}",
    # Well-known credential shapes: OpenAI-style and Langfuse keys, AWS access key ids, GitHub tokens.
    r"\b(sk|pk)-[A-Za-z0-9_-]{16,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",
)


class TraceExporterSettings(ServiceSettings):
    """Where traces go (a JSONL file by default, Langfuse over OTLP/HTTP when configured) and how."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_TRACES_", extra="ignore", frozen=True)

    jsonl_path: Path = Field(
        default=Path(".agentbus/traces.jsonl"),
        description="File that spans are appended to, one JSON object per line, when no OTLP endpoint is set.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description=(
            "OTLP/HTTP base URL, e.g. http://langfuse:3000/api/public/otel ('/v1/traces' is appended). "
            "None: write the JSONL file only."
        ),
    )
    langfuse_public_key: str | None = Field(default=None, description="Langfuse public key (basic auth user).")
    langfuse_secret_key: SecretStr | None = Field(
        default=None, description="Langfuse secret key (basic auth password)."
    )
    otlp_timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of one export request.")
    otlp_gzip: bool = Field(default=True, description="Send export requests gzip-compressed (Content-Encoding: gzip).")
    redact_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_PATTERNS),
        description="Regular expressions whose matches in exported text are replaced by [REDACTED] (JSON list).",
    )
    max_field_chars: int = Field(default=4000, ge=64, description="Inputs, outputs and text attributes are cut here.")
    batch_size: int = Field(default=200, ge=1, le=5000, description="Spans per export request.")
    flush_interval_seconds: float = Field(
        default=1.0, gt=0, description="Longest a span waits for its batch to fill before it is exported."
    )
    max_backoff_seconds: float = Field(
        default=60.0, gt=0, description="Cap of the exponential backoff while the trace backend is down."
    )
    first_backoff_seconds: float = Field(default=0.5, gt=0, description="First retry delay after a failed export.")
    ledger_path: Path = Field(
        default=Path(".agentbus/trace-exporter-ledger.sqlite3"),
        description=(
            "SQLite file of the exported-span ledger when no database_url is set: enough for exporters on one "
            "machine (they may share it)."
        ),
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy async URL of the exported-span ledger shared by every replica, e.g. "
            "postgresql+asyncpg://user:password@host:5432/trace_exporter. None: the SQLite file at ledger_path."
        ),
    )
    claim_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How long a replica's claim on the spans it exports lasts unless renewed (before each retry); after "
            "a crash, another replica takes the spans over once it lapsed. At least twice otlp_timeout_seconds."
        ),
    )
    claim_recheck_seconds: float = Field(
        default=1.0, gt=0, description="How often a span another replica is exporting is looked at again."
    )
    ledger_retention_hours: float = Field(
        default=8 * 24.0,
        gt=0,
        description="How long exported ids are remembered; longer than the 7 days AGENTBUS_SPANS keeps spans.",
    )
    environment: str | None = Field(default=None, description="Langfuse environment of exported spans, if any.")

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return patterns

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> TraceExporterSettings:
        if (self.langfuse_public_key is None) != (self.langfuse_secret_key is None):
            raise ValueError("set both langfuse_public_key and langfuse_secret_key, or neither")
        if self.first_backoff_seconds > self.max_backoff_seconds:
            raise ValueError("first_backoff_seconds must not exceed max_backoff_seconds")
        if self.claim_lease_seconds < 2 * self.otlp_timeout_seconds:
            # A claim renewed just before a request must still hold when the request times out.
            raise ValueError("claim_lease_seconds must be at least twice otlp_timeout_seconds")
        return self

    @property
    def ledger_url(self) -> str:
        """The exported-span ledger's database: database_url, or the SQLite file at ledger_path."""
        return self.database_url or f"sqlite+aiosqlite:///{self.ledger_path}"
