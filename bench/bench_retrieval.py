"""The retriever: quality per mode beside two baselines, search latency alone and 50 at once, ingest speed.

Figures, not a test. Everything runs in one invocation, on one nats-server from the wheel, against the
retriever as it is deployed (`python -m agentbus.retriever`, which serves its Milvus Lite file from a
child process), reached over NATS as any client reaches it:

1. **Quality** (`bench/eval_retrieval.py`): R@1, R@5, MRR@10 and nDCG@10 of dense, BM25 and hybrid on
   the stdlib, numpy and sqlalchemy docstring sets, beside textbook BM25 and exact cosine over whole
   documents.
   `--skip-quality` leaves it out.
2. **Ingest**: real documents (stdlib docstrings) published as DocumentsIngest batches of 8 on
   `agentbus.rag.ingest.<tenant>.<submitter>`; chunks/s from the first publish until the consumer holds
   nothing. The floor: the same chunks embedded by the same MiniLM in this process (`embed_sync`, all at
   once, numpy's default BLAS threads), measured just before and just after; the faster of the two counts.
3. **Search** over a `--chunks` corpus (10k) in one tenant. Embedding 10k chunks on two cores takes
   many minutes, so the corpus is loaded with **pre-computed vectors**: perturbed copies of real MiniLM
   embeddings of docstring sentences, with texts made of those real sentences (and their BM25 terms),
   inserted with raw pymilvus through the retriever's own `ensure_collection`, then flushed. Queries are
   real docstring summaries, hybrid, top_k 5, with the retriever's query cache off (every search embeds
   its query):
   - sequentially, one at a time (the floor);
   - in bursts of `--clients` (50) searches sent at once, each burst as soon as the last is answered;
   - meanwhile a separate process polls the retriever's `/healthz` every 20 ms (and, as its floor, for a
     few seconds while the retriever is idle).
   CPU per search: user+system time of the retriever and its children (the Milvus Lite server, the
   embedding workers) over the run.

Each search figure is the median of `--repeat` runs (3), with every run shown. Ratios compare figures
taken in the same run, which matters on a shared, noisy machine.

    uv run python bench/bench_retrieval.py [--chunks 10000] [--clients 50] [--repeat 3] [--skip-quality]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_INGEST_DOCUMENTS, RAG_SEARCH, RETRIEVER_INGEST
from agentbus.retriever.adapters.milvus import connect, ensure_collection
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.analysis import analyzed_text
from agentbus.retriever.domain import chunk_key, chunk_text
from agentbus.retriever.settings import RetrieverSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from milvus_lite.server_manager import server_manager_instance  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import eval_retrieval  # the repository root is on the path only from here on

COLLECTION = "bench_chunks"
TENANT = "bench"
TOP_K = 5
INGEST_BATCH = 8
HEALTH_INTERVAL_SECONDS = 0.02
GOALS = {"p95_ratio": 3.0, "searches_per_s": 50.0, "healthz_p95_ms": 10.0, "ingest_ratio": 0.8}

HEALTH_POLLER = textwrap.dedent(
    """
    import http.client, sys, time
    host, port, interval, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        while True:
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                line = str(time.perf_counter() - started)
            except OSError as exc:
                conn.close()
                line = f"failed:{exc!r}"
            with open(out, "a") as f:
                f.write(line + "\\n")
            time.sleep(max(0.0, interval - (time.perf_counter() - started)))
    except KeyboardInterrupt:
        pass
    """
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (whichever of its threads started them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class Retriever:
    """`python -m agentbus.retriever` on a Milvus Lite file, with its HTTP port known."""

    def __init__(self, nats_url: str, milvus_uri: str, log_path: Path) -> None:
        self.http_port = free_port()
        self._env = {
            **os.environ,
            "AGENTBUS_RETRIEVER_NATS_URL": nats_url,
            "AGENTBUS_RETRIEVER_MILVUS_URI": milvus_uri,
            "AGENTBUS_RETRIEVER_COLLECTION": COLLECTION,
            "AGENTBUS_RETRIEVER_LOG_LEVEL": "WARNING",
            "AGENTBUS_RETRIEVER_HTTP_PORT": str(self.http_port),
            # Every search embeds its query: the figures never come from the query cache.
            "AGENTBUS_RETRIEVER_QUERY_CACHE_SIZE": "0",
        }
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Retriever:
        with self._log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentbus.retriever"], env=self._env, stdout=out, stderr=out
            )
        return self

    def check_running(self) -> None:
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            raise RuntimeError(f"the retriever exited with {code}; its log: {self._log_path}")

    def cpu(self) -> float:
        """CPU seconds of the retriever and its children (the Milvus Lite server)."""
        assert self.process is not None
        pids = [self.process.pid, *children(self.process.pid)]
        return sum(cpu_seconds(pid) for pid in pids)

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def wait_for_search(nc: Any, tenant: str, timeout: float = 300) -> None:
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


@contextlib.contextmanager
def health_poller(port: int, out: Path) -> Iterator[Path]:
    """A separate process polling /healthz, so its figures do not include this process's own event loop."""
    out.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", HEALTH_POLLER, "127.0.0.1", str(port), str(HEALTH_INTERVAL_SECONDS), str(out)]
    )
    try:
        yield out
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_latencies(path: Path) -> list[float]:
    """The poller's latencies; a /healthz request that failed stops the benchmark (the figure would lie)."""
    lines = path.read_text().split("\n") if path.exists() else []
    if failed := [line for line in lines if line.startswith("failed:")]:
        raise RuntimeError(f"/healthz failed {len(failed)} times, e.g. {failed[0]}; see the retriever's log")
    return [float(line) for line in lines if line]


