"""The vector index on Milvus: a Milvus Lite file by default, a Milvus server by URI.

One collection holds every tenant's chunks, with the tenant as partition key, a dense vector field, and
a BM25 sparse field computed by Milvus from the chunk text. pymilvus' client is synchronous (and Milvus
Lite runs inside this process), so every call runs on a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agentbus.retriever.domain import CHUNK_INDEX_FIELD, DOCUMENT_FIELD, METADATA_FIELD, TENANT_FIELD
from agentbus.retriever.ports import ChunkRow, Hit, SearchMode
from pymilvus import (  # type: ignore[import-untyped]
    AnnSearchRequest,
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    RRFRanker,
)

T = TypeVar("T")

KEY_FIELD = "chunk_key"
TEXT_FIELD = "text"
DENSE_FIELD = "dense"
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "text_bm25"
MAX_TEXT_BYTES = 65_535
PARTITIONS = 16
OUTPUT_FIELDS = [TENANT_FIELD, DOCUMENT_FIELD, CHUNK_INDEX_FIELD, TEXT_FIELD, METADATA_FIELD]
# Written out rather than "_english_", which only a Milvus server understands; Milvus Lite takes a list.
STOP_WORDS = sorted(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    ]
)
ANALYZER_PARAMS: dict[str, Any] = {
    "tokenizer": "standard",
    "filter": ["lowercase", {"type": "stop", "stop_words": STOP_WORDS}],
}


class SchemaMismatchError(RuntimeError):
    """The existing collection cannot hold what this deployment writes (e.g. another vector size)."""


def is_lite_uri(uri: str) -> bool:
    """True for a Milvus Lite file (pymilvus' own rule: a local path ending in .db)."""
    return uri.endswith(".db") and "://" not in uri


def connect(uri: str, token: str | None = None) -> MilvusClient:
    """A client for `uri`; for a Lite file, its folder is created first."""
    if is_lite_uri(uri):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        return MilvusClient(uri=os.fspath(Path(uri).expanduser()))
    return MilvusClient(uri=uri, token=token or "")


def _schema(dimension: int) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field(TENANT_FIELD, DataType.VARCHAR, max_length=64, is_partition_key=True)
    schema.add_field(DOCUMENT_FIELD, DataType.VARCHAR, max_length=1024)
    schema.add_field(CHUNK_INDEX_FIELD, DataType.INT64)
    schema.add_field(
        TEXT_FIELD, DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True, analyzer_params=ANALYZER_PARAMS
    )
    schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field(DENSE_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field(METADATA_FIELD, DataType.JSON)
    schema.add_function(
        Function(
            name=BM25_FUNCTION,
            function_type=FunctionType.BM25,
            input_field_names=[TEXT_FIELD],
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
        params.add_index(field_name=SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return params


def ensure_collection(client: MilvusClient, collection: str, dimension: int) -> list[str]:
    """Create the chunk collection, or check and complete an existing one. Idempotent.

    Returns what was done. An existing collection gets any missing index and is loaded; one whose
    fields or vector size differ raises SchemaMismatchError (re-embedding every chunk is an explicit
    migration, never something a start-up does silently).
    """
    actions: list[str] = []
    if not client.has_collection(collection):
        client.create_collection(
            collection,
            schema=_schema(dimension),
            index_params=_index_params(client, {DENSE_FIELD, SPARSE_FIELD}),
            num_partitions=PARTITIONS,
        )
        actions.append(f"created collection {collection} (dense dim {dimension}, BM25 on {TEXT_FIELD})")
    else:
        described = client.describe_collection(collection)
        fields = {f["name"]: f for f in described["fields"]}
        expected = {KEY_FIELD, TENANT_FIELD, DOCUMENT_FIELD, CHUNK_INDEX_FIELD, TEXT_FIELD, SPARSE_FIELD}
        expected |= {DENSE_FIELD, METADATA_FIELD}
        if missing := expected - fields.keys():
            raise SchemaMismatchError(f"collection {collection} lacks fields {sorted(missing)}")
        existing_dim = int(fields[DENSE_FIELD].get("params", {}).get("dim", 0))
        if existing_dim != dimension:
            raise SchemaMismatchError(
                f"collection {collection} stores {existing_dim}-dimensional vectors but the embedding model makes "
                f"{dimension}; use another collection or re-ingest into a new one"
            )
        if not fields[TENANT_FIELD].get("is_partition_key"):
            raise SchemaMismatchError(f"collection {collection}: {TENANT_FIELD} is not its partition key")
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
        # BM25 distances come back negative from Milvus Lite and positive from a server; larger magnitude
        # is better in both, and cosine similarities and RRF scores are never negative here.
        score=abs(float(score)),
        metadata=dict(entity.get(METADATA_FIELD) or {}),
    )


@dataclass
class MilvusVectorIndex:
    """The `VectorIndex` port over a pymilvus client, on `threads` worker threads."""

    client: MilvusClient
    collection: str
    candidates_per_k: int = 4
    rrf_k: int = 60
    threads: int = 4

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="milvus")

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args, **kwargs))

    async def upsert(self, rows: Sequence[ChunkRow]) -> None:
        records = [
            {
                KEY_FIELD: r.key,
                TENANT_FIELD: r.tenant,
                DOCUMENT_FIELD: r.document_id,
                CHUNK_INDEX_FIELD: r.chunk_index,
                TEXT_FIELD: r.text,
                DENSE_FIELD: r.vector,
                METADATA_FIELD: r.metadata,
            }
            for r in rows
        ]
        if records:
            await self._run(self.client.upsert, self.collection, records)

    async def delete(self, expression: str) -> int:
        result = await self._run(self.client.delete, self.collection, filter=expression)
        return int(result.get("delete_count", 0)) if isinstance(result, dict) else 0

    async def has_any(self, expression: str) -> bool:
        rows = await self._run(
            self.client.query, self.collection, filter=expression, output_fields=[KEY_FIELD], limit=1
        )
        return bool(rows)

    async def search(
        self, *, mode: SearchMode, query: str, vector: Sequence[float], expression: str, limit: int
    ) -> list[Hit]:
        return await self._run(self._search_sync, mode, query, list(vector), expression, limit)

    def _search_sync(self, mode: SearchMode, query: str, vector: list[float], expression: str, limit: int) -> list[Hit]:
        dense_params = {"metric_type": "COSINE", "params": {"ef": max(64, limit * self.candidates_per_k)}}
        if mode == "dense":
            results = self.client.search(
                self.collection,
                data=[vector],
                anns_field=DENSE_FIELD,
                filter=expression,
                limit=limit,
                search_params=dense_params,
                output_fields=OUTPUT_FIELDS,
            )
        elif mode == "bm25":
            results = self.client.search(
                self.collection,
                data=[query],
                anns_field=SPARSE_FIELD,
                filter=expression,
                limit=limit,
                search_params={"metric_type": "BM25"},
                output_fields=OUTPUT_FIELDS,
            )
        else:
            candidates = limit * self.candidates_per_k
            requests = [
                AnnSearchRequest(
                    data=[vector], anns_field=DENSE_FIELD, param=dense_params, limit=candidates, expr=expression
                ),
                AnnSearchRequest(
                    data=[query],
                    anns_field=SPARSE_FIELD,
                    param={"metric_type": "BM25"},
                    limit=candidates,
                    expr=expression,
                ),
            ]
            results = self.client.hybrid_search(
                self.collection, requests, RRFRanker(self.rrf_k), limit=limit, output_fields=OUTPUT_FIELDS
            )
        return [_hit(match["entity"], match["distance"]) for match in results[0]] if results else []

    async def close(self) -> None:
        await self._run(self.client.close)
        self._executor.shutdown(wait=False)
