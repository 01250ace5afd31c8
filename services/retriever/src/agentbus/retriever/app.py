"""Composition root of the retriever."""

from __future__ import annotations

import asyncio

from agentbus.contracts.registry import RAG_SEARCH, RETRIEVER_DELETES, RETRIEVER_INGEST, Service
from agentbus.retriever.adapters.lite_process import LiteServerError
from agentbus.retriever.adapters.milvus import (
    MilvusVectorIndex,
    SchemaMismatchError,
    ensure_collection,
    is_lite_uri,
    open_client,
)
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.adapters.openai_embeddings import OpenAIEmbedder
from agentbus.retriever.adapters.rerank_endpoint import RerankEndpoint
from agentbus.retriever.handlers import RetrieverHandlers
from agentbus.retriever.ports import Embedder, EmbeddingError, Reranker
from agentbus.retriever.service import RetrieverMetrics, RetrieverPolicy, RetrieverService
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner
from agentbus.runtime.errors import ConfigurationError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.service import BusService
from agentbus.runtime.spans import NullSpanEmitter, SpanEmitter
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

SEARCH_QUEUE_GROUP = Service.RETRIEVER.value
"""Replicas share search requests: each request goes to one member of this queue group."""

_log = get_logger(__name__)


def create_embedder(settings: RetrieverSettings) -> Embedder:
    """The embedding backend the settings choose."""
    if settings.embedding_backend == "openai":
        assert settings.embedding_url is not None  # the settings validator requires it
        return OpenAIEmbedder(
            settings.embedding_url,
            settings.embedding_model,
            api_key=settings.embedding_api_key,
            dimension=settings.embedding_dimension,
            batch_size=settings.embedding_batch_size,
            timeout_seconds=settings.embedding_timeout_seconds,
        )
    return MiniLmEmbedder(
        batch_size=settings.embedding_batch_size,
        processes=settings.embedding_process_count,
        query_cache_size=settings.query_cache_size,
    )


def create_reranker(settings: RetrieverSettings) -> Reranker | None:
    """The re-ranking stage the settings configure, if any (none ships with the suite)."""
    if settings.rerank_url is None:
        return None
    return RerankEndpoint(
        settings.rerank_url,
        settings.rerank_model,
        api_key=settings.rerank_api_key,
        timeout_seconds=settings.rerank_timeout_seconds,
    )


async def prepare_index(settings: RetrieverSettings, embedder: Embedder) -> tuple[MilvusVectorIndex, list[str]]:
    """Start the embedder, connect to Milvus and ensure the collection; a mismatch is a configuration error."""
    try:
        await embedder.start()
    except EmbeddingError as exc:
        raise ConfigurationError(f"embedding backend unusable: {exc}") from exc
    try:
        client, lite = await asyncio.to_thread(open_client, settings.milvus_uri, settings.milvus_token)
    except LiteServerError as exc:
        raise ConfigurationError(str(exc)) from exc
    index = MilvusVectorIndex(
        client,
        settings.collection,
        threads=settings.index_threads,
        flush_delay_seconds=settings.milvus_flush_delay_seconds if is_lite_uri(settings.milvus_uri) else None,
        owned=lite,
    )
    try:
        actions = await asyncio.to_thread(ensure_collection, client, settings.collection, embedder.dimension)
    except BaseException as exc:
        await index.close()
        if isinstance(exc, SchemaMismatchError):
            raise ConfigurationError(str(exc)) from exc
        raise
    return index, actions


class RetrieverApp(BusService):
    """The bus service plus what it owns besides consumers: the search subscription, the index, the model."""

    def __init__(
        self, settings: RetrieverSettings, embedder: Embedder | None = None, spans: SpanEmitter | None = None
    ) -> None:
        super().__init__(
            Service.RETRIEVER, settings, self._wire, CollectorRegistry(), spans=spans or SpanEmitter(Service.RETRIEVER)
        )
        self.span_emitter: SpanEmitter = self.spans or NullSpanEmitter()
        self.retriever_settings = settings
        self.embedder = embedder or create_embedder(settings)
        self.retriever_metrics = RetrieverMetrics(self.registry)
        self.index: MilvusVectorIndex | None = None
        self.reranker = create_reranker(settings)
        self.handlers: RetrieverHandlers | None = None
        self._search_sub: Subscription | None = None
        self.add_health_check(lambda: self._search_sub is not None)
        # /readyz fails when the Lite process died, so the supervisor (agentbus up, Kubernetes) restarts us.
        self.add_health_check(lambda: self.index is None or self.index.serving())

    async def _wire(self, nc: NatsClient, js: JetStreamContext, metrics: ConsumerMetrics) -> list[ConsumerRunner]:
        settings = self.retriever_settings
        self.index, actions = await prepare_index(settings, self.embedder)
        for action in actions:
            _log.info("collection_ready", action=action)
        policy = RetrieverPolicy(
            chunk_chars=settings.chunk_chars,
            chunk_overlap_chars=settings.chunk_overlap_chars,
            max_document_bytes=settings.max_document_bytes,
            max_top_k=settings.max_top_k,
            tenant_allow_list=settings.tenant_allow_list,
            candidates_per_k=settings.candidates_per_k,
            dense_weight=settings.hybrid_dense_weight,
            rerank_candidates=settings.rerank_candidates,
        )
        service = RetrieverService(self.embedder, self.index, policy, self.retriever_metrics, self.reranker)
        self.handlers = handlers = RetrieverHandlers(js, service, settings.search_concurrency, self.span_emitter)
        self._search_sub = await nc.subscribe(
            RAG_SEARCH.wildcard, queue=SEARCH_QUEUE_GROUP, cb=handlers.on_search_request
        )
        # Plain ACK for both: chunk keys are deterministic and deletes are by filter, so a redelivered
        # batch rewrites the same rows and a lost ack costs only repeated work.
        return [
            ConsumerRunner(
                js,
                RETRIEVER_INGEST,
                handlers.on_documents_ingest,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                # Embedding is CPU-bound and serial: more batches at once only queue inside the process.
                concurrency=2,
                batch=2,
            ),
            ConsumerRunner(
                js,
                RETRIEVER_DELETES,
                handlers.on_documents_delete,
                ack_policy=AckPolicy.ACK,
                metrics=metrics,
                concurrency=4,
                batch=4,
            ),
        ]

    async def stop(self) -> None:
        """Stop taking searches, answer those in progress, drain the consumers, then release the index."""
        if self._search_sub is not None:
            await self._search_sub.unsubscribe()
            self._search_sub = None
        if self.handlers is not None:
            await self.handlers.drain_searches(self.settings.drain_timeout_seconds)
        await super().stop()
        if self.index is not None:
            await self.index.close()
        await self.embedder.close()
        if self.reranker is not None:
            await self.reranker.close()


def create_app(
    settings: RetrieverSettings, embedder: Embedder | None = None, spans: SpanEmitter | None = None
) -> RetrieverApp:
    """Build the retriever; connecting, loading the model and ensuring the collection happen at start."""
    return RetrieverApp(settings, embedder, spans)
