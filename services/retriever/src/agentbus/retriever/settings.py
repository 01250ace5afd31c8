"""retriever settings, from AGENTBUS_RETRIEVER_* environment variables."""

from __future__ import annotations

import os
from typing import Literal

from agentbus.contracts.rag import MAX_TOP_K
from agentbus.runtime.settings import ServiceSettings
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

MAX_DEFAULT_EMBEDDING_PROCESSES = 8


class RetrieverSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_RETRIEVER_", extra="ignore", frozen=True)

    milvus_uri: str = Field(
        default=".agentbus/milvus.db",
        description="A Milvus Lite file (a path ending in .db) or a Milvus server URI (http://host:19530).",
    )
    milvus_token: str | None = Field(default=None, description="Milvus server token ('user:password' or an API key).")
    collection: str = Field(
        default="agentbus_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="The one chunk collection."
    )
    embedding_backend: Literal["minilm", "openai"] = Field(
        default="minilm",
        description="'minilm': the packaged all-MiniLM-L6-v2 on CPU; 'openai': POST {embedding_url}/embeddings.",
    )
    embedding_url: str | None = Field(
        default=None, description="openai backend: base URL of an OpenAI-compatible API, e.g. http://vllm:8000/v1."
    )
    embedding_model: str = Field(default="all-MiniLM-L6-v2", description="openai backend: the model name to send.")
    embedding_api_key: str | None = Field(default=None, description="openai backend: bearer token, if required.")
    embedding_dimension: int | None = Field(
        default=None, ge=1, description="openai backend: vector size; probed with one request when unset."
    )
    embedding_batch_size: int = Field(
        default=16, ge=1, le=2048, description="Texts per forward pass (minilm) or per request (openai)."
    )
    embedding_processes: int | None = Field(
        default=None,
        ge=0,
        description="minilm backend: worker processes for forward passes; unset: one per core; 0: threads here.",
    )
    embedding_timeout_seconds: float = Field(default=60.0, gt=0, description="openai backend: per request.")
    chunk_chars: int = Field(default=1000, ge=100, description="Longest chunk, in characters.")
    chunk_overlap_chars: int = Field(default=150, ge=0, description="Characters shared by neighbouring chunks.")
    max_document_bytes: int = Field(default=1_000_000, ge=1, description="Largest document text, in UTF-8 bytes.")
    max_top_k: int = Field(default=MAX_TOP_K, ge=1, le=MAX_TOP_K, description="Largest top_k a search may ask.")
    tenants: str = Field(
        default="",
        description="Comma-separated allow-list of tenants. Empty: any tenant may ingest; search needs documents.",
    )
    candidates_per_k: int = Field(
        default=4, ge=1, le=20, description="Hybrid search: each of dense and BM25 proposes top_k * this many."
    )
    hybrid_dense_weight: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="Hybrid search: the dense list's share of the fused (min-max normalised) score.",
    )
    rerank_url: str | None = Field(
        default=None,
        description="Base URL of a rerank endpoint (POST {rerank_url}/rerank, e.g. vLLM); unset: no re-ranking.",
    )
    rerank_model: str = Field(default="", description="The re-ranking model name to send.")
    rerank_api_key: str | None = Field(default=None, description="Bearer token of the rerank endpoint, if any.")
    rerank_candidates: int = Field(
        default=20, ge=1, le=200, description="First-stage chunks the re-ranker re-orders (at least top_k)."
    )
    rerank_timeout_seconds: float = Field(default=10.0, gt=0, description="Per re-ranking request.")
    query_cache_size: int = Field(default=4096, ge=0, description="Query embeddings kept (LRU); 0 keeps none.")
    search_concurrency: int = Field(default=64, ge=1, description="Searches handled at once.")
    index_threads: int = Field(default=16, ge=1, description="Threads running Milvus calls off the event loop.")
    milvus_flush_delay_seconds: float = Field(
        default=0.5,
        ge=0.0,
        description="Milvus Lite: seal writes into an indexed segment this long after them (a server seals itself).",
    )

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> RetrieverSettings:
        if self.chunk_overlap_chars >= self.chunk_chars:
            raise ValueError("chunk_overlap_chars must be smaller than chunk_chars")
        if self.embedding_backend == "openai" and not self.embedding_url:
            raise ValueError("embedding_backend 'openai' needs embedding_url")
        return self

    @property
    def embedding_process_count(self) -> int:
        """Worker processes of the minilm backend: unless set, one per core this process may run on, at most
        `MAX_DEFAULT_EMBEDDING_PROCESSES` (a container sees the node's cores, not its CPU limit: set it there).
        """
        if self.embedding_processes is not None:
            return self.embedding_processes
        return min(len(os.sched_getaffinity(0)), MAX_DEFAULT_EMBEDDING_PROCESSES)

    @property
    def tenant_allow_list(self) -> frozenset[str] | None:
        """The configured tenants, or None when any tenant is allowed."""
        names = frozenset(t.strip() for t in self.tenants.split(",") if t.strip())
        return names or None
