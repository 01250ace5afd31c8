"""Retrieval quality: R@1, R@5, MRR@10 and nDCG@10 of dense, BM25 and hybrid search, beside two baselines.

Figures, not a test. Three evaluation sets are derived mechanically from text that was not written for
this project (read with `ast` from source files; nothing is imported):

- **stdlib**: docstrings of functions, methods and classes in a fixed list of Python standard-library
  modules (the queries are stored in bench/data/eval_queries.jsonl).
- **numpy**: docstrings of the same kind in a fixed list of numpy's modules, derived once (numpy 2.3.5)
  and stored whole, documents and queries, in bench/data/eval_numpy.jsonl (numpy's docstrings are
  BSD-3-Clause), so the set does not change with the numpy a machine happens to have. A second corpus
  with another vocabulary and style (Parameters/Returns/Examples sections), so a setting tuned on one set
  is checked on another.
- **sqlalchemy**: docstrings of the same kind in a fixed list of SQLAlchemy's modules, derived once
  (SQLAlchemy 2.1.9) and stored whole in bench/data/eval_sqlalchemy.jsonl (SQLAlchemy is MIT-licensed).
  Added after the hybrid weight was chosen, to judge that choice on text never seen while choosing it
  (prose about sessions, queries, schema and SQL constructs, in reStructuredText with Sphinx roles).

The copied docstrings' licenses are in bench/data/NOTICE.md.

In all three:
- A **document** is a docstring without its first line (its summary): the body that explains the object.
  Bodies shorter than 200 or longer than 4000 characters, duplicates, and bodies that contain the summary
  verbatim are skipped.
- Its **query** is the removed summary line (e.g. "Return a new sorted list from the items in
  iterable."), with the object's own name removed from it, so a query cannot match by the identifier.
- The **relevance judgement** is that the one document it was cut from is relevant; no other is (a strict
  lower bound: a near-identical sibling docstring counts as a miss).
- Queries are split by a hash of their document id into a **dev** half and a **held-out** half. The
  hybrid weight is chosen on the stdlib dev half only (`--sweep` shows the choice); every other figure
  (stdlib held-out, the whole numpy and sqlalchemy sets) never influenced it.

Every document is ingested through the retriever's own use case (`RetrieverService.ingest`: chunking,
the numpy MiniLM embedder, the BM25 analyzer, upsert into a Milvus Lite file served by its own process,
as the service runs it; flushed once, after the last document, unless `--flush-delay` is given: see
`evaluate`), and every query goes through `RetrieverService.search` in each mode with the service's
default settings. A document's rank is the rank of its first chunk among the top 20 chunks.
R@k: share of queries whose document is among the first k distinct documents; MRR@10: mean of 1/rank
(0 past 10); nDCG@10 with one relevant document: mean of 1/log2(rank + 1) (0 past 10).

Baselines, on whole documents (no chunking): **textbook BM25** (Okapi, k1 1.2, b 0.75, lower-cased
`\\w+` words, nothing else) and **exact cosine** over the same MiniLM's embeddings of each whole document
(cut at 256 tokens, as the model is).

    uv run python bench/eval_retrieval.py [--set stdlib|numpy|sqlalchemy|all] [--sweep] [--flush-delay 0.5]
        [--write-sets]

`--write-sets` derives the chosen sets afresh (`--set all`: every set) and stores them: the stdlib queries,
the numpy and sqlalchemy sets whole. A set not chosen is left as stored.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, SearchRequest
from agentbus.retriever.adapters.milvus import MilvusVectorIndex, ensure_collection, open_client
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.analysis import analyzed_text
from agentbus.retriever.domain import fuse, search_filter
from agentbus.retriever.service import RetrieverMetrics, RetrieverPolicy, RetrieverService
from agentbus.retriever.settings import RetrieverSettings
from prometheus_client import CollectorRegistry

STDLIB_MODULES = (
    "argparse",
    "ast",
    "asyncio/base_events",
    "asyncio/locks",
    "asyncio/queues",
    "asyncio/streams",
    "asyncio/tasks",
    "base64",
    "bisect",
    "calendar",
    "collections/__init__",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email/message",
    "email/utils",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html/parser",
    "http/client",
    "http/cookiejar",
    "imaplib",
    "inspect",
    "ipaddress",
    "json/__init__",
    "json/decoder",
    "json/encoder",
    "locale",
    "logging/__init__",
    "logging/handlers",
    "mailbox",
    "mimetypes",
    "netrc",
    "ntpath",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posixpath",
    "pprint",
    "queue",
    "random",
    "re/__init__",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest/case",
    "urllib/parse",
    "urllib/request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zoneinfo/_zoneinfo",
)
NUMPY_MODULES = (
    "_core/fromnumeric",
    "_core/numeric",
    "_core/shape_base",
    "_core/function_base",
    "lib/_arraypad_impl",
    "lib/_arraysetops_impl",
    "lib/_function_base_impl",
    "lib/_histograms_impl",
    "lib/_index_tricks_impl",
    "lib/_nanfunctions_impl",
    "lib/_npyio_impl",
    "lib/_polynomial_impl",
    "lib/_shape_base_impl",
    "lib/_stride_tricks_impl",
    "lib/_twodim_base_impl",
    "lib/_scimath_impl",
    "linalg/_linalg",
    "fft/_pocketfft",
    "ma/core",
    "ma/extras",
    "polynomial/polynomial",
    "polynomial/_polybase",
)
SQLALCHEMY_MODULES = (
    "engine/base",
    "engine/events",
    "engine/interfaces",
    "engine/reflection",
    "engine/result",
    "engine/url",
    "orm/_orm_constructors",
    "orm/attributes",
    "orm/decl_api",
    "orm/events",
    "orm/interfaces",
    "orm/mapper",
    "orm/query",
    "orm/relationships",
    "orm/session",
    "orm/strategy_options",
    "pool/base",
    "pool/events",
    "sql/_elements_constructors",
    "sql/base",
    "sql/dml",
    "sql/elements",
    "sql/functions",
    "sql/operators",
    "sql/schema",
    "sql/selectable",
    "sql/sqltypes",
    "sql/type_api",
)
MIN_BODY_CHARS = 200
MAX_BODY_CHARS = 4000
RESULTS = 20
CUTOFF = 10
MODES: tuple[Literal["dense", "bm25", "hybrid"], ...] = ("dense", "bm25", "hybrid")
SWEEP_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))
TENANT = "eval"
DATA_DIR = Path(__file__).resolve().parent / "data"
STDLIB_QUERIES_FILE = DATA_DIR / "eval_queries.jsonl"
# Where each set's docstrings are read (a function: only called when a set is derived), and which modules.
SOURCES: dict[str, tuple[Callable[[], Path], tuple[str, ...]]] = {
    "stdlib": (lambda: Path(sysconfig.get_paths()["stdlib"]), STDLIB_MODULES),
    "numpy": (lambda: Path(np.__file__).resolve().parent, NUMPY_MODULES),
    "sqlalchemy": (lambda: Path(sysconfig.get_paths()["purelib"]) / "sqlalchemy", SQLALCHEMY_MODULES),
}
# Sets stored whole, documents and queries, so they do not change with the package a machine has.
STORED_SETS = {"numpy": DATA_DIR / "eval_numpy.jsonl", "sqlalchemy": DATA_DIR / "eval_sqlalchemy.jsonl"}
Metrics = dict[str, float]


@dataclass(frozen=True)
class Example:
    document_id: str
    query: str
    body: str

    @property
    def split(self) -> str:
        """dev or held-out, by a hash of the document id: stable across runs and machines."""
        return "dev" if hashlib.sha256(self.document_id.encode()).digest()[0] % 2 == 0 else "held-out"


@dataclass
class EvalSet:
    name: str
    documents: list[Example]
    queries: list[Example]
    results: dict[str, Metrics] = field(default_factory=dict)


def _sources(name: str) -> tuple[Path, tuple[str, ...]]:
    root, modules = SOURCES[name]
    return root(), modules


def derive_examples(name: str) -> list[Example]:
    root, modules = _sources(name)
    prefix = "" if name == "stdlib" else f"{name}."
    seen_bodies: set[str] = set()
    examples = []
    for module in modules:
        path = root / f"{module}.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring:
                continue
            summary, _, body = docstring.strip().partition("\n")
            body = body.strip()
            summary = summary.strip()
            if len(body) < MIN_BODY_CHARS or len(body) > MAX_BODY_CHARS or len(summary) < 15:
                continue
            if summary in body or body in seen_bodies:
                continue
            seen_bodies.add(body)
            query = re.sub(rf"\b{re.escape(node.name)}\b", "", summary).strip(" .,:") or summary
            examples.append(Example(f"{prefix}{module.replace('/', '.')}:{node.lineno}:{node.name}", query, body))
    return examples


def derive_set(name: str, max_documents: int, queries: int, seed: int) -> EvalSet:
    rng = random.Random(seed)
    examples = derive_examples(name)
    rng.shuffle(examples)
    examples = examples[:max_documents]
    return EvalSet(name, examples, rng.sample(examples, min(queries, len(examples))))


def load_set(name: str, max_documents: int = 300, queries: int = 150, seed: int = 11) -> EvalSet:
    """The stdlib set derived now; a stored set as stored (derived when its file is missing)."""
    stored = STORED_SETS.get(name)
    if stored is None or not stored.exists():
        return derive_set(name, max_documents, queries, seed)
    documents, picked = [], []
    for line in stored.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        example = Example(row["document_id"], row["query"], row["body"])
        documents.append(example)
        if row["is_query"]:
            picked.append((row["query_order"], example))
    return EvalSet(name, documents, [example for _, example in sorted(picked)])


def write_set(eval_set: EvalSet) -> None:
    if eval_set.name == "stdlib":
        with STDLIB_QUERIES_FILE.open("w", encoding="utf-8") as out:
            for example in eval_set.queries:
                line = {"query": example.query, "relevant": example.document_id, "split": example.split}
                out.write(json.dumps(line) + "\n")
        return
    order = {example.document_id: i for i, example in enumerate(eval_set.queries)}
    with STORED_SETS[eval_set.name].open("w", encoding="utf-8") as out:
        for example in eval_set.documents:
            row = {
                "document_id": example.document_id,
                "query": example.query,
                "body": example.body,
                "is_query": example.document_id in order,
                "query_order": order.get(example.document_id),
                "split": example.split,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- metrics ---------------------------------------------------------------------------------------


def score(rankings: Sequence[Sequence[str]], queries: Sequence[Example]) -> Metrics:
    """R@1, R@5, MRR@10 and nDCG@10 of ranked document ids against one relevant document per query."""
    totals: dict[str, float] = dict.fromkeys(("R@1", "R@5", "MRR@10", "nDCG@10"), 0.0)
    for ranked, example in zip(rankings, queries, strict=True):
        distinct = list(dict.fromkeys(ranked))
        if example.document_id not in distinct:
            continue
        rank = distinct.index(example.document_id) + 1
        totals["R@1"] += rank <= 1
        totals["R@5"] += rank <= 5
        if rank <= CUTOFF:
            totals["MRR@10"] += 1 / rank
            totals["nDCG@10"] += 1 / math.log2(rank + 1)
    return {metric: totals[metric] / len(queries) for metric in ("R@1", "R@5", "MRR@10", "nDCG@10")}


def by_split(rankings: Sequence[Sequence[str]], queries: Sequence[Example]) -> dict[str, Metrics]:
    out = {"all": score(rankings, queries)}
    for split in ("dev", "held-out"):
        picked = [(r, q) for r, q in zip(rankings, queries, strict=True) if q.split == split]
        out[split] = score([r for r, _ in picked], [q for _, q in picked])
    return out


# --- baselines -------------------------------------------------------------------------------------


def textbook_bm25(documents: Sequence[Example], queries: Sequence[Example]) -> list[list[str]]:
    """Okapi BM25 over whole documents, k1 1.2, b 0.75, lower-cased words: the textbook, nothing more."""
    k1, b = 1.2, 0.75
    docs = [Counter(re.findall(r"\w+", d.body.lower())) for d in documents]
    lengths = [sum(d.values()) for d in docs]
    average = sum(lengths) / len(lengths)
    df = Counter(term for d in docs for term in d)
    idf = {t: math.log((len(docs) - n + 0.5) / (n + 0.5) + 1) for t, n in df.items()}
    rankings = []
    for example in queries:
        terms = set(re.findall(r"\w+", example.query.lower()))
        scores = [
            sum(idf[t] * d[t] * (k1 + 1) / (d[t] + k1 * (1 - b + b * n / average)) for t in terms if t in d)
            for d, n in zip(docs, lengths, strict=True)
        ]
        order = np.argsort(-np.array(scores), kind="stable")[:RESULTS]
        rankings.append([documents[i].document_id for i in order])
    return rankings


def exact_cosine(documents: Sequence[Example], queries: Sequence[Example], embedder: MiniLmEmbedder) -> list[list[str]]:
    """Exact cosine between MiniLM embeddings of each whole document (cut at 256 tokens) and the query."""
    matrix = embedder.embed_sync([d.body for d in documents])
    rankings = []
    for vector in embedder.embed_sync([q.query for q in queries]):
        order = np.argsort(-(matrix @ vector), kind="stable")[:RESULTS]
        rankings.append([documents[i].document_id for i in order])
    return rankings


# --- the retriever ---------------------------------------------------------------------------------


def default_policy() -> RetrieverPolicy:
    """The service's own defaults (settings), so the figures describe what ships."""
    settings = RetrieverSettings()
    return RetrieverPolicy(
        chunk_chars=settings.chunk_chars,
        chunk_overlap_chars=settings.chunk_overlap_chars,
        max_document_bytes=settings.max_document_bytes,
        max_top_k=50,
        tenant_allow_list=None,
        candidates_per_k=settings.candidates_per_k,
        dense_weight=settings.hybrid_dense_weight,
    )


