"""Embeddings from an OpenAI-compatible endpoint (`POST {base_url}/embeddings`), such as vLLM serving an
embedding model. Vectors are L2-normalised here, so cosine search behaves the same with any backend."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import numpy as np
from agentbus.retriever.ports import EmbeddingError
from numpy.typing import NDArray

DIMENSION_PROBE = "dimension probe"


class OpenAIEmbedder:
    """The `Embedder` port over an OpenAI-compatible embeddings API."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        dimension: int | None = None,
        batch_size: int = 64,
        timeout_seconds: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_seconds, transport=transport
        )
        self._model = model
        self._dimension = dimension
        self._batch_size = batch_size

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            raise RuntimeError("dimension unknown before start()")
        return self._dimension

    @property
    def model(self) -> str:
        return self._model

    async def start(self) -> None:
        if self._dimension is None:
            self._dimension = int((await self._request([DIMENSION_PROBE])).shape[1])

    async def close(self) -> None:
        await self._client.aclose()

    async def embed_documents(self, texts: Sequence[str]) -> NDArray[np.float32]:
        batches = [await self._request(texts[i : i + self._batch_size]) for i in range(0, len(texts), self._batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, self.dimension), dtype=np.float32)

    async def embed_query(self, text: str) -> NDArray[np.float32]:
        vectors = await self._request([text])
        first: NDArray[np.float32] = vectors[0]
        return first

    async def _request(self, texts: Sequence[str]) -> NDArray[np.float32]:
        try:
            response = await self._client.post("embeddings", json={"model": self._model, "input": list(texts)})
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"embeddings endpoint unreachable: {exc!r}", retryable=True) from exc
        if response.status_code >= 400:
            retryable = response.status_code in (408, 429) or response.status_code >= 500
            raise EmbeddingError(
                f"embeddings endpoint answered {response.status_code}: {response.text[:300]}", retryable=retryable
            )
        try:
            items = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.array([item["embedding"] for item in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"embeddings endpoint sent an unexpected body: {exc!r}", retryable=False) from exc
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise EmbeddingError(f"expected {len(texts)} embeddings, got shape {vectors.shape}", retryable=False)
        if self._dimension is not None and vectors.shape[1] != self._dimension:
            raise EmbeddingError(f"expected {self._dimension}-d embeddings, got {vectors.shape[1]}", retryable=False)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit
