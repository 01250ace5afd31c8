"""Re-ranking by an HTTP endpoint of the shape vLLM, Jina and Cohere serve: `POST {base_url}/rerank` with
`{model, query, documents}`, answered with `{results: [{index, relevance_score}]}`. Off unless configured:
no re-ranking model ships with the suite."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from agentbus.retriever.ports import RerankError


class RerankEndpoint:
    """The `Reranker` port over a rerank endpoint (e.g. a cross-encoder served by vLLM)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_seconds, transport=transport
        )
        self._model = model

    async def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        body = {"model": self._model, "query": query, "documents": list(texts), "top_n": len(texts)}
        try:
            response = await self._client.post("rerank", json=body)
        except httpx.HTTPError as exc:
            raise RerankError(f"rerank endpoint unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise RerankError(f"rerank endpoint answered {response.status_code}: {response.text[:300]}")
        scores: list[float | None] = [None] * len(texts)
        try:
            for item in response.json()["results"]:
                scores[int(item["index"])] = float(item["relevance_score"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise RerankError(f"rerank endpoint sent an unexpected body: {exc!r}") from exc
        if any(score is None for score in scores):
            raise RerankError(f"rerank endpoint scored {sum(s is not None for s in scores)} of {len(texts)} texts")
        return [float(score) for score in scores if score is not None]

    async def close(self) -> None:
        await self._client.aclose()
