"""Retrieval quality of the retriever: recall@5 and MRR for dense, BM25 and hybrid search.

Figures, not a test. The evaluation set is derived mechanically, at run time, from text on this machine
that was not written for this project: the docstrings of functions, methods and classes in a fixed list
of Python standard-library modules (read with `ast` from their source files; nothing is imported).

- A **document** is a docstring without its first line (its summary), i.e. the body that explains
  the function: parameters, behaviour, examples. Docstrings whose body is shorter than 200 characters,
  duplicates, and bodies that contain the summary verbatim are skipped.
- Its **query** is the removed summary line (e.g. "Return a new sorted list from the items in
  iterable."), with the object's own name removed from it when present, so a query cannot match its
  document by the identifier alone.
- The **relevance judgement** is that the one document it was cut from is relevant; no other is
  (a strict lower bound: a near-identical sibling docstring counts as a miss).

Every document is ingested through the retriever's own use case (`RetrieverService.ingest`: chunking,
the numpy MiniLM embedder, Milvus Lite upsert) into a fresh Milvus Lite file, and every query goes
through `RetrieverService.search` in each mode. A document's rank is the rank of its first chunk among
the results (top 20 chunks). recall@5: share of queries whose document is in the first 5 distinct
documents; MRR: mean of 1/rank (0 when not in the top 20 chunks).

    uv run python bench/eval_retrieval.py [--max-documents 300] [--queries 150] [--write-queries]

`--write-queries` stores the derived queries and judgements in bench/data/eval_queries.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import random
import re
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agentbus.contracts.rag import DocumentsIngest, IngestDocument, SearchRequest
from agentbus.retriever.adapters.milvus import MilvusVectorIndex, connect, ensure_collection
from agentbus.retriever.adapters.minilm import MiniLmEmbedder
from agentbus.retriever.service import RetrieverMetrics, RetrieverPolicy, RetrieverService
from prometheus_client import CollectorRegistry

MODULES = (
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
MIN_BODY_CHARS = 200
MAX_BODY_CHARS = 4000
RESULTS = 20
RECALL_AT = 5
DATA_FILE = Path(__file__).resolve().parent / "data" / "eval_queries.jsonl"


@dataclass(frozen=True)
class Example:
    document_id: str
    query: str
    body: str


def _examples() -> list[Example]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen_bodies: set[str] = set()
    examples = []
    for module in MODULES:
        path = stdlib / f"{module}.py"
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
            examples.append(Example(f"{module.replace('/', '.')}:{node.lineno}:{node.name}", query, body))
    return examples


async def _evaluate(examples: list[Example], queries: list[Example]) -> dict[str, dict[str, float]]:
    embedder = MiniLmEmbedder(batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        client = connect(str(Path(tmp) / "eval.db"))
        ensure_collection(client, "eval", embedder.dimension)
        index = MilvusVectorIndex(client, "eval")
        policy = RetrieverPolicy(
            chunk_chars=1000,
            chunk_overlap_chars=150,
            max_document_bytes=1_000_000,
            max_top_k=50,
            tenant_allow_list=None,
        )
        service = RetrieverService(embedder, index, policy, RetrieverMetrics(CollectorRegistry()))
        started = time.perf_counter()
        chunks = 0
        for i in range(0, len(examples), 64):
            batch = [IngestDocument(id=e.document_id, text=e.body) for e in examples[i : i + 64]]
            chunks += (await service.ingest(DocumentsIngest(tenant="eval", documents=batch), "eval")).chunks
            print(f"  ingested {min(i + 64, len(examples))}/{len(examples)} documents", file=sys.stderr)
        elapsed = time.perf_counter() - started
        print(f"ingest: {len(examples)} documents, {chunks} chunks in {elapsed:.1f}s", file=sys.stderr)
        figures: dict[str, dict[str, float]] = {}
        for mode in ("dense", "bm25", "hybrid"):
            hits_at_k, reciprocal = 0, 0.0
            for example in queries:
                request = SearchRequest(tenant="eval", query=example.query, top_k=RESULTS, mode=mode)
                reply = (await service.search(request.model_dump_json().encode(), "eval")).reply
                assert reply.error is None, reply.error
                ranked = list(dict.fromkeys(c.document_id for c in reply.chunks))
                if example.document_id in ranked:
                    rank = ranked.index(example.document_id) + 1
                    reciprocal += 1 / rank
                    hits_at_k += rank <= RECALL_AT
            figures[mode] = {"recall@5": hits_at_k / len(queries), "mrr": reciprocal / len(queries)}
        await index.close()
        await embedder.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-documents", type=int, default=300, help="documents in the collection")
    parser.add_argument("--queries", type=int, default=150, help="queries evaluated (a seeded sample)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--write-queries", action="store_true", help=f"write the judgements to {DATA_FILE}")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    examples = _examples()
    rng.shuffle(examples)
    examples = examples[: args.max_documents]
    queries = rng.sample(examples, min(args.queries, len(examples)))
    print(
        f"{len(examples)} documents (stdlib docstring bodies, Python {sys.version.split()[0]}), "
        f"{len(queries)} queries (their summary lines)",
        file=sys.stderr,
    )
    if args.write_queries:
        DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
        with DATA_FILE.open("w", encoding="utf-8") as out:
            for example in queries:
                out.write(json.dumps({"query": example.query, "relevant": example.document_id}) + "\n")
    figures = asyncio.run(_evaluate(examples, queries))
    print(f"\n{'mode':<8} {'recall@5':>9} {'MRR':>7}")
    for mode, values in figures.items():
        print(f"{mode:<8} {values['recall@5']:>9.3f} {values['mrr']:>7.3f}")


if __name__ == "__main__":
    main()
