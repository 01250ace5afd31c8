"""Rules of the use cases, with fakes of the two ports."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from agentbus.contracts.rag import DocumentsIngest, IngestDocument
from agentbus.retriever.domain import ErrorCode, InputError
from agentbus.retriever.ports import ChunkRow, EmbeddingError, Hit, SearchMode
from agentbus.retriever.service import RetrieverMetrics, RetrieverPolicy, RetrieverService
from agentbus.runtime.errors import RetryableError
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry


class FakeEmbedder:
    def __init__(self, fail: EmbeddingError | None = None) -> None:
        self.fail = fail

    @property
    def dimension(self) -> int:
        return 3

    @property
    def model(self) -> str:
        return "fake"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def embed_documents(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if self.fail:
            raise self.fail
        return np.ones((len(texts), 3), dtype=np.float32)

    async def embed_query(self, text: str) -> NDArray[np.float32]:
        if self.fail:
            raise self.fail
        return np.ones(3, dtype=np.float32)


class FakeIndex:
    def __init__(self, hits: list[Hit]) -> None:
        self.hits = hits
        self.rows: list[ChunkRow] = []
        self.expressions: list[str] = []

    async def upsert(self, rows: Sequence[ChunkRow]) -> None:
        self.rows.extend(rows)

    async def delete(self, expression: str) -> int:
        self.expressions.append(expression)
        return 0

    async def search(
        self, *, mode: SearchMode, query: str, vector: Sequence[float], expression: str, limit: int
    ) -> list[Hit]:
        self.expressions.append(expression)
        return self.hits[:limit]

    async def has_any(self, expression: str) -> bool:
        return bool(self.hits)

    async def close(self) -> None:
        return None


def _service(
    index: FakeIndex, *, embedder: FakeEmbedder | None = None, tenants: frozenset[str] | None = None
) -> tuple[RetrieverService, RetrieverMetrics]:
    metrics = RetrieverMetrics(CollectorRegistry())
    policy = RetrieverPolicy(
        chunk_chars=200, chunk_overlap_chars=20, max_document_bytes=10_000, max_top_k=10, tenant_allow_list=tenants
    )
    return RetrieverService(embedder or FakeEmbedder(), index, policy, metrics), metrics


def _hit(tenant: str, document_id: str) -> Hit:
    return Hit(tenant=tenant, document_id=document_id, chunk_index=0, text="t", score=0.5, metadata={})


def _search(tenant: str, **fields: object) -> bytes:
    return json.dumps({"tenant": tenant, "query": "q", **fields}).encode()


async def test_a_hit_of_another_tenant_never_reaches_the_reply() -> None:
    index = FakeIndex([_hit("acme", "mine"), _hit("globex", "theirs"), _hit("acme", "also-mine")])
    service, metrics = _service(index)
    outcome = await service.search(_search("acme"), "acme")
    assert [c.document_id for c in outcome.reply.chunks] == ["mine", "also-mine"]
    assert metrics.foreign_hits._value.get() == 1
    assert index.expressions == ['tenant == "acme"']


async def test_tenants_outside_the_allow_list_are_unknown() -> None:
    service, _ = _service(FakeIndex([_hit("acme", "d")]), tenants=frozenset({"acme"}))
    refused = await service.search(_search("globex"), "globex")
    assert refused.reply.error is not None
    assert refused.reply.error.code == ErrorCode.UNKNOWN_TENANT
    with pytest.raises(InputError) as raised:
        await service.ingest(DocumentsIngest(tenant="globex", documents=[IngestDocument(id="a", text="x")]), "globex")
    assert raised.value.code == ErrorCode.UNKNOWN_TENANT
    assert (await service.search(_search("acme"), "acme")).reply.error is None


async def test_embedding_failures_retry_ingestion_and_fail_searches_clearly() -> None:
    embedder = FakeEmbedder(EmbeddingError("endpoint down", retryable=True))
    index = FakeIndex([_hit("acme", "d")])
    service, _ = _service(index, embedder=embedder)
    with pytest.raises(RetryableError):
        await service.ingest(DocumentsIngest(tenant="acme", documents=[IngestDocument(id="a", text="x")]), "acme")
    assert index.rows == []
    outcome = await service.search(_search("acme"), "acme")
    assert outcome.reply.error is not None
    assert outcome.reply.error.code == "embedding_failed"
    bm25 = await service.search(_search("acme", mode="bm25"), "acme")
    assert bm25.reply.error is None  # BM25 needs no embedding


async def test_usage_is_recorded_only_for_answered_searches_with_a_request_id() -> None:
    service, _ = _service(FakeIndex([_hit("acme", "d")]))
    billed = await service.search(_search("acme", request_id="call-7", task_id="task-1"), "acme")
    assert billed.usage is not None
    assert billed.usage.usage_id == "retrieval:acme:call-7"
    assert (await service.search(_search("acme"), "acme")).usage is None
    assert (await service.search(_search("acme", request_id="call-8", top_k=11), "acme")).usage is None


async def test_ingestion_writes_every_chunk_with_stable_keys_then_trims_stale_ones() -> None:
    index = FakeIndex([])
    service, _ = _service(index)
    text = "Sentence about a topic. " * 40
    outcome = await service.ingest(
        DocumentsIngest(tenant="acme", documents=[IngestDocument(id="d", text=text)]), "acme"
    )
    assert outcome.chunks == len(index.rows) > 1
    assert [r.chunk_index for r in index.rows] == list(range(outcome.chunks))
    assert len({r.key for r in index.rows}) == outcome.chunks
    assert index.expressions == [f'tenant == "acme" and ((document_id == "d" and chunk_index >= {outcome.chunks}))']