# --- ingest ----------------------------------------------------------------------------------------


async def bench_ingest(nats_url: str, work: Path, documents: list[tuple[str, str]]) -> dict[str, float]:
    settings = RetrieverSettings()
    chunks = [c for _, t in documents for c in chunk_text(t, settings.chunk_chars, settings.chunk_overlap_chars)]
    embedder = MiniLmEmbedder(batch_size=settings.embedding_batch_size)
    embedder.load()
    embedder.embed_sync(chunks[:8])

    def model_rate() -> float:
        started = time.perf_counter()
        embedder.embed_sync(chunks)
        return len(chunks) / (time.perf_counter() - started)

    before = model_rate()
    log(f"ingest floor: the model embeds {len(chunks)} chunks at {before:.1f}/s in this process")

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with Retriever(nats_url, str(work / "ingest.db"), work / "retriever-ingest.log"):
        await wait_for_search(nc, "ingest")
        started = time.perf_counter()
        for i in range(0, len(documents), INGEST_BATCH):
            batch = [IngestDocument(id=n, text=t) for n, t in documents[i : i + INGEST_BATCH]]
            await js.publish(
                RAG_INGEST_DOCUMENTS.format(tenant="ingest", submitter="bench"),
                DocumentsIngest(tenant="ingest", documents=batch).model_dump_json().encode(),
            )
        while True:
            info = await js.consumer_info(RETRIEVER_INGEST.stream, RETRIEVER_INGEST.durable)
            if not info.num_pending and not info.num_ack_pending:
                break
            await asyncio.sleep(0.05)
        service_rate = len(chunks) / (time.perf_counter() - started)
    await nc.close()
    after = model_rate()
    log(f"ingest service: {service_rate:.1f} chunks/s; the model again: {after:.1f}/s")
    # The faster of the two floors, taken around the service's run: the stricter comparison on a noisy machine.
    return {"chunks": len(chunks), "model_chunks_per_s": max(before, after), "service_chunks_per_s": service_rate}


# --- the search corpus -----------------------------------------------------------------------------


def load_corpus(uri: str, total: int, sentences: list[str], embedder: MiniLmEmbedder) -> None:
    rng = np.random.default_rng(7)
    pool = embedder.embed_sync(sentences)
    log(f"embedded {len(pool)} real sentences for the vector pool")
    client = connect(uri)
    ensure_collection(client, COLLECTION, embedder.dimension)
    for start in range(0, total, 2000):
        count = min(2000, total - start)
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
                    "chunk_key": chunk_key(TENANT, f"doc-{n // 4}", n % 4),
                    "tenant": TENANT,
                    "document_id": f"doc-{n // 4}",
                    "chunk_index": n % 4,
                    "text": text,
                    "terms": analyzed_text(text),
                    "dense": vectors[i].tolist(),
                    "metadata": {"n": n},
                    "ingested_by": "bench",
                }
            )
        client.insert(COLLECTION, rows)
    client.flush(COLLECTION)
    client.close()
    server_manager_instance.release_server(uri)
    log(f"loaded {total} chunks")


