"""BM25 scoring for the Milvus Lite child process, with numpy instead of a Python loop per posting.

Milvus Lite 3's `SparseInvertedIndex.search` walks every posting of every query term in Python, reading a
numpy scalar per posting: over 10,000 chunks that was three quarters of a BM25 search's CPU in the Lite
process (about 7 ms per query in a batch of 50). `VectorizedBm25Index` keeps Lite's index as it is built
(the same posting lists, document frequencies and lengths) and scores a query term's whole posting list at
once: one array of chunk ids and one of term frequencies per term, made on the term's first search and kept
for the life of the index (a segment's index is immutable; the memtable's is rebuilt for each search).

It gives the scores Lite gives (to float precision), with Lite's formula and the index's own k1 and b:
    score(D, Q) = sum over query terms q of w(q) * IDF(q) * f(q,D) * (k1 + 1) / (f(q,D) + k1 * L(D))
    L(D) = 1 - b + b * |D| / avgdl,  IDF(q) = ln((N - df + 0.5) / (df + 0.5) + 1)
in double precision (Lite's loop mixes float32 and float64); it returns the same shapes and conventions:
(local ids, distances) of shape (nq, top_k), distance = -score, padded with -1 / +inf; only chunks that
contain a query term (and pass the mask) are candidates. Chunks with equal scores come in ascending local
id order, where Lite keeps the order it first met them in (also ascending for the query's first term).

Only the retriever's own Lite child installs it (`install()`, before the server starts); a Milvus server
scores BM25 natively and never sees this module. services/retriever/tests/test_lite_bm25.py checks every
ranking against Lite's own class on random indexes; bench/eval_retrieval.py gave the same figures, to the
last digit, with either class. Concurrent searches may both fill a term's cache: they store equal arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from milvus_lite.index import sparse_factory  # type: ignore[import-untyped]
from milvus_lite.index.sparse_common import empty_results, validate_mask  # type: ignore[import-untyped]
from milvus_lite.index.sparse_inverted import SparseInvertedIndex  # type: ignore[import-untyped]
from numpy.typing import NDArray

_Postings = tuple[NDArray[np.int64], NDArray[np.float64]]


class VectorizedBm25Index(SparseInvertedIndex):  # type: ignore[misc]
    """Lite's BM25 inverted index, searched with array operations per query term."""

    def build(self, sparse_vectors: list[dict[int, float]], valid_mask: Any = None) -> None:
        super().build(sparse_vectors, valid_mask)
        self._arrays: dict[int, _Postings] = {}
        self._length_norm: NDArray[np.float64] | None = None

    def _postings(self, term_hash: int) -> _Postings | None:
        arrays = self.__dict__.setdefault("_arrays", {})
        found: _Postings | None = arrays.get(term_hash)
        if found is None:
            posting = self._posting_lists.get(term_hash)
            if not posting:
                return None
            ids, tfs = zip(*posting, strict=True)
            found = arrays[term_hash] = (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float64))
        return found

    def _norm(self) -> NDArray[np.float64]:
        """k1 * (1 - b + b * |D| / avgdl) for every chunk of the index."""
        norm: NDArray[np.float64] | None = self.__dict__.get("_length_norm")
        if norm is None:
            avgdl = self.avgdl if self.avgdl > 0 else 1.0
            lengths = np.asarray(self._doc_lengths, dtype=np.float64)
            norm = self.k1 * (1.0 - self.b + self.b * lengths / avgdl)
            self._length_norm = norm
        return norm

    def search(
        self, query_sparse_vectors: list[dict[int, float]], top_k: int, valid_mask: Any = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        rows = len(self._doc_lengths)
        mask = validate_mask(valid_mask, rows)
        all_ids, all_dists = empty_results(len(query_sparse_vectors), top_k)
        if self.doc_count == 0 or top_k == 0:
            return all_ids, all_dists
        count, k1 = self.doc_count, self.k1
        norm = self._norm()
        for qi, query in enumerate(query_sparse_vectors):
            id_parts: list[NDArray[np.int64]] = []
            score_parts: list[NDArray[np.float64]] = []
            for term_hash, weight in (query or {}).items():
                postings = self._postings(term_hash)
                if postings is None:
                    continue
                ids, tfs = postings
                if mask is not None:
                    keep = mask[ids]
                    ids, tfs = ids[keep], tfs[keep]
                    if not len(ids):
                        continue
                df = self._df[term_hash]
                idf = math.log((count - df + 0.5) / (df + 0.5) + 1.0)
                id_parts.append(ids)
                score_parts.append((idf * float(weight)) * (tfs * (k1 + 1.0)) / (tfs + norm[ids]))
            if not id_parts:
                continue
            ids = np.concatenate(id_parts)
            scores = np.bincount(ids, weights=np.concatenate(score_parts), minlength=rows).astype(
                np.float64, copy=False
            )
            # Chunks that hold a query term, in ascending local id order (a count, not a sort).
            candidates = np.flatnonzero(np.bincount(ids, minlength=rows))
            ranked = _best(candidates, scores[candidates], top_k)
            all_ids[qi, : len(ranked)] = ranked
            all_dists[qi, : len(ranked)] = -scores[ranked]
        return all_ids, all_dists


def _best(ids: NDArray[np.int64], scores: NDArray[np.float64], top_k: int) -> NDArray[np.int64]:
    """The `top_k` ids of highest score, best first; equal scores in ascending id order (`ids` ascend).

    Only the candidates at or above the k-th best score are sorted: a common term can bring thousands.
    """
    if len(ids) > top_k:
        kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
        above = scores > kth
        tied = np.flatnonzero(scores == kth)[: top_k - int(above.sum())]
        keep = np.concatenate([np.flatnonzero(above), tied])
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))
    ranked: NDArray[np.int64] = ids[order]
    return ranked


def install() -> None:
    """Make Lite build `VectorizedBm25Index` for BM25 fields (its factory looks the class up per call).

    `sparse_index_matches` checks indexes with isinstance against Lite's class, which the subclass passes.
    """
    sparse_factory.SparseInvertedIndex = VectorizedBm25Index
