"""The Lite child's vectorized BM25 scores what Milvus Lite's own index scores, query by query."""

from __future__ import annotations

import numpy as np
import pytest
from agentbus.retriever.adapters.lite_bm25 import VectorizedBm25Index, install
from milvus_lite.index import sparse_factory  # type: ignore[import-untyped]
from milvus_lite.index.sparse_inverted import SparseInvertedIndex  # type: ignore[import-untyped]


def _corpus(rng: np.random.Generator, docs: int, vocabulary: int) -> list[dict[int, float]]:
    vectors: list[dict[int, float]] = []
    for _ in range(docs):
        terms = rng.choice(vocabulary, size=int(rng.integers(0, 12)), replace=False)
        vectors.append({int(t) * 7919 + 13: float(rng.integers(1, 5)) for t in terms})
    return vectors


def _queries(rng: np.random.Generator, count: int, vocabulary: int) -> list[dict[int, float]]:
    return [
        {int(t) * 7919 + 13: float(rng.integers(1, 3)) for t in rng.choice(vocabulary + 20, size=n, replace=False)}
        for n in rng.integers(0, 6, size=count)
    ]


def _assert_same_ranking(
    reference: SparseInvertedIndex,
    fast: VectorizedBm25Index,
    queries: list[dict[int, float]],
    top_k: int,
    mask: np.ndarray | None,
) -> None:
    every = len(reference._doc_lengths)
    full_ids, full_dists = reference.search(queries, every, valid_mask=mask)
    ids, dists = fast.search(queries, top_k, valid_mask=mask)
    assert ids.shape == dists.shape == (len(queries), top_k)
    for q in range(len(queries)):
        scored = {int(i): float(d) for i, d in zip(full_ids[q], full_dists[q], strict=True) if i >= 0}
        expected = sorted(scored.values())[:top_k]
        found = [int(i) for i in ids[q] if i >= 0]
        # The same distances in the same order (ties may pick other chunks of the same score) ...
        assert np.allclose(dists[q, : len(found)], expected, rtol=1e-5, atol=1e-6)
        assert len(found) == len(expected)
        # ... and every chunk returned carries the score Lite gives that chunk.
        for position, local_id in enumerate(found):
            assert local_id in scored
            assert scored[local_id] == pytest.approx(float(dists[q, position]), rel=1e-5, abs=1e-6)
        assert (ids[q, len(found) :] == -1).all()
        assert np.isinf(dists[q, len(found) :]).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_vectorized_bm25_ranks_as_lite_does_with_and_without_a_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    corpus = _corpus(rng, docs=600, vocabulary=80)
    reference = SparseInvertedIndex(k1=1.2, b=0.75)
    fast = VectorizedBm25Index(k1=1.2, b=0.75)
    reference.build(corpus)
    fast.build(corpus)
    queries = _queries(rng, 40, vocabulary=80)
    for top_k in (1, 5, 20):
        _assert_same_ranking(reference, fast, queries, top_k, None)
        _assert_same_ranking(reference, fast, queries, top_k, rng.random(len(corpus)) < 0.6)
        # The cached postings do not leak from one mask into the next search.
        _assert_same_ranking(reference, fast, queries, top_k, None)


def test_vectorized_bm25_with_rows_left_out_at_build_and_empty_indexes() -> None:
    rng = np.random.default_rng(9)
    corpus = _corpus(rng, docs=200, vocabulary=30)
    kept = rng.random(len(corpus)) < 0.5
    reference, fast = SparseInvertedIndex(), VectorizedBm25Index()
    reference.build(corpus, valid_mask=kept)
    fast.build(corpus, valid_mask=kept)
    _assert_same_ranking(reference, fast, _queries(rng, 30, vocabulary=30), 10, None)

    empty = VectorizedBm25Index()
    empty.build([])
    ids, dists = empty.search([{1: 1.0}], 3)
    assert (ids == -1).all()
    assert np.isinf(dists).all()
    with pytest.raises(ValueError):
        fast.search([{1: 1.0}], 3, valid_mask=np.ones(3, dtype=bool))


def test_a_rebuilt_index_forgets_the_postings_it_cached() -> None:
    index = VectorizedBm25Index()
    index.build([{5: 1.0}, {5: 2.0}])
    assert list(index.search([{5: 1.0}], 2)[0][0]) == [1, 0]
    index.build([{5: 3.0}, {6: 1.0}, {5: 1.0}])
    assert list(index.search([{5: 1.0}], 3)[0][0]) == [0, 2, -1]


def test_install_makes_lites_factory_build_the_vectorized_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_factory, "SparseInvertedIndex", SparseInvertedIndex)
    install()
    index = sparse_factory.create_sparse_index("BM25", {"bm25_k1": 1.2, "bm25_b": 0.75})
    assert isinstance(index, VectorizedBm25Index)
    assert (index.k1, index.b) == (1.2, 0.75)
    assert sparse_factory.sparse_index_matches(index, "BM25", {"bm25_k1": 1.2, "bm25_b": 0.75})


def test_equal_scores_come_in_ascending_local_id_order_across_the_cut() -> None:
    index = VectorizedBm25Index()
    index.build([{5: 1.0}, {6: 1.0}, {5: 1.0}, {5: 1.0}, {5: 2.0}, {5: 1.0}])
    ids, dists = index.search([{5: 1.0}], 3)
    assert list(ids[0]) == [4, 0, 2]
    assert dists[0, 1] == dists[0, 2]
