"""The optional re-ranking stage: the rerank endpoint adapter against a real HTTP server, and the service
re-ordering first-stage hits with it, or keeping their order when it fails."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from agentbus.retriever.adapters.rerank_endpoint import RerankEndpoint
from agentbus.retriever.ports import ChunkRow, Hit, RerankError
from agentbus.retriever.service import RetrieverMetrics, RetrieverPolicy, RetrieverService
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry


class _RerankHandler(BaseHTTPRequestHandler):
    status = 200
    body: bytes | None = None
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **request})
        # A toy relevance: how many query words a document contains; results deliberately out of order.
        words = set(request["query"].lower().split())
        results = [
            {"index": i, "relevance_score": float(len(words & set(d.lower().split())))}
            for i, d in enumerate(request["documents"])
        ]
        payload = type(self).body or json.dumps({"results": list(reversed(results))}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def rerank_url() -> Iterator[str]:
    _RerankHandler.status, _RerankHandler.body, _RerankHandler.requests = 200, None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RerankHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


class _Embedder:
    dimension, model = 3, "fake"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def embed_documents(self, texts: Sequence[str]) -> NDArray[np.float32]:
        return np.ones((len(texts), 3), dtype=np.float32)

    async def embed_query(self, text: str) -> NDArray[np.float32]:
        return np.ones(3, dtype=np.float32)


class _Index:
    def __init__(self, hits: list[Hit]) -> None:
        self.hits = hits
        self.limits: list[int] = []

    async def upsert(self, rows: Sequence[ChunkRow]) -> None:
        return None

    async def delete(self, expression: str) -> int:
        return 0

    async def search_dense(self, vector: Sequence[float], expression: str, limit: int) -> list[Hit]:
        self.limits.append(limit)
        return self.hits[:limit]

    async def search_bm25(self, terms: str, expression: str, limit: int) -> list[Hit]:
        return await self.search_dense([], expression, limit)

    async def has_any(self, expression: str) -> bool:
        return bool(self.hits)

    async def close(self) -> None:
        return None


def _hit(document_id: str, text: str, score: float) -> Hit:
    return Hit(tenant="acme", document_id=document_id, chunk_index=0, text=text, score=score, metadata={})


HITS = [
    _hit("first", "an unrelated page", 0.9),
    _hit("second", "kettle descaling", 0.8),
    _hit("third", "how to descale a kettle with vinegar", 0.7),
]


async def test_the_endpoint_scores_every_text_in_order(rerank_url: str) -> None:
    reranker = RerankEndpoint(rerank_url, "a-cross-encoder", api_key="secret")
    try:
        scores = await reranker.rerank("descale kettle vinegar", [h.text for h in HITS])
    finally:
        await reranker.close()
    assert scores == [0.0, 1.0, 3.0]
    [request] = _RerankHandler.requests
    assert request["path"] == "/v1/rerank"
    assert request["auth"] == "Bearer secret"
    assert request["model"] == "a-cross-encoder"
    assert request["documents"] == [h.text for h in HITS]


@pytest.mark.parametrize(("status", "body"), [(503, b"overloaded"), (200, b'{"results": [{"index": 7}]}')])
async def test_endpoint_failures_are_rerank_errors(rerank_url: str, status: int, body: bytes) -> None:
    _RerankHandler.status, _RerankHandler.body = status, body
    reranker = RerankEndpoint(rerank_url, "m")
    try:
        with pytest.raises(RerankError):
            await reranker.rerank("q", ["a", "b"])
    finally:
        await reranker.close()


async def test_the_service_reorders_candidates_and_keeps_its_order_when_the_reranker_fails(rerank_url: str) -> None:
    index = _Index(HITS)
    metrics = RetrieverMetrics(CollectorRegistry())
    policy = RetrieverPolicy(
        chunk_chars=200,
        chunk_overlap_chars=20,
        max_document_bytes=10_000,
        max_top_k=10,
        tenant_allow_list=None,
        rerank_candidates=3,
    )
    reranker = RerankEndpoint(rerank_url, "m")
    service = RetrieverService(_Embedder(), index, policy, metrics, reranker)
    request = json.dumps({"tenant": "acme", "query": "descale kettle vinegar", "top_k": 2, "mode": "dense"})
    try:
        reranked = (await service.search(request.encode(), "acme")).reply
        assert [(c.document_id, c.score) for c in reranked.chunks] == [("third", 3.0), ("second", 1.0)]
        assert index.limits == [3]  # the re-ranker saw rerank_candidates chunks, the reply has top_k
        _RerankHandler.status, _RerankHandler.body = 500, b"down"
        fallback = (await service.search(request.encode(), "acme")).reply
    finally:
        await reranker.close()
    assert fallback.error is None
    assert [c.document_id for c in fallback.chunks] == ["first", "second"]
    assert metrics.rerank_failures._value.get() == 1