# --- search ----------------------------------------------------------------------------------------


async def search_run(nc: Any, retriever: Retriever, queries: list[str], clients: int, work: Path) -> dict[str, float]:
    """Bursts of `clients` searches sent at once; the next burst goes when all of one are answered."""
    latencies: list[float] = []

    async def one(query: str) -> None:
        payload = SearchRequest(tenant=TENANT, query=query, top_k=TOP_K).model_dump_json().encode()
        started = time.perf_counter()
        msg = await nc.request(RAG_SEARCH.format(tenant=TENANT), payload, timeout=120)
        latencies.append(time.perf_counter() - started)
        reply = SearchReply.model_validate_json(msg.data)
        assert reply.error is None, reply.error
        assert len(reply.chunks) == TOP_K

    cpu_before = retriever.cpu()
    with health_poller(retriever.http_port, work / "healthz.txt") as health:
        started = time.perf_counter()
        for start in range(0, len(queries), clients):
            await asyncio.gather(*(one(q) for q in queries[start : start + clients]))
        elapsed = time.perf_counter() - started
    cpu = retriever.cpu() - cpu_before
    retriever.check_running()
    health_ms = [v * 1000 for v in read_latencies(health)]
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "searches_per_s": len(latencies) / elapsed,
        "cpu_ms_per_search": cpu / len(latencies) * 1000,
        "healthz_p95_ms": percentile(health_ms, 0.95) if health_ms else float("nan"),
        "healthz_samples": len(health_ms),
    }


async def idle_health(retriever: Retriever, work: Path, seconds: float = 3.0) -> float:
    with health_poller(retriever.http_port, work / "healthz-idle.txt") as health:
        await asyncio.sleep(seconds)
    return percentile([v * 1000 for v in read_latencies(health)], 0.95)


