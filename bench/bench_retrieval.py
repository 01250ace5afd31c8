"""The retriever against raw pymilvus: ingestion in chunks/s, and search latency and QPS at 100k chunks.

Figures, not a test. Everything runs in one invocation, on one nats-server from the wheel:

1. **Ingestion, real embeddings.** Real text (Python standard-library docstrings read with `ast`) is
   published as DocumentsIngest batches to a retriever process (`python -m agentbus.retriever`, fresh
   Milvus Lite file); chunks/s = chunks / (first publish -> its consumer drained). The floor: the same
   chunks embedded with the same numpy MiniLM and upserted with raw pymilvus, in this process.
2. **A 100k-chunk collection.** Embedding 100k chunks with MiniLM on 2 CPU cores would take hours, so
   the collection is loaded with **pre-computed vectors**: perturbed copies (noise, then re-normalised)
   of real MiniLM embeddings of docstring sentences, with texts made of those real sentences, 10 tenants
   of 10k chunks each, inserted with raw pymilvus through the retriever's own `ensure_collection`.
3. **Raw pymilvus search (the ceiling)**, in this process on that file: for each query, embed it with
   the same MiniLM and run the same hybrid search (dense + BM25, RRF, tenant filter, same candidate
   counts), `--concurrency` at a time on threads.
4. **The service**: the retriever process opens the same file and the same queries go through its real
   request/reply path (`agentbus.retrieval.search.<tenant>`), `--concurrency` requests in flight.

Milvus Lite holds its file locked, so 3 and 4 run one after the other, never at once.

    uv run python bench/bench_retrieval.py [--chunks 100000] [--queries 100] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import numpy as np
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_INGEST_DOCUMENTS, RAG_SEARCH, RETRIEVER_INGEST
from agentbus.retriever.adapters.milvus import (
    DENSE_FIELD,
    OUTPUT_FIELDS,
    SPARSE_FIELD,
    connect,
    ensure_collection,
)
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.domain import chunk_key, chunk_text, search_filter
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from milvus_lite.server_manager import server_manager_instance  # type: ignore[import-untyped]
from pymilvus import AnnSearchRequest, RRFRanker  # type: ignore[import-untyped]

COLLECTION = "bench_chunks"
TENANTS = 10
TOP_K = 5
CANDIDATES_PER_K = 4  # the retriever's default
RRF_K = 60
CHUNK_CHARS, OVERLAP_CHARS = 1000, 150
RATIO_GOAL = 0.8
STDLIB_MODULES = (
    "argparse",
    "asyncio/tasks",
    "collections/__init__",
    "email/message",
    "logging/__init__",
    "pathlib",
    "shutil",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest/case",
    "urllib/request",
    "zipfile",
    "inspect",
    "datetime",
    "decimal",
    "configparser",
)


def docstrings() -> list[tuple[str, str]]:
    """(name, docstring) of public functions and classes of a fixed list of stdlib modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for module in STDLIB_MODULES:
        tree = ast.parse((stdlib / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                text = ast.get_docstring(node)
                if text and len(text) > 80:
                    found.append((f"{module}:{node.lineno}:{node.name}", text))
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def retriever_process(nats_url: str, milvus_uri: str, log_path: Path, concurrency: int) -> Iterator[None]:
    env = {
        **os.environ,
        "AGENTBUS_RETRIEVER_NATS_URL": nats_url,
        "AGENTBUS_RETRIEVER_MILVUS_URI": milvus_uri,
        "AGENTBUS_RETRIEVER_COLLECTION": COLLECTION,
        "AGENTBUS_RETRIEVER_LOG_LEVEL": "WARNING",
        "AGENTBUS_RETRIEVER_SEARCH_CONCURRENCY": str(max(concurrency, 1)),
    }
    with log_path.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "agentbus.retriever"], env=env, stdout=out, stderr=out)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def wait_for_search(nc: Any, tenant: str, timeout: float = 600) -> None:
    request = SearchRequest(tenant=tenant, query="warm up", top_k=1).model_dump_json().encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            reply = SearchReply.model_validate_json(
                (await nc.request(RAG_SEARCH.format(tenant=tenant), request, timeout=30)).data
            )
            if reply.error is None or reply.error.code == "unknown_tenant":
                return
        await asyncio.sleep(0.5)
    raise RuntimeError("the retriever did not answer in time; see its log")


# --- 1. ingestion ----------------------------------------------------------------------------------


