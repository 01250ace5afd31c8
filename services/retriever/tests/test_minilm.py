"""The numpy MiniLM forward pass: equal to the reference implementation, and behaving like the model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from agentbus.retriever.adapters.minilm import MINILM_DIMENSION, MiniLmEmbedder
from agentbus.retriever.ports import EmbeddingError

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text(encoding="utf-8"))


def test_embeddings_equal_the_reference_bert_implementation(minilm: MiniLmEmbedder) -> None:
    # The reference vectors were computed by transformers' BertModel (see "source" in the file) on the same
    # weights; they cover a short sentence, a text cut at 256 tokens, and non-ASCII text.
    ours = minilm.embed_sync(REFERENCE["texts"])
    reference = np.array(REFERENCE["embeddings"], dtype=np.float32)
    assert ours.shape == (len(REFERENCE["texts"]), MINILM_DIMENSION)
    assert np.abs(ours - reference).max() < 1e-5


def test_paraphrases_score_far_above_unrelated_sentences(minilm: MiniLmEmbedder) -> None:
    vectors = minilm.embed_sync(
        [
            "How do I reset my password?",
            "I forgot my password and need to change it.",
            "The invoice for March has not arrived.",
            "Penguins live in the southern hemisphere.",
        ]
    )
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6
    assert similarity[0, 2] < 0.3
    assert similarity[0, 3] < 0.2
    assert similarity[0, 1] - max(similarity[0, 2], similarity[0, 3]) > 0.4


def test_vectors_are_unit_length_deterministic_and_independent_of_batching(minilm: MiniLmEmbedder) -> None:
    texts = ["short", "a somewhat longer sentence about retrieval", "word " * 400, ""]
    batched = minilm.embed_sync(texts)
    alone = np.stack([minilm.embed_sync([t])[0] for t in texts])
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.abs(batched - alone).max() < 1e-5
    assert np.array_equal(batched, minilm.embed_sync(texts))


def test_text_past_256_tokens_does_not_change_the_embedding(minilm: MiniLmEmbedder) -> None:
    base = "retrieval augmented generation " * 120
    first, second = minilm.embed_sync([base, base + " completely different ending about volcanoes"])
    assert np.abs(first - second).max() < 1e-6
    assert len(base.split()) > 256  # each of these words is at least one token


async def test_async_embedding_runs_off_the_event_loop(minilm: MiniLmEmbedder) -> None:
    documents = await minilm.embed_documents(["alpha", "beta"])
    query = await minilm.embed_query("alpha")
    assert documents.shape == (2, MINILM_DIMENSION)
    assert np.abs(documents[0] - query).max() < 1e-6


async def test_worker_processes_embed_exactly_as_this_process_does(minilm: MiniLmEmbedder) -> None:
    texts = ["How do I reset my password?", "word " * 300, "ünïcödé — 数字", "short"]
    embedder = MiniLmEmbedder(batch_size=2, processes=2, query_cache_size=0)
    await embedder.start()
    try:
        documents, queries = await asyncio.gather(
            embedder.embed_documents(texts), asyncio.gather(*(embedder.embed_query(t) for t in texts))
        )
    finally:
        await embedder.close()
    expected = minilm.embed_sync(texts)
    assert np.abs(documents - expected).max() < 1e-5
    assert np.abs(np.stack(queries) - expected).max() < 1e-5
    with pytest.raises(EmbeddingError):
        await embedder.embed_query("the workers are gone")


async def test_concurrent_queries_are_embedded_alike_and_repeats_come_from_the_cache(minilm: MiniLmEmbedder) -> None:
    texts = [f"query number {i}" for i in range(12)]
    vectors = await asyncio.gather(*(minilm.embed_query(t) for t in texts))
    assert np.abs(np.stack(vectors) - minilm.embed_sync(texts)).max() < 1e-5
    again = await minilm.embed_query(texts[3])
    assert again is vectors[3]


async def test_a_killed_worker_fails_only_its_own_pass_and_is_replaced(minilm: MiniLmEmbedder) -> None:
    embedder = MiniLmEmbedder(processes=1, query_cache_size=0)
    await embedder.start()
    try:
        assert embedder._workers is not None
        [worker] = embedder._workers._workers
        worker.process.kill()
        await worker.process.wait()
        with pytest.raises(EmbeddingError):
            await embedder.embed_query("sent to the dead process")
        vector = await embedder.embed_query("answered by its replacement")
    finally:
        await embedder.close()
    assert np.abs(vector - minilm.embed_sync(["answered by its replacement"])[0]).max() < 1e-5
