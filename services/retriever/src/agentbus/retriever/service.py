"""Use cases of the retriever: ingest documents, delete documents, search a tenant's chunks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.rag import DocumentsDelete, DocumentsIngest, RetrievedChunk, SearchReply, SearchRequest
from agentbus.contracts.usage import UsageRecorded
from agentbus.retriever.analysis import analyzed_text
from agentbus.retriever.domain import (
    ErrorCode,
    InputError,
    check_document_id,
    check_submitter,
    chunk_key,
    documents_filter,
    fuse,
    prepare_documents,
    search_filter,
    stale_chunks_filter,
    tenant_condition,
)
from agentbus.retriever.ports import ChunkRow, Embedder, EmbeddingError, Hit, Reranker, RerankError, VectorIndex
from agentbus.runtime.errors import RetryableError
from agentbus.runtime.logging import get_logger
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

_log = get_logger(__name__)

EMBEDDING_FAILED = "embedding_failed"
RETRIEVAL_TOOL = "retrieval"


@dataclass(frozen=True)
class RetrieverPolicy:
    """The limits and rules the settings choose."""

    chunk_chars: int
    chunk_overlap_chars: int
    max_document_bytes: int
    max_top_k: int
    tenant_allow_list: frozenset[str] | None
    candidates_per_k: int = 4
    """Hybrid search: dense and BM25 each propose top_k * this many chunks for fusion."""
    dense_weight: float = 0.75
    """Hybrid search: the dense list's share of the fused score (see `domain.fuse`)."""
    rerank_candidates: int = 20
    """With a re-ranker: how many first-stage chunks it re-orders (at least top_k)."""


@dataclass(frozen=True)
class IngestOutcome:
    documents: int
    chunks: int
    stale_chunks_deleted: int


@dataclass(frozen=True)
class SearchOutcome:
    reply: SearchReply
    usage: UsageRecorded | None
    request: SearchRequest | None
    """The decoded request; None when the payload was not a valid SearchRequest."""


class RetrieverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.searches = Counter(
            "agentbus_retrieval_searches_total",
            "Searches answered, by mode and outcome.",
            ["mode", "outcome"],
            registry=registry,
        )
        self.search_seconds = Histogram(
            "agentbus_retrieval_search_seconds",
            "Time to answer a search (embedding included).",
            ["mode"],
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.chunks_indexed = Counter(
            "agentbus_retrieval_chunks_indexed_total", "Chunks embedded and upserted.", registry=registry
        )
        self.rerank_failures = Counter(
            "agentbus_retrieval_rerank_failures_total",
            "Searches answered in first-stage order because the re-ranker failed.",
            registry=registry,
        )
        self.foreign_hits = Counter(
            "agentbus_retrieval_foreign_hits_dropped_total",
            "Hits of another tenant removed before replying (the index filter should make this 0).",
            registry=registry,
        )


def _validation_code(exc: ValidationError) -> str:
    fields = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
    for field, code in (
        ("top_k", ErrorCode.TOP_K_OUT_OF_RANGE),
        ("query", ErrorCode.INVALID_QUERY),
        ("filters", ErrorCode.INVALID_FILTER),
    ):
        if field in fields:
            return code
    return ErrorCode.MALFORMED_REQUEST


def _rejection(code: str, message: str) -> SearchReply:
    return SearchReply(error=ErrorInfo(code=code, message=message))


class RetrieverService:
    def __init__(
        self,
        embedder: Embedder,
        index: VectorIndex,
        policy: RetrieverPolicy,
        metrics: RetrieverMetrics,
        reranker: Reranker | None = None,
    ) -> None:
        self._embedder = embedder
        self._index = index
        self._policy = policy
        self._metrics = metrics
        self._reranker = reranker

    def _check_tenant(self, tenant: str, subject_tenant: str) -> None:
        if tenant != subject_tenant:
            raise InputError(
                ErrorCode.TENANT_MISMATCH, f"tenant {tenant!r} does not match the subject's tenant {subject_tenant!r}"
            )
        allowed = self._policy.tenant_allow_list
        if allowed is not None and tenant not in allowed:
            raise InputError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} is not configured")

    async def ingest(self, message: DocumentsIngest, subject_tenant: str, submitter: str) -> IngestOutcome:
        """Chunk, embed and upsert every document, then drop chunks that a shorter new version no longer has.

        Idempotent: chunk keys depend on (tenant, document id, position) only, so a redelivered batch
        overwrites the same rows. New chunks are written before stale ones are deleted, so a search never
        finds a re-ingested document missing. Every chunk records the `submitter` whose message wrote it.
        Raises InputError (nothing written) for a bad batch.
        """
        self._check_tenant(message.tenant, subject_tenant)
        check_submitter(submitter)
        documents = prepare_documents(
            message,
            max_document_bytes=self._policy.max_document_bytes,
            chunk_chars=self._policy.chunk_chars,
            overlap_chars=self._policy.chunk_overlap_chars,
        )
        texts = [chunk for doc in documents for chunk in doc.chunks]
        try:
            vectors = await self._embedder.embed_documents(texts)
        except EmbeddingError as exc:
            raise RetryableError(f"{EMBEDDING_FAILED}: {exc}") from exc
        rows, position = [], 0
        for doc in documents:
            for index, chunk in enumerate(doc.chunks):
                rows.append(
                    ChunkRow(
                        key=chunk_key(message.tenant, doc.document_id, index),
                        tenant=message.tenant,
                        document_id=doc.document_id,
                        chunk_index=index,
                        text=chunk,
                        terms=analyzed_text(chunk),
                        vector=vectors[position].tolist(),
                        metadata=doc.metadata,
                        ingested_by=submitter,
                    )
                )
                position += 1
        await self._index.upsert(rows)
        stale = await self._index.delete(
            stale_chunks_filter(message.tenant, {doc.document_id: len(doc.chunks) for doc in documents})
        )
        self._metrics.chunks_indexed.inc(len(rows))
        return IngestOutcome(documents=len(documents), chunks=len(rows), stale_chunks_deleted=stale)

    async def delete(self, message: DocumentsDelete, subject_tenant: str) -> int:
        """Delete the documents' chunks; deleting what is not there is not an error (idempotent)."""
        self._check_tenant(message.tenant, subject_tenant)
        for document_id in message.document_ids:
            check_document_id(document_id)
        return await self._index.delete(documents_filter(message.tenant, message.document_ids))

    async def search(self, payload: bytes, subject_tenant: str) -> SearchOutcome:
        """Answer a search request. Never raises: bad input and failures become an error reply."""
        started = time.perf_counter()
        request: SearchRequest | None = None
        try:
            request = SearchRequest.model_validate_json(payload)
        except ValidationError as exc:
            reply = _rejection(_validation_code(exc), str(exc))
        else:
            reply = await self._search(request, subject_tenant)
        mode = request.mode if request is not None else "invalid"
        self._metrics.searches.labels(mode, "error" if reply.error else "ok").inc()
        self._metrics.search_seconds.labels(mode).observe(time.perf_counter() - started)
        usage = None
        if request is not None and request.request_id is not None and reply.error is None:
            usage = UsageRecorded(
                usage_id=f"retrieval:{request.tenant}:{request.request_id}",
                kind="retrieval",
                tenant=request.tenant,
                task_id=request.task_id,
                tool=RETRIEVAL_TOOL,
                model=self._embedder.model,
            )
        return SearchOutcome(reply, usage, request)

    async def _search(self, request: SearchRequest, subject_tenant: str) -> SearchReply:
        try:
            self._check_tenant(request.tenant, subject_tenant)
            if not request.query.strip():
                raise InputError(ErrorCode.EMPTY_QUERY, "the query is blank")
            if request.top_k > self._policy.max_top_k:
                raise InputError(
                    ErrorCode.TOP_K_OUT_OF_RANGE, f"top_k {request.top_k} is over the limit {self._policy.max_top_k}"
                )
            expression = search_filter(request.tenant, request.filters)
        except InputError as exc:
            return _rejection(exc.code, exc.message)
        try:
            vector = [] if request.mode == "bm25" else (await self._embedder.embed_query(request.query)).tolist()
        except EmbeddingError as exc:
            _log.warning("query_embedding_failed", tenant=request.tenant, error=str(exc))
            return _rejection(EMBEDDING_FAILED, str(exc))
        try:
            hits = await self._ranked(request, vector, expression)
            if not hits and not await self._index.has_any(tenant_condition(request.tenant)):
                return _rejection(ErrorCode.UNKNOWN_TENANT, f"tenant {request.tenant!r} has no documents")
        except Exception as exc:
            _log.exception("search_failed", tenant=request.tenant)
            return _rejection(ErrorCode.SEARCH_FAILED, f"the index could not be searched: {exc!r}"[:500])
        chunks = []
        for hit in hits:
            # The filter already restricts to the tenant; this second check is what isolation rests on.
            if hit.tenant != request.tenant:
                self._metrics.foreign_hits.inc()
                _log.error("foreign_hit_dropped", tenant=request.tenant)
                continue
            chunks.append(
                RetrievedChunk(
                    document_id=hit.document_id,
                    chunk_index=hit.chunk_index,
                    text=hit.text,
                    score=hit.score,
                    metadata=hit.metadata,
                )
            )
        return SearchReply(chunks=chunks)

    async def _ranked(self, request: SearchRequest, vector: list[float], expression: str) -> list[Hit]:
        if self._reranker is None:
            return await self._first_stage(request, vector, expression, request.top_k)
        limit = max(request.top_k, self._policy.rerank_candidates)
        hits = await self._first_stage(request, vector, expression, limit)
        try:
            scores = await self._reranker.rerank(request.query, [hit.text for hit in hits]) if hits else []
        except RerankError as exc:
            # The optional stage must not fail a search: the first stage's order is still a good answer.
            self._metrics.rerank_failures.inc()
            _log.warning("rerank_failed", tenant=request.tenant, error=str(exc))
            return hits[: request.top_k]
        order = sorted(range(len(hits)), key=lambda i: -scores[i])  # stable: first-stage order breaks ties
        return [replace(hits[i], score=scores[i]) for i in order[: request.top_k]]

    async def _first_stage(self, request: SearchRequest, vector: list[float], expression: str, limit: int) -> list[Hit]:
        if request.mode == "dense":
            return await self._index.search_dense(vector, expression, limit)
        terms = analyzed_text(request.query)
        if request.mode == "bm25":
            # A query of stop words alone has no BM25 terms: nothing matches it lexically.
            return await self._index.search_bm25(terms, expression, limit) if terms else []
        if not terms:
            return await self._index.search_dense(vector, expression, limit)
        candidates = limit * self._policy.candidates_per_k
        dense, bm25 = await asyncio.gather(
            self._index.search_dense(vector, expression, candidates),
            self._index.search_bm25(terms, expression, candidates),
        )
        return fuse(dense, bm25, dense_weight=self._policy.dense_weight, limit=limit)