async def bench_ingest(
    nats_url: str, work: Path, documents: list[tuple[str, str]], embedder: MiniLmEmbedder
) -> dict[str, float]:
    chunks = sum(len(chunk_text(text, CHUNK_CHARS, OVERLAP_CHARS)) for _, text in documents)
    # Floor: the same chunks, embedded and upserted directly.
    client = connect(str(work / "ingest-raw.db"))
    ensure_collection(client, COLLECTION, embedder.dimension)
    started = time.perf_counter()
    for name, text in documents:
        pieces = chunk_text(text, CHUNK_CHARS, OVERLAP_CHARS)
        vectors = embedder.embed_sync(pieces)
        client.upsert(
            COLLECTION,
            [
                {
                    "chunk_key": chunk_key("ingest", name, i),
                    "tenant": "ingest",
                    "document_id": name,
                    "chunk_index": i,
                    "text": piece,
                    "dense": vectors[i].tolist(),
                    "metadata": {},
                }
                for i, piece in enumerate(pieces)
            ],
        )
    raw_seconds = time.perf_counter() - started
    client.close()
    log(f"ingest floor: {chunks} chunks in {raw_seconds:.1f}s")

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with retriever_process(nats_url, str(work / "ingest-service.db"), work / "retriever-ingest.log", 4):
        await wait_for_search(nc, "ingest")
        started = time.perf_counter()
        for i in range(0, len(documents), 8):
            batch = [IngestDocument(id=n, text=t) for n, t in documents[i : i + 8]]
            await js.publish(
                RAG_INGEST_DOCUMENTS.format(tenant="ingest"),
                DocumentsIngest(tenant="ingest", documents=batch).model_dump_json().encode(),
            )
        while True:
            info = await js.consumer_info(RETRIEVER_INGEST.stream, RETRIEVER_INGEST.durable)
            if not info.num_pending and not info.num_ack_pending:
                break
            await asyncio.sleep(0.05)
        service_seconds = time.perf_counter() - started
    await nc.close()
    log(f"ingest service: {chunks} chunks in {service_seconds:.1f}s")
    return {
        "chunks": chunks,
        "raw_chunks_per_s": chunks / raw_seconds,
        "service_chunks_per_s": chunks / service_seconds,
    }


# --- 2. the 100k collection ------------------------------------------------------------------------


def load_collection(uri: str, total: int, sentences: list[str], embedder: MiniLmEmbedder) -> float:
    rng = np.random.default_rng(7)
    pool = embedder.embed_sync(sentences)
    log(f"embedded {len(pool)} real sentences for the vector pool")
    client = connect(uri)
    ensure_collection(client, COLLECTION, embedder.dimension)
    started = time.perf_counter()
    batch = 5000
    for start in range(0, total, batch):
        count = min(batch, total - start)
        picks = rng.integers(0, len(pool), size=(count, 3))
        vectors = (
            pool[picks[:, 0]]
            + 0.5 * pool[picks[:, 1]]
            + 0.25 * rng.standard_normal((count, pool.shape[1])).astype(np.float32) / np.sqrt(pool.shape[1])
        )
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = []
        for i in range(count):
            n = start + i
            text = " ".join(sentences[j] for j in picks[i])
            rows.append(
                {
                    "chunk_key": f"bench-{n:07d}",
                    "tenant": f"tenant-{n % TENANTS}",
                    "document_id": f"doc-{n // 4}",
                    "chunk_index": n % 4,
                    "text": text[:4000],
                    "dense": vectors[i].tolist(),
                    "metadata": {"n": n},
                }
            )
        client.insert(COLLECTION, rows)
        log(f"  loaded {start + count}/{total} chunks ({time.perf_counter() - started:.0f}s)")
    client.flush(COLLECTION)
    seconds = time.perf_counter() - started
    client.close()
    server_manager_instance.release_server(uri)
    return seconds


# --- 3. raw pymilvus search ------------------------------------------------------------------------


def raw_search(
    uri: str, queries: list[tuple[str, str]], embedder: MiniLmEmbedder, concurrency: int
) -> dict[str, float]:
    client = connect(uri)
    ensure_collection(client, COLLECTION, embedder.dimension)

    def one(item: tuple[str, str]) -> float:
        tenant, query = item
        started = time.perf_counter()
        vector = embedder.embed_sync([query])[0].tolist()
        expression = search_filter(tenant, [])
        dense = {"metric_type": "COSINE", "params": {"ef": max(64, TOP_K * CANDIDATES_PER_K)}}
        requests = [
            AnnSearchRequest(
                data=[vector], anns_field=DENSE_FIELD, param=dense, limit=TOP_K * CANDIDATES_PER_K, expr=expression
            ),
            AnnSearchRequest(
                data=[query],
                anns_field=SPARSE_FIELD,
                param={"metric_type": "BM25"},
                limit=TOP_K * CANDIDATES_PER_K,
                expr=expression,
            ),
        ]
        result = client.hybrid_search(COLLECTION, requests, RRFRanker(RRF_K), limit=TOP_K, output_fields=OUTPUT_FIELDS)
        assert len(result[0]) == TOP_K
        assert all(hit["entity"]["tenant"] == tenant for hit in result[0])
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, queries[:20]))  # warm-up
        started = time.perf_counter()
        latencies = list(pool.map(one, queries))
        elapsed = time.perf_counter() - started
    client.close()
    server_manager_instance.release_server(uri)
    return summarize(latencies, elapsed)


