"""Rules of the use cases, with fakes of the two ports."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from agentbus.contracts.rag import DocumentsIngest, IngestDocument
from agentbus.retriever.domain import ErrorCode, InputError
from agentbus.retriever.ports import ChunkRow, EmbeddingError, Hit
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
    def __init__(self, hits: list[Hit], bm25_hits: list[Hit] | None = None) -> None:
        self.hits = hits
        self.bm25_hits = hits if bm25_hits is None else bm25_hits
        self.rows: list[ChunkRow] = []
        self.expressions: list[str] = []
        self.bm25_terms: list[str] = []

    async def upsert(self, rows: Sequence[ChunkRow]) -> None:
        self.rows.extend(rows)

    async def delete(self, expression: str) -> int:
        self.expressions.append(expression)
        return 0

    async def search_dense(self, vector: Sequence[float], expression: str, limit: int) -> list[Hit]:
        self.expressions.append(expression)
        return self.hits[:limit]

    async def search_bm25(self, terms: str, expression: str, limit: int) -> list[Hit]:
        self.expressions.append(expression)
        self.bm25_terms.append(terms)
        return self.bm25_hits[:limit]

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


def _hit(tenant: str, document_id: str, score: float = 0.5) -> Hit:
    return Hit(tenant=tenant, document_id=document_id, chunk_index=0, text="t", score=score, metadata={})


def _search(tenant: str, **fields: object) -> bytes:
    return json.dumps({"tenant": tenant, "query": "q", **fields}).encode()


async def test_a_hit_of_another_tenant_never_reaches_the_reply() -> None:
    index = FakeIndex([_hit("acme", "mine"), _hit("globex", "theirs"), _hit("acme", "also-mine")])
    service, metrics = _service(index)
    for mode, searches in (("dense", 1), ("bm25", 1), ("hybrid", 2)):
        index.expressions.clear()
        outcome = await service.search(_search("acme", mode=mode), "acme")
        assert {c.document_id for c in outcome.reply.chunks} == {"mine", "also-mine"}, mode
        assert index.expressions == ['tenant == "acme"'] * searches
    assert metrics.foreign_hits._value.get() == 3


async def test_tenants_outside_the_allow_list_are_unknown() -> None:
    service, _ = _service(FakeIndex([_hit("acme", "d")]), tenants=frozenset({"acme"}))
    refused = await service.search(_search("globex"), "globex")
    assert refused.reply.error is not None
    assert refused.reply.error.code == ErrorCode.UNKNOWN_TENANT
    with pytest.raises(InputError) as raised:
        await service.ingest(
            DocumentsIngest(tenant="globex", documents=[IngestDocument(id="a", text="x")]), "globex", "app"
        )
    assert raised.value.code == ErrorCode.UNKNOWN_TENANT
    assert (await service.search(_search("acme"), "acme")).reply.error is None


async def test_embedding_failures_retry_ingestion_and_fail_searches_clearly() -> None:
    embedder = FakeEmbedder(EmbeddingError("endpoint down", retryable=True))
    index = FakeIndex([_hit("acme", "d")])
    service, _ = _service(index, embedder=embedder)
    with pytest.raises(RetryableError):
        await service.ingest(
            DocumentsIngest(tenant="acme", documents=[IngestDocument(id="a", text="x")]), "acme", "app"
        )
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
        DocumentsIngest(tenant="acme", documents=[IngestDocument(id="d", text=text)]), "acme", "kb-app"
    )
    assert outcome.chunks == len(index.rows) > 1
    assert {r.ingested_by for r in index.rows} == {"kb-app"}
    assert index.rows[0].terms.split()[:3] == ["sentenc", "about", "topic"]
    assert [r.chunk_index for r in index.rows] == list(range(outcome.chunks))
    assert len({r.key for r in index.rows}) == outcome.chunks
    assert index.expressions == [f'tenant == "acme" and ((document_id == "d" and chunk_index >= {outcome.chunks}))']


async def test_a_bad_submitter_token_writes_nothing() -> None:
    index = FakeIndex([])
    service, _ = _service(index)
    message = DocumentsIngest(tenant="acme", documents=[IngestDocument(id="d", text="text")])
    for submitter in ("", "a.b", "x" * 65, "*"):
        with pytest.raises(InputError) as raised:
            await service.ingest(message, "acme", submitter)
        assert raised.value.code == ErrorCode.INVALID_SUBMITTER
    assert index.rows == []


async def test_hybrid_fuses_both_lists_and_bm25_gets_analyzed_terms() -> None:
    dense = [_hit("acme", "semantic", 0.9), _hit("acme", "both", 0.8), _hit("acme", "weak", 0.2)]
    bm25 = [_hit("acme", "lexical", 12.0), _hit("acme", "both", 11.0)]
    index = FakeIndex(dense, bm25)
    service, _ = _service(index)
    reply = (await service.search(_search("acme", query="How are the indexes rebuilt?", top_k=3), "acme")).reply
    # "both" is near the top of both lists, so it beats either list's single best hit.
    assert [c.document_id for c in reply.chunks] == ["both", "semantic", "lexical"]
    assert index.bm25_terms == ["index rebuilt"]


async def test_a_query_of_stop_words_alone_searches_dense_only() -> None:
    index = FakeIndex([_hit("acme", "d")])
    service, _ = _service(index)
    hybrid = (await service.search(_search("acme", query="what is the"), "acme")).reply
    assert [c.document_id for c in hybrid.chunks] == ["d"]
    assert index.bm25_terms == []
    bm25 = (await service.search(_search("acme", query="what is the", mode="bm25"), "acme")).reply
    assert bm25.error is None
    assert bm25.chunks == []
