"""A real retriever (real Milvus Lite file, the packaged MiniLM model) on the session's real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.app import RetrieverApp, create_app
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.server import NatsServerProcess

TEST_MAX_TOP_K = 20
TEST_MAX_DOCUMENT_BYTES = 20_000


@pytest.fixture(scope="module")
def minilm() -> MiniLmEmbedder:
    """One loaded model per module: the retriever that uses it closes it when the module ends."""
    embedder = MiniLmEmbedder(batch_size=16)
    embedder.load()
    return embedder


# Module scope: the session's server is shared with the cross-service suite, whose own retriever must be the
# only one answering there once these modules are done (a second one would split the queue group).
@pytest_asyncio.fixture(scope="module")
async def retriever(
    bootstrapped_nats: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory, minilm: MiniLmEmbedder
) -> AsyncIterator[RetrieverApp]:
    settings = RetrieverSettings(
        nats_url=bootstrapped_nats.url,
        milvus_uri=str(tmp_path_factory.mktemp("milvus") / "retriever.db"),
        chunk_chars=300,
        chunk_overlap_chars=60,
        max_document_bytes=TEST_MAX_DOCUMENT_BYTES,
        max_top_k=TEST_MAX_TOP_K,
        drain_timeout_seconds=5,
    )
    app = create_app(settings, embedder=minilm)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