# --- 4. the service --------------------------------------------------------------------------------


async def service_search(
    nats_url: str, uri: str, work: Path, queries: list[tuple[str, str]], concurrency: int
) -> dict[str, float]:
    nc = await nats.connect(nats_url)
    with retriever_process(nats_url, uri, work / "retriever-search.log", concurrency):
        log("waiting for the retriever to open the 100k collection")
        await wait_for_search(nc, "tenant-0")
        slots = asyncio.Semaphore(concurrency)

        async def one(item: tuple[str, str]) -> float:
            tenant, query = item
            payload = SearchRequest(tenant=tenant, query=query, top_k=TOP_K).model_dump_json().encode()
            async with slots:
                started = time.perf_counter()
                msg = await nc.request(RAG_SEARCH.format(tenant=tenant), payload, timeout=60)
                elapsed = time.perf_counter() - started
            reply = SearchReply.model_validate_json(msg.data)
            assert reply.error is None, reply.error
            assert len(reply.chunks) == TOP_K
            return elapsed

        await asyncio.gather(*(one(q) for q in queries[:20]))
        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(q) for q in queries))
        elapsed = time.perf_counter() - started
    await nc.close()
    return summarize(list(latencies), elapsed)


def summarize(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "qps": len(latencies) / elapsed,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = docstrings()
    sentences = sorted(
        {s.strip() for _, t in texts for s in t.replace("\n", " ").split(". ") if 40 <= len(s.strip()) <= 300}
    )
    queries = [(f"tenant-{i % TENANTS}", t.split("\n")[0].strip()) for i, (_, t) in enumerate(texts)][: args.queries]
    embedder = MiniLmEmbedder(batch_size=32)
    embedder.load()
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs",
        "chunks": args.chunks,
        "concurrency": args.concurrency,
    }
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        work = Path(tmp)
        server = NatsServerProcess(
            store_dir=work / "nats", port=free_port(), monitor_port=free_port(), log_file=work / "nats.log"
        )
        (work / "nats").mkdir()
        server.start()
        try:
            nc = await nats.connect(server.url)
            await apply_topology(nc.jetstream())
            await nc.close()
            results["ingest"] = await bench_ingest(server.url, work, texts[: args.ingest_documents], embedder)
            uri = str(work / "search.db")
            results["load_seconds"] = load_collection(uri, args.chunks, sentences[: args.pool], embedder)
            log(f"loaded {args.chunks} chunks in {results['load_seconds']:.0f}s")
            results["raw"] = raw_search(uri, queries, embedder, args.concurrency)
            log(f"raw: {results['raw']}")
            results["service"] = await service_search(server.url, uri, work, queries, args.concurrency)
            log(f"service: {results['service']}")
        finally:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--ingest-documents", type=int, default=40, help="real documents for the ingest figure")
    parser.add_argument("--pool", type=int, default=512, help="real sentences embedded for the vector pool")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    ingest, raw, service = results["ingest"], results["raw"], results["service"]
    print(
        f"\nretriever benchmark ({results['machine']}; {results['chunks']} chunks, {TENANTS} tenants; "
        f"hybrid top_k={TOP_K}; concurrency {results['concurrency']})"
    )
    print(f"ingest, real MiniLM embeddings ({ingest['chunks']} chunks):")
    print(f"  service (NATS -> retriever -> Milvus Lite) {ingest['service_chunks_per_s']:8.1f} chunks/s")
    print(
        f"  raw (embed + pymilvus upsert in-process)   {ingest['raw_chunks_per_s']:8.1f} chunks/s"
        f"   ratio {ingest['service_chunks_per_s'] / ingest['raw_chunks_per_s']:.2f}x"
    )
    print(f"{'search':<28} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>8}")
    for name, figures in (("raw pymilvus (ceiling)", raw), ("service request/reply", service)):
        print(f"{name:<28} {figures['p50_ms']:>8.1f} {figures['p99_ms']:>8.1f} {figures['qps']:>8.1f}")
    ratio = service["qps"] / raw["qps"]
    print(f"service/raw QPS {ratio:.2f}x (goal >= {RATIO_GOAL}x): {'met' if ratio >= RATIO_GOAL else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
