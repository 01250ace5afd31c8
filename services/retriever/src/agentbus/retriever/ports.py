"""The retriever's ports: an embedding model, a vector index and an optional re-ranker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


class EmbeddingError(Exception):
    """The embedding backend failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Embedder(Protocol):
    """Turns texts into unit-length vectors of `dimension` floats, one row per text, in order."""

    @property
    def dimension(self) -> int: ...

    @property
    def model(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed_documents(self, texts: Sequence[str]) -> NDArray[np.float32]: ...

    async def embed_query(self, text: str) -> NDArray[np.float32]: ...


@dataclass(frozen=True)
class ChunkRow:
    """One chunk as stored: its key, owner, position, text, BM25 terms, vector, the document's metadata,
    and the submitter whose ingest message wrote it."""

    key: str
    tenant: str
    document_id: str
    chunk_index: int
    text: str
    terms: str
    vector: list[float]
    metadata: dict[str, Any]
    ingested_by: str


@dataclass(frozen=True)
class Hit:
    """A stored chunk that matched, with the engine's score (higher is better)."""

    tenant: str
    document_id: str
    chunk_index: int
    text: str
    score: float
    metadata: dict[str, Any]


class VectorIndex(Protocol):
    """Where chunks live. Every method takes an already-built filter expression that starts with the tenant."""

    async def upsert(self, rows: Sequence[ChunkRow]) -> None: ...

    async def delete(self, expression: str) -> int: ...

    async def search_dense(self, vector: Sequence[float], expression: str, limit: int) -> list[Hit]:
        """The `limit` chunks nearest to `vector` (cosine similarity as score), best first."""
        ...

    async def search_bm25(self, terms: str, expression: str, limit: int) -> list[Hit]:
        """The `limit` best chunks by BM25 for already analyzed, space-separated `terms`, best first."""
        ...

    async def has_any(self, expression: str) -> bool: ...

    async def close(self) -> None: ...


class RerankError(Exception):
    """The re-ranker failed; searches then keep the first stage's order."""


class Reranker(Protocol):
    """Scores how well each text answers the query (higher is better), one score per text, in order."""

    async def rerank(self, query: str, texts: Sequence[str]) -> list[float]: ...

    async def close(self) -> None: ...