async def evaluate(
    eval_set: EvalSet, embedder: MiniLmEmbedder, *, sweep: bool = False, flush_delay: float | None = None
) -> tuple[dict[str, dict[str, Metrics]], dict[float, dict[str, Metrics]], dict[str, float]]:
    """(figures per system and split, hybrid figures per dense weight when `sweep`, ingest figures).

    With `flush_delay` None the index is flushed once, after the last document: one segment, so BM25
    statistics cover the whole set as a Milvus server's do. With a delay it flushes as the service does
    (when writes pause that long), and Milvus Lite scores each segment with that segment's statistics.
    """
    policy = default_policy()
    figures: dict[str, dict[str, Metrics]] = {}
    sweep_figures: dict[float, dict[str, Metrics]] = {}
    with tempfile.TemporaryDirectory(prefix="eval-retrieval-") as tmp:
        client, lite = open_client(str(Path(tmp) / "eval.db"))
        ensure_collection(client, TENANT, embedder.dimension)
        index = MilvusVectorIndex(client, TENANT, flush_delay_seconds=flush_delay, owned=lite)
        service = RetrieverService(embedder, index, policy, RetrieverMetrics(CollectorRegistry()))
        started = time.perf_counter()
        chunks = 0
        for i in range(0, len(eval_set.documents), 16):
            batch = [IngestDocument(id=e.document_id, text=e.body) for e in eval_set.documents[i : i + 16]]
            outcome = await service.ingest(DocumentsIngest(tenant=TENANT, documents=batch), TENANT, "eval")
            chunks += outcome.chunks
        ingest_seconds = time.perf_counter() - started
        await index.flush()
        log(f"{eval_set.name}: ingested {len(eval_set.documents)} documents, {chunks} chunks in {ingest_seconds:.1f}s")
        for mode in MODES:
            rankings = []
            for example in eval_set.queries:
                request = SearchRequest(tenant=TENANT, query=example.query, top_k=RESULTS, mode=mode)
                reply = (await service.search(request.model_dump_json().encode(), TENANT)).reply
                assert reply.error is None, reply.error
                rankings.append([c.document_id for c in reply.chunks])
            figures[f"agentbus {mode}"] = by_split(rankings, eval_set.queries)
        if sweep:
            sweep_figures = await _sweep(index, embedder, eval_set.queries, policy)
        await index.close()
    figures["textbook BM25 (whole documents)"] = by_split(
        textbook_bm25(eval_set.documents, eval_set.queries), eval_set.queries
    )
    figures["exact cosine (whole documents)"] = by_split(
        exact_cosine(eval_set.documents, eval_set.queries, embedder), eval_set.queries
    )
    return figures, sweep_figures, {"chunks": chunks, "seconds": ingest_seconds}