async def bench_search(
    nats_url: str, uri: str, work: Path, queries: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    runs: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    idle: list[float] = []
    with Retriever(nats_url, uri, work / "retriever-search.log") as retriever:
        await wait_for_search(nc, TENANT)
        async with httpx.AsyncClient() as http:  # ready: consumers pulling, search subscribed
            while (await http.get(f"http://127.0.0.1:{retriever.http_port}/readyz")).status_code != 200:
                await asyncio.sleep(0.2)
        await search_run(nc, retriever, queries[:20], 1, work)  # warm-up (model, caches, gRPC channel)
        for run in range(args.repeat):
            batch = [queries[(run * 997 + i) % len(queries)] for i in range(args.sequential + args.concurrent_searches)]
            idle.append(await idle_health(retriever, work))
            runs["sequential"].append(await search_run(nc, retriever, batch[: args.sequential], 1, work))
            runs["concurrent"].append(await search_run(nc, retriever, batch[args.sequential :], args.clients, work))
            log(f"run {run + 1}: sequential {runs['sequential'][-1]}")
            log(f"run {run + 1}: {args.clients} clients {runs['concurrent'][-1]}")
    await nc.close()
    medians = {
        kind: {key: statistics.median(r[key] for r in results) for key in results[0]} for kind, results in runs.items()
    }
    return {"runs": runs, "median": medians, "idle_healthz_p95_ms": statistics.median(idle)}


def search_queries() -> list[str]:
    seen: dict[str, None] = {}
    for name in ("stdlib", "numpy"):
        for example in eval_retrieval.derive_examples(name):
            seen.setdefault(example.query, None)
    return list(seen)


# --- report ----------------------------------------------------------------------------------------


def print_quality(quality: dict[str, Any]) -> None:
    for name, figures in quality.items():
        for split in ("all", "held-out"):
            eval_retrieval.print_table(f"quality, {name} set", figures, split)


def print_search(search: dict[str, Any], clients: int, chunks: int) -> dict[str, bool]:
    sequential, concurrent = search["median"]["sequential"], search["median"]["concurrent"]
    print(f"\nsearch, hybrid top_k {TOP_K}, {chunks} chunks (medians of {len(search['runs']['sequential'])} runs)")
    print("| searches at once | p50 ms | p95 ms | searches/s | CPU ms per search | /healthz p95 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| idle | | | | | {search['idle_healthz_p95_ms']:.1f} |")
    for label, m in (("1", sequential), (str(clients), concurrent)):
        print(
            f"| {label} | {m['p50_ms']:.1f} | {m['p95_ms']:.1f} | {m['searches_per_s']:.1f} | "
            f"{m['cpu_ms_per_search']:.1f} | {m['healthz_p95_ms']:.1f} |"
        )
    ratio = concurrent["p95_ms"] / sequential["p95_ms"]
    print("runs (p95 ms, searches/s, /healthz p95 ms):")
    for seq, con in zip(search["runs"]["sequential"], search["runs"]["concurrent"], strict=True):
        print(
            f"  1 client {seq['p95_ms']:.1f}, {seq['searches_per_s']:.1f}, {seq['healthz_p95_ms']:.1f}; "
            f"{clients} clients {con['p95_ms']:.1f}, {con['searches_per_s']:.1f}, {con['healthz_p95_ms']:.1f}"
        )
    return {
        f"{clients}-client p95 <= {GOALS['p95_ratio']}x sequential p95 (ratio {ratio:.2f})": ratio
        <= GOALS["p95_ratio"],
        f">= {GOALS['searches_per_s']:.0f} searches/s ({concurrent['searches_per_s']:.1f})": concurrent[
            "searches_per_s"
        ]
        >= GOALS["searches_per_s"],
        f"/healthz p95 <= {GOALS['healthz_p95_ms']:.0f} ms during the burst ({concurrent['healthz_p95_ms']:.1f})": (
            concurrent["healthz_p95_ms"] <= GOALS["healthz_p95_ms"]
        ),
    }


def print_ingest(ingest: dict[str, float]) -> dict[str, bool]:
    ratio = ingest["service_chunks_per_s"] / ingest["model_chunks_per_s"]
    print(f"\ningest, real MiniLM embeddings ({ingest['chunks']:.0f} chunks)")
    print(f"| service (NATS -> retriever -> Milvus Lite) | {ingest['service_chunks_per_s']:.1f} chunks/s |")
    print(f"| the model alone, in-process | {ingest['model_chunks_per_s']:.1f} chunks/s |")
    return {f"ingest >= {GOALS['ingest_ratio']}x the model's rate ({ratio:.2f})": ratio >= GOALS["ingest_ratio"]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "chunks": args.chunks, "clients": args.clients}
    embedder = MiniLmEmbedder(batch_size=32)
    embedder.load()
    if not args.skip_quality:
        results["quality"] = {}
        for name in eval_retrieval.SOURCES:
            eval_set = eval_retrieval.load_set(name, 300, 150, 11)
            figures, _, _ = await eval_retrieval.evaluate(eval_set, embedder)
            results["quality"][name] = figures
    examples = eval_retrieval.derive_examples("stdlib")
    sentences = sorted(
        {s.strip() for e in examples for s in e.body.replace("\n", " ").split(". ") if 40 <= len(s.strip()) <= 300}
    )
    queries = search_queries()
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = Path(tempfile.mkdtemp(prefix="bench-retrieval-kept-"))
            log(f"logs and files kept in {work}")
        (work / "nats").mkdir()
        server = NatsServerProcess(
            store_dir=work / "nats", port=free_port(), monitor_port=free_port(), log_file=work / "nats.log"
        )
        server.start()
        try:
            nc = await nats.connect(server.url)
            await apply_topology(nc.jetstream())
            await nc.close()
            documents = [(e.document_id, e.body) for e in examples[: args.ingest_documents]]
            results["ingest"] = await bench_ingest(server.url, work, documents)
            uri = str(work / "search.db")
            load_corpus(uri, args.chunks, sentences[: args.pool], embedder)
            results["search"] = await bench_search(server.url, uri, work, queries, args)
        finally:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks in the searched corpus")
    parser.add_argument("--clients", type=int, default=50, help="searches sent at once in a burst")
    parser.add_argument("--sequential", type=int, default=60, help="searches per sequential run")
    parser.add_argument("--concurrent-searches", type=int, default=500, help="searches per burst run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each search measurement")
    parser.add_argument("--ingest-documents", type=int, default=120, help="real documents for the ingest figure")
    parser.add_argument("--pool", type=int, default=512, help="real sentences embedded for the vector pool")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the quality evaluation")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the retriever logs and Milvus files")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"\nretriever benchmark ({results['machine']})")
    if "quality" in results:
        print_quality(results["quality"])
    goals = print_search(results["search"], args.clients, args.chunks)
    goals |= print_ingest(results["ingest"])
    print("\ngoals:")
    for goal, met in goals.items():
        print(f"  {goal}: {'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
