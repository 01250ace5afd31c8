"""inference-worker settings, from AGENTBUS_WORKER_* environment variables."""

from __future__ import annotations

import re
from typing import Any, Literal

from agentbus.contracts.common import ID_PATTERN
from agentbus.contracts.registry import DEFAULT_MODELS
from agentbus.runtime.settings import ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

CPU_NODE_CLASS = "cpu"


class WorkerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_WORKER_", extra="ignore", frozen=True)

    engine: Literal["scripted", "openai", "vllm"] = Field(
        default="scripted",
        description=(
            "Which engine generates: 'scripted' (the offline engine for demos and tests, not an LLM), 'openai' "
            "(any OpenAI-compatible server) or 'vllm' (vLLM in this process; needs vllm installed and a GPU)."
        ),
    )
    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        min_length=1,
        description="Model subject tokens this worker serves (agentbus.llm.requests.<model>), e.g. '[\"llama-3-8b\"]'.",
    )
    max_concurrency: int = Field(
        default=64, ge=1, description="Requests in flight at once per model: what a batching engine batches."
    )
    request_timeout_seconds: float = Field(
        default=300.0, gt=0, description="Longest one generation may take; then an error result with code 'timeout'."
    )
    node_class: str | None = Field(
        default=None,
        description=(
            "The node class this worker runs on, priced per GPU-hour by the cost accountant (e.g. 'nvidia-l4'). "
            "When set to anything but 'cpu', results and usage carry each request's share of the GPU's time."
        ),
    )
    token_flush_chars: int = Field(
        default=48, ge=1, description="Streaming: publish a token chunk once this many characters are buffered."
    )
    token_flush_interval_seconds: float = Field(
        default=0.075, gt=0, description="Streaming: publish buffered text at least this often."
    )
    openai_base_url: str | None = Field(
        default=None, description="openai engine: the server's API root, e.g. 'http://vllm:8000/v1'."
    )
    openai_api_key: SecretStr | None = Field(default=None, description="openai engine: bearer token, if needed.")
    openai_model: str | None = Field(
        default=None, description="openai engine: model name sent to the server (default: the subject's model)."
    )
    max_retries: int = Field(
        default=3, ge=0, le=20, description="openai engine: retries of a 429/5xx/connection failure per attempt."
    )
    vllm_model: str | None = Field(
        default=None, description="vllm engine: model id or local path, e.g. 'Qwen/Qwen2.5-7B-Instruct'."
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm engine: extra AsyncEngineArgs as JSON, e.g. '{\"max_model_len\": 8192}'.",
    )
    vllm_tool_parser: str | None = Field(
        default=None, description="vllm engine: vLLM tool-call parser for the model family, e.g. 'hermes'."
    )
    scripted_token_delay_seconds: float = Field(
        default=0.0, ge=0, description="scripted engine only: simulated time per generated token."
    )

    @field_validator("models")
    @classmethod
    def _models_are_subject_tokens(cls, models: list[str]) -> list[str]:
        for model in models:
            if not re.fullmatch(ID_PATTERN, model):
                raise ValueError(f"model {model!r} is not a subject token ({ID_PATTERN})")
        if len(set(models)) != len(models):
            raise ValueError("a model is listed twice")
        return models

    @model_validator(mode="after")
    def _engine_has_what_it_needs(self) -> WorkerSettings:
        if self.engine == "openai" and not self.openai_base_url:
            raise ValueError("engine 'openai' needs AGENTBUS_WORKER_OPENAI_BASE_URL")
        if self.engine == "vllm" and not self.vllm_model:
            raise ValueError("engine 'vllm' needs AGENTBUS_WORKER_VLLM_MODEL")
        return self

    @property
    def meters_gpu(self) -> bool:
        """Whether results and usage carry GPU-seconds: the worker runs on an accelerator node class."""
        return self.node_class is not None and self.node_class != CPU_NODE_CLASS