async def _sweep(
    index: MilvusVectorIndex, embedder: MiniLmEmbedder, queries: Sequence[Example], policy: RetrieverPolicy
) -> dict[float, dict[str, Metrics]]:
    """Hybrid figures for each dense weight, from the same candidate lists the service fuses."""
    expression = search_filter(TENANT, [])
    candidates = RESULTS * policy.candidates_per_k
    lists = []
    for example in queries:
        vector = (await embedder.embed_query(example.query)).tolist()
        terms = analyzed_text(example.query)
        dense = await index.search_dense(vector, expression, candidates)
        bm25 = await index.search_bm25(terms, expression, candidates) if terms else []
        lists.append((dense, bm25))
    out = {}
    for weight in SWEEP_WEIGHTS:
        rankings = [
            [h.document_id for h in fuse(dense, bm25, dense_weight=weight, limit=RESULTS)] for dense, bm25 in lists
        ]
        out[weight] = by_split(rankings, queries)
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(title: str, figures: dict[str, dict[str, Metrics]], split: str) -> None:
    print(f"\n{title} ({split})")
    print("| system | R@1 | R@5 | MRR@10 | nDCG@10 |\n|---|---:|---:|---:|---:|")
    for system, per_split in figures.items():
        m = per_split[split]
        print(f"| {system} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['MRR@10']:.3f} | {m['nDCG@10']:.3f} |")


