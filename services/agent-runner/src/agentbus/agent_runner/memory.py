"""Memory stores: YAML files in `memory/` declaring where sessions live and how their history is kept.

One file per store; agents name theirs (`memory: <name>`). A file looks like::

    name: conversations
    type: nats-kv                  # nats-kv (embedded default) | redis | postgres
    ttl_seconds: 86400             # an idle session is forgotten this long after its last change
    max_history: {messages: 50}    # or {tokens: 8000}: the oldest turns beyond it are dropped
    on_busy: queue                 # queue | reject: a task of a session that runs another one waits, or is
                                   # rejected `session_busy`
    compression:                   # past `threshold` (in max_history's unit), the oldest turns become a summary
      threshold: 20
      keep_recent: 6               # the newest turns kept verbatim, in the same unit
      model: scripted              # the model that summarizes (an LLM step of the task: costed, budgeted, traced)
    long_term:                     # remember(fact) / recall(query) tools, through the retriever
      collection: memories         # a collection of its own, or `knowledge_base`: the tenant's documents
      per_user: true               # each submitter recalls only what was remembered in its own tasks
    redis: {url_env: AGENTBUS_REDIS_URL}          # type redis: the URL, or the variable that holds it
    postgres: {url_env: AGENTBUS_MEMORY_DATABASE_URL, table: agentbus_sessions}

A bad file stops start-up with a message naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from agentbus.contracts.common import Identifier
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.spec_files import load_spec, spec_files
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

KNOWLEDGE_BASE = "knowledge_base"
"""`long_term.collection` naming the tenant's own knowledge base rather than a memory collection of its own."""
StoreType = Literal["nats-kv", "redis", "postgres"]


class MemorySpecError(ConfigurationError):
    """A memory store file is invalid. The message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxHistory(_Strict):
    """How much history a session keeps: a number of messages or of (estimated) tokens, not both."""

    messages: int | None = Field(default=None, ge=1, le=100_000)
    tokens: int | None = Field(default=None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _one_unit(self) -> MaxHistory:
        if (self.messages is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'messages' or 'tokens'")
        return self

    @property
    def unit(self) -> Literal["messages", "tokens"]:
        return "messages" if self.messages is not None else "tokens"

    @property
    def limit(self) -> int:
        limit = self.messages if self.messages is not None else self.tokens
        assert limit is not None
        return limit


class Compression(_Strict):
    """Summarize the oldest turns once the history passes `threshold`, keeping `keep_recent` verbatim."""

    enabled: bool = True
    threshold: int = Field(ge=2, description="In the unit of max_history.")
    keep_recent: int = Field(ge=1, description="The newest history kept verbatim, in the unit of max_history.")
    model: Identifier = Field(description="The model that summarizes: an inference subject token.")
    max_summary_tokens: int = Field(default=512, ge=16, le=8192)

    @model_validator(mode="after")
    def _keep_less_than_threshold(self) -> Compression:
        if self.keep_recent >= self.threshold:
            raise ValueError("keep_recent must be below threshold, or nothing would ever be summarized")
        return self


class LongTerm(_Strict):
    """Long-term memory: facts an agent remembers and recalls across tasks, in the retriever."""

    enabled: bool = True
    collection: Identifier = Field(
        default="memories",
        description=f"A memory collection of the tenant, or `{KNOWLEDGE_BASE}`: the tenant's knowledge base itself.",
    )
    per_user: bool = Field(default=False, description="Each submitter recalls only what its own tasks remembered.")
    top_k: int = Field(default=5, ge=1, le=20, description="Facts a recall returns at most.")


class RedisConfig(_Strict):
    url: str | None = Field(default=None, pattern=r"^rediss?://", description="redis://host:port/db")
    url_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="A variable holding the URL (with a password)."
    )
    key_prefix: str = Field(default="agentbus:session", pattern=r"^[A-Za-z0-9_:.-]{1,64}$")

    @model_validator(mode="after")
    def _one_source(self) -> RedisConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of 'url' or 'url_env'")
        return self


class PostgresConfig(_Strict):
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://", description="postgresql://user@host/db")
    url_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    table: str = Field(default="agentbus_sessions", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    @model_validator(mode="after")
    def _one_source(self) -> PostgresConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of 'url' or 'url_env'")
        return self


class MemoryStoreSpec(_Strict):
    """A memory store: where its sessions live, how long, and how their history is bounded."""

    name: Identifier
    description: str = ""
    type: StoreType = "nats-kv"
    ttl_seconds: int = Field(default=86400, ge=1, le=365 * 86400)
    max_history: MaxHistory = Field(default_factory=lambda: MaxHistory(messages=50))
    on_busy: Literal["queue", "reject"] = "queue"
    compression: Compression | None = None
    long_term: LongTerm | None = None
    redis: RedisConfig | None = None
    postgres: PostgresConfig | None = None

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _settings_for_its_type(self) -> MemoryStoreSpec:
        if self.type == "redis" and self.redis is None:
            raise ValueError("type 'redis' needs a 'redis' block")
        if self.type == "postgres" and self.postgres is None:
            raise ValueError("type 'postgres' needs a 'postgres' block")
        for block in ("redis", "postgres"):
            if block != self.type and getattr(self, block) is not None:
                raise ValueError(f"type {self.type!r} takes no {block!r} block")
        compression = self.active_compression
        if compression is not None and compression.threshold > self.max_history.limit:
            raise ValueError("compression.threshold is above max_history: the history is cut before it is summarized")
        return self

    @property
    def active_compression(self) -> Compression | None:
        return self.compression if self.compression is not None and self.compression.enabled else None

    @property
    def active_long_term(self) -> LongTerm | None:
        return self.long_term if self.long_term is not None and self.long_term.enabled else None

    @property
    def source(self) -> Path | None:
        """The file the spec was read from, for error messages."""
        return self._source

    def connection_url(self) -> str:
        """The Redis or Postgres URL, from the file or from the variable it names (read now, at start-up)."""
        block: RedisConfig | PostgresConfig | None = self.redis if self.type == "redis" else self.postgres
        assert block is not None, "nats-kv stores connect through the runner's NATS connection"
        if block.url is not None:
            return block.url
        assert block.url_env is not None
        value = os.environ.get(block.url_env)
        if not value:
            raise MemorySpecError(f"{self.source}: field '{self.type}.url_env': variable {block.url_env} is not set")
        return value


def load_memory_specs(directory: Path) -> dict[str, MemoryStoreSpec]:
    """Every `*.yaml`/`*.yml` store in `directory`, by name; none when the folder does not exist."""
    if not directory.is_dir():
        return {}
    specs: dict[str, MemoryStoreSpec] = {}
    for path in spec_files(directory):
        spec = load_spec(path, MemoryStoreSpec, MemorySpecError)
        if spec.name in specs:
            raise MemorySpecError(f"{path}: field 'name': memory store {spec.name!r} is defined twice")
        spec._source = path
        specs[spec.name] = spec
    return specs
