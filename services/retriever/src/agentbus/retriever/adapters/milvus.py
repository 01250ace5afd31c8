"""The vector index on Milvus: a Milvus Lite file by default, a Milvus server by URI.

One collection holds every tenant's chunks, with the tenant as partition key, a dense vector field, and
a BM25 sparse field computed by Milvus from the chunk's analyzed terms. The retriever always talks to
Milvus as a client over gRPC: to a server by URI, or to a Milvus Lite file served by a child process
(`LiteServer`), so Lite's pure-Python engine never competes with the service for its interpreter lock,
and Lite and a server take the same code path. pymilvus' client is synchronous, so every call runs on a
small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agentbus.retriever.adapters.lite_process import LiteServer
from agentbus.retriever.domain import CHUNK_INDEX_FIELD, DOCUMENT_FIELD, METADATA_FIELD, TENANT_FIELD
from agentbus.retriever.ports import ChunkRow, Hit
from agentbus.runtime.logging import get_logger
from pymilvus import DataType, Function, FunctionType, MilvusClient  # type: ignore[import-untyped]

_log = get_logger(__name__)

T = TypeVar("T")

KEY_FIELD = "chunk_key"
TEXT_FIELD = "text"
TERMS_FIELD = "terms"
INGESTED_BY_FIELD = "ingested_by"
DENSE_FIELD = "dense"
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "terms_bm25"
MAX_TEXT_BYTES = 65_535
PARTITIONS = 16
OUTPUT_FIELDS = [TENANT_FIELD, DOCUMENT_FIELD, CHUNK_INDEX_FIELD, TEXT_FIELD, METADATA_FIELD]
# `terms` holds text already analyzed by `agentbus.retriever.analysis` (stems, no stop words, lower case,
# separated by spaces), so the engine's own analyzer only has to split on spaces: the standard tokenizer
# does that identically on Milvus Lite and on a Milvus server.
TERMS_ANALYZER: dict[str, Any] = {"tokenizer": "standard"}
BM25_K1, BM25_B = 1.2, 0.75
"""Okapi BM25's textbook constants (Milvus' own defaults are k1 1.5 on Lite, 1.2 on a server)."""
DEFAULT_FLUSH_DELAY_SECONDS = 0.5


class SchemaMismatchError(RuntimeError):
    """The existing collection cannot hold what this deployment writes (e.g. another vector size)."""


def is_lite_uri(uri: str) -> bool:
    """True for a Milvus Lite file (pymilvus' own rule: a local path ending in .db)."""
    return uri.endswith(".db") and "://" not in uri


def connect(uri: str, token: str | None = None) -> MilvusClient:
    """A client for `uri`; a Lite file is opened inside this process (its folder is created first).

    For tools and tests that hold the file briefly; the service uses `open_client`.
    """
    if is_lite_uri(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return MilvusClient(uri=os.fspath(Path(uri).expanduser()))
    return MilvusClient(uri=uri, token=token or "")


def open_client(uri: str, token: str | None = None) -> tuple[MilvusClient, LiteServer | None]:
    """A client for `uri`; for a Lite file, also the child process that serves it (the caller stops it)."""
    if not is_lite_uri(uri):
        return MilvusClient(uri=uri, token=token or ""), None
    path = Path(uri).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = LiteServer(path)
    try:
        return MilvusClient(uri=server.start()), server
    except BaseException:
        server.stop()
        raise


def _schema(dimension: int) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field(TENANT_FIELD, DataType.VARCHAR, max_length=64, is_partition_key=True)
    schema.add_field(DOCUMENT_FIELD, DataType.VARCHAR, max_length=1024)
    schema.add_field(CHUNK_INDEX_FIELD, DataType.INT64)
    schema.add_field(TEXT_FIELD, DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field(
        TERMS_FIELD, DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True, analyzer_params=TERMS_ANALYZER
    )
    schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field(DENSE_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field(METADATA_FIELD, DataType.JSON)
    schema.add_field(INGESTED_BY_FIELD, DataType.VARCHAR, max_length=64)
    schema.add_function(
        Function(
            name=BM25_FUNCTION,
            function_type=FunctionType.BM25,
            input_field_names=[TERMS_FIELD],
            output_field_names=[SPARSE_FIELD],
        )
    )
    return schema


def _index_params(client: MilvusClient, missing: set[str]) -> Any:
    params = client.prepare_index_params()
    if DENSE_FIELD in missing:
        params.add_index(
            field_name=DENSE_FIELD, index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200}
        )
    if SPARSE_FIELD in missing:
        params.add_index(
            field_name=SPARSE_FIELD,
            index_type="SPARSE_INVERTED_INDEX",
            metric_type="BM25",
            params={"bm25_k1": BM25_K1, "bm25_b": BM25_B},
        )
    return params


EXPECTED_FIELDS = frozenset(
    {
        KEY_FIELD,
        TENANT_FIELD,
        DOCUMENT_FIELD,
        CHUNK_INDEX_FIELD,
        TEXT_FIELD,
        TERMS_FIELD,
        SPARSE_FIELD,
        DENSE_FIELD,
        METADATA_FIELD,
        INGESTED_BY_FIELD,
    }
)


def ensure_collection(client: MilvusClient, collection: str, dimension: int) -> list[str]:
    """Create the chunk collection, or check and complete an existing one. Idempotent.

    Returns what was done. An existing collection gets any missing index and is loaded; one whose
    fields, BM25 input or vector size differ raises SchemaMismatchError (re-embedding every chunk is an
    explicit migration, never something a start-up does silently).
    """
    actions: list[str] = []
    if not client.has_collection(collection):
        client.create_collection(
            collection,
            schema=_schema(dimension),
            index_params=_index_params(client, {DENSE_FIELD, SPARSE_FIELD}),
            num_partitions=PARTITIONS,
        )
        actions.append(f"created collection {collection} (dense dim {dimension}, BM25 on {TERMS_FIELD})")
    else:
        described = client.describe_collection(collection)
        fields = {f["name"]: f for f in described["fields"]}
        if missing := EXPECTED_FIELDS - fields.keys():
            raise SchemaMismatchError(
                f"collection {collection} lacks fields {sorted(missing)} (made by an older retriever); "
                "use another collection or re-ingest into a new one"
            )
        existing_dim = int(fields[DENSE_FIELD].get("params", {}).get("dim", 0))
        if existing_dim != dimension:
            raise SchemaMismatchError(
                f"collection {collection} stores {existing_dim}-dimensional vectors but the embedding model makes "
                f"{dimension}; use another collection or re-ingest into a new one"
            )
        if not fields[TENANT_FIELD].get("is_partition_key"):
            raise SchemaMismatchError(f"collection {collection}: {TENANT_FIELD} is not its partition key")
        functions = [f for f in described.get("functions", []) if f.get("name") == BM25_FUNCTION]
        bm25_inputs = {name for f in functions for name in f.get("input_field_names", [])}
        if bm25_inputs != {TERMS_FIELD}:
            raise SchemaMismatchError(f"collection {collection}: BM25 is not computed from {TERMS_FIELD}")
        indexed = {client.describe_index(collection, name)["field_name"] for name in client.list_indexes(collection)}
        if missing_indexes := {DENSE_FIELD, SPARSE_FIELD} - indexed:
            client.create_index(collection, _index_params(client, missing_indexes))
            actions.append(f"created indexes on {sorted(missing_indexes)}")
        actions.append(f"collection {collection} exists and matches")
    if str(client.get_load_state(collection).get("state")) != "Loaded":
        client.load_collection(collection)
        actions.append(f"loaded collection {collection}")
    return actions


def _hit(entity: dict[str, Any], score: float) -> Hit:
    return Hit(
        tenant=str(entity[TENANT_FIELD]),
        document_id=str(entity[DOCUMENT_FIELD]),
        chunk_index=int(entity[CHUNK_INDEX_FIELD]),
        text=str(entity[TEXT_FIELD]),
        score=score,
        metadata=dict(entity.get(METADATA_FIELD) or {}),
    )


MAX_QUERIES_PER_CALL = 64
MAX_FLUSH_WAIT_FACTOR = 10
_SearchKey = tuple[str, str, int]
_SearchSync = Callable[[str, str, int, list[Any]], list[list[Hit]]]


class _SearchBatcher:
    """Sends concurrent searches that share field, filter and limit as one call with several queries.

    While a call for a key is in flight, further searches with that key wait and then go together in
    the next call (up to `max_queries`). Milvus answers a call of n queries for little more than one:
    the filter is evaluated once, the dense products run as one matrix product, and there is one round
    trip instead of n. A lone search is sent at once, so a quiet service adds no delay. The filter, which
    carries the tenant, is part of the key: queries of different tenants never share a call.
    """

    def __init__(
        self,
        run: Callable[..., Awaitable[list[list[Hit]]]],
        search: _SearchSync,
        max_queries: int,
    ) -> None:
        self._run = run
        self._search = search
        self._max_queries = max_queries
        self._waiting: dict[_SearchKey, list[tuple[Any, asyncio.Future[list[Hit]]]]] = {}
        self._calls: dict[_SearchKey, asyncio.Task[None]] = {}

    async def search(self, field: str, expression: str, limit: int, data: Any) -> list[Hit]:
        key = (field, expression, limit)
        future: asyncio.Future[list[Hit]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((data, future))
        if key not in self._calls:
            self._calls[key] = asyncio.create_task(self._drain(key))
        return await future

    async def _drain(self, key: _SearchKey) -> None:
        try:
            while waiting := self._waiting.get(key):
                batch, self._waiting[key] = waiting[: self._max_queries], waiting[self._max_queries :]
                try:
                    results = await self._run(self._search, *key, [data for data, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), hits in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(hits)
        finally:
            self._waiting.pop(key, None)
            del self._calls[key]


@dataclass
class MilvusVectorIndex:
    """The `VectorIndex` port over a pymilvus client, on `threads` worker threads.

    `flush_delay_seconds` (Milvus Lite only; None for a server, which seals segments itself): Lite keeps
    unflushed rows in a memtable and rebuilds that memtable's BM25 index on every search, which made a
    search over a few hundred unflushed chunks cost ~50 ms of CPU. Flushing once writes pause for that
    long turns them into a segment whose indexes are built once; during a long stream of writes, at the
    latest `MAX_FLUSH_WAIT_FACTOR` times that long after the first unflushed one. Waiting for the pause
    makes fewer, larger segments: Lite keeps BM25 statistics per segment, so small segments skew scores.
    Writes (upserts, deletes, flushes) are serialized: Lite's engine allows one writer per collection.
    """

    client: MilvusClient
    collection: str
    threads: int = 4
    flush_delay_seconds: float | None = None
    owned: LiteServer | None = None
    """A Lite server process this index started and stops on close."""

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="milvus")
        self._writes = asyncio.Lock()
        self._flush: asyncio.Task[None] | None = None
        self._unflushed_since: float | None = None
        self._searches = _SearchBatcher(self._run, self._search_sync, MAX_QUERIES_PER_CALL)

    def serving(self) -> bool:
        """False once the Lite process this index started has died (nothing can be searched then)."""
        return self.owned is None or self.owned.alive()

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args, **kwargs))

    def _flush_soon(self) -> None:
        if self.flush_delay_seconds is None:
            return
        now = time.monotonic()
        if self._unflushed_since is None:
            self._unflushed_since = now
        latest = self._unflushed_since + MAX_FLUSH_WAIT_FACTOR * self.flush_delay_seconds
        if self._flush is not None:
            self._flush.cancel()
        self._flush = asyncio.create_task(self._flush_after(max(0.0, min(self.flush_delay_seconds, latest - now))))

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._flush = None
        self._unflushed_since = None
        try:
            await self.flush()
        except Exception:
            # Unflushed rows stay searchable (only slower); the next write schedules another flush.
            _log.exception("milvus_flush_failed", collection=self.collection)

    async def flush(self) -> None:
        """Seal what was written into an indexed segment now."""
        async with self._writes:
            await self._run(self.client.flush, self.collection)

    async def upsert(self, rows: Sequence[ChunkRow]) -> None:
        records = [
            {
                KEY_FIELD: r.key,
                TENANT_FIELD: r.tenant,
                DOCUMENT_FIELD: r.document_id,
                CHUNK_INDEX_FIELD: r.chunk_index,
                TEXT_FIELD: r.text,
                TERMS_FIELD: r.terms,
                DENSE_FIELD: r.vector,
                METADATA_FIELD: r.metadata,
                INGESTED_BY_FIELD: r.ingested_by,
            }
            for r in rows
        ]
        if records:
            async with self._writes:
                await self._run(self.client.upsert, self.collection, records)
            self._flush_soon()

    async def delete(self, expression: str) -> int:
        async with self._writes:
            result = await self._run(self.client.delete, self.collection, filter=expression)
        count = int(result.get("delete_count", 0)) if isinstance(result, dict) else 0
        if count:
            self._flush_soon()
        return count

    async def has_any(self, expression: str) -> bool:
        rows = await self._run(
            self.client.query, self.collection, filter=expression, output_fields=[KEY_FIELD], limit=1
        )
        return bool(rows)

    async def search_dense(self, vector: Sequence[float], expression: str, limit: int) -> list[Hit]:
        return await self._searches.search(DENSE_FIELD, expression, limit, list(vector))

    async def search_bm25(self, terms: str, expression: str, limit: int) -> list[Hit]:
        return await self._searches.search(SPARSE_FIELD, expression, limit, terms)

    def _search_sync(self, field: str, expression: str, limit: int, data: list[Any]) -> list[list[Hit]]:
        """One search call for several queries on the same field, filter and limit: one list per query."""
        params = (
            {"metric_type": "BM25"}
            if field == SPARSE_FIELD
            else {"metric_type": "COSINE", "params": {"ef": max(64, limit)}}
        )
        results = self.client.search(
            self.collection,
            data=data,
            anns_field=field,
            filter=expression,
            limit=limit,
            search_params=params,
            output_fields=OUTPUT_FIELDS,
        )
        # BM25 distances come back negative from Milvus Lite and positive from a server; larger magnitude is
        # better in both. Cosine similarities come back as they are (higher is better).
        score = (lambda d: abs(float(d))) if field == SPARSE_FIELD else float
        out = [[_hit(match["entity"], score(match["distance"])) for match in hits] for hits in results or []]
        return out + [[] for _ in range(len(data) - len(out))]

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
            await self.flush()
        await self._run(self.client.close)
        self._executor.shutdown(wait=False)
        if self.owned is not None:
            await asyncio.to_thread(self.owned.stop)