def hybrid_never_loses(figures: dict[str, dict[str, Metrics]], split: str) -> bool:
    hybrid, dense, bm25 = (figures[f"agentbus {mode}"][split] for mode in ("hybrid", "dense", "bm25"))
    return all(hybrid[m] >= max(dense[m], bm25[m]) for m in ("R@5", "MRR@10"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=(*SOURCES, "all"), default="all")
    parser.add_argument("--max-documents", type=int, default=300, help="documents in each collection")
    parser.add_argument("--queries", type=int, default=150, help="queries per set (a seeded sample)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sweep", action="store_true", help="hybrid figures for every dense weight")
    parser.add_argument("--write-sets", action="store_true", help="derive the chosen sets and store them in bench/data")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    parser.add_argument(
        "--flush-delay",
        type=float,
        default=None,
        help="flush when writes pause this long, as the service does (default: once, after ingesting)",
    )
    args = parser.parse_args()
    names = tuple(SOURCES) if args.set == "all" else (args.set,)
    embedder = MiniLmEmbedder(batch_size=32)
    embedder.load()
    report: dict[str, object] = {"dense_weight": default_policy().dense_weight, "flush_delay": args.flush_delay}
    for name in names:
        if args.write_sets:
            eval_set = derive_set(name, args.max_documents, args.queries, args.seed)
            write_set(eval_set)
        else:
            eval_set = load_set(name, args.max_documents, args.queries, args.seed)
        log(f"{name}: {len(eval_set.documents)} documents, {len(eval_set.queries)} queries")
        figures, sweep, ingest = asyncio.run(
            evaluate(eval_set, embedder, sweep=args.sweep, flush_delay=args.flush_delay)
        )
        report[name] = {"figures": figures, "sweep": {str(w): f for w, f in sweep.items()}, "ingest": ingest}
        for split in ("all", "dev", "held-out"):
            print_table(f"{name}: {len(eval_set.queries)} queries", figures, split)
            verdict = "holds" if hybrid_never_loses(figures, split) else "DOES NOT hold"
            print(f"hybrid >= max(dense, bm25) on R@5 and MRR@10: {verdict}")
        if sweep:
            print(f"\n{name}: hybrid by dense weight (dev split)\n| weight | R@1 | R@5 | MRR@10 | nDCG@10 |")
            for weight, per_split in sweep.items():
                m = per_split["dev"]
                print(f"| {weight:.2f} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['MRR@10']:.3f} | {m['nDCG@10']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
