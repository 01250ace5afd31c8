"""The Milvus index adapter on a real Milvus Lite file: batched searches never mix tenants; BM25 reads identifiers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from agentbus.retriever.adapters.milvus import MilvusVectorIndex, connect, ensure_collection, open_client
from agentbus.retriever.analysis import analyzed_text
from agentbus.retriever.domain import chunk_key, tenant_condition
from agentbus.retriever.ports import ChunkRow

DIMENSION = 8


def _rows(tenant: str, count: int) -> list[ChunkRow]:
    rng = np.random.default_rng(3)  # the same vectors and texts for every tenant
    rows = []
    for i in range(count):
        vector = rng.standard_normal(DIMENSION).astype(np.float32)
        text = f"shared words about kettles and teapots number {i}"
        rows.append(
            ChunkRow(
                key=chunk_key(tenant, f"doc-{i}", 0),
                tenant=tenant,
                document_id=f"doc-{i}",
                chunk_index=0,
                text=text,
                terms=analyzed_text(text),
                vector=(vector / np.linalg.norm(vector)).tolist(),
                metadata={"owner": tenant},
                ingested_by="app",
            )
        )
    return rows


async def test_concurrent_searches_share_calls_but_never_tenants(tmp_path: Path) -> None:
    client = connect(str(tmp_path / "index.db"))
    ensure_collection(client, "chunks", DIMENSION)
    index = MilvusVectorIndex(client, "chunks")
    calls: list[int] = []
    search = client.search

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["data"]))
        return search(*args, **kwargs)

    client.search = counted
    try:
        for tenant in ("acme", "globex"):
            await index.upsert(_rows(tenant, 12))
        await index.flush()
        query = _rows("any", 1)[0]
        tenants = ["acme", "globex"] * 10
        results = await asyncio.gather(
            *(index.search_dense(query.vector, tenant_condition(t), 5) for t in tenants),
            *(index.search_bm25(analyzed_text("kettles"), tenant_condition(t), 5) for t in tenants),
        )
        for tenant, hits in zip(tenants * 2, results, strict=True):
            assert len(hits) == 5
            assert {h.tenant for h in hits} == {tenant}
            assert {h.metadata["owner"] for h in hits} == {tenant}
        # 40 searches, yet fewer calls: those with the same field, filter and limit went together.
        assert sum(calls) == 40
        assert len(calls) < 40
        assert max(calls) > 1
    finally:
        await index.close()


def test_a_lite_file_is_served_by_a_child_process_until_its_input_closes(tmp_path: Path) -> None:
    client, server = open_client(str(tmp_path / "served.db"))
    assert server is not None
    process = server._process
    assert process is not None
    try:
        assert ensure_collection(client, "chunks", DIMENSION)[0].startswith("created collection chunks")
        assert client.has_collection("chunks")
    finally:
        client.close()
        server.stop()
    assert process.returncode == 0
    # The file's lock went with the child: this process can open it now and finds what the child wrote.
    again = connect(str(tmp_path / "served.db"))
    try:
        assert again.has_collection("chunks")
    finally:
        again.close()


def test_an_index_whose_lite_process_died_is_not_serving(tmp_path: Path) -> None:
    client, server = open_client(str(tmp_path / "dies.db"))
    assert server is not None
    index = MilvusVectorIndex(client, "chunks", owned=server)
    assert index.serving()
    assert server._process is not None
    server._process.kill()
    server._process.wait()
    assert not index.serving()
    client.close()
    server.stop()


async def test_bm25_finds_an_identifier_by_its_parts_and_ranks_its_exact_name_first(tmp_path: Path) -> None:
    texts = {
        "takes": "x : array_like\n    Input data, in any form: lists, tuples, nested sequences.",
        "prose": "Convert the input to an array; anything array-like is accepted.",
        "other": "Return the number of elements along a given axis.",
    }
    client = connect(str(tmp_path / "index.db"))
    ensure_collection(client, "chunks", DIMENSION)
    index = MilvusVectorIndex(client, "chunks")
    vector = np.eye(DIMENSION, dtype=np.float32)[0].tolist()
    rows = [
        ChunkRow(chunk_key("t", doc, 0), "t", doc, 0, text, analyzed_text(text), vector, {}, "app")
        for doc, text in texts.items()
    ]
    try:
        await index.upsert(rows)
        await index.flush()
        by_name = await index.search_bm25(analyzed_text("array_like"), tenant_condition("t"), 3)
        by_parts = await index.search_bm25(analyzed_text("array-like values"), tenant_condition("t"), 3)
    finally:
        await index.close()
    assert [h.document_id for h in by_name][:1] == ["takes"]
    assert {h.document_id for h in by_parts} == {"takes", "prose"}
