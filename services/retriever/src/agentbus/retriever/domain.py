"""Pure rules of the retriever: chunking, chunk keys, input validation, filter expressions, and fusion.

Filter expressions are the one place where request data meets Milvus' expression language, so they are
built here from structured `MetadataFilter`s only: field names must match a strict pattern and every
value is rendered as a literal by `literal()`, never spliced in as text. Milvus Lite does not support
`filter_params` templating (it rejects `{name}` placeholders), so escaping is done here, for both Lite
and a Milvus server, and the service checks every result's tenant again before replying.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agentbus.contracts.common import ID_PATTERN
from agentbus.contracts.rag import DocumentsIngest, MetadataFilter
from agentbus.retriever.ports import Hit

TENANT_FIELD = "tenant"
DOCUMENT_FIELD = "document_id"
CHUNK_INDEX_FIELD = "chunk_index"
METADATA_FIELD = "metadata"

MAX_IN_VALUES = 100
MAX_STRING_LITERAL_CHARS = 1000
MAX_METADATA_BYTES = 16 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_IDENTIFIER = re.compile(ID_PATTERN)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_COMPARISONS = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class InputError(ValueError):
    """Input that can never be processed: a stable code and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ErrorCode:
    """Codes of rejected input, in search replies and dead letters."""

    MALFORMED_REQUEST = "malformed_request"
    INVALID_QUERY = "invalid_query"
    EMPTY_QUERY = "empty_query"
    TOP_K_OUT_OF_RANGE = "top_k_out_of_range"
    INVALID_FILTER = "invalid_filter"
    TENANT_MISMATCH = "tenant_mismatch"
    UNKNOWN_TENANT = "unknown_tenant"
    DOCUMENT_TOO_LARGE = "document_too_large"
    EMPTY_DOCUMENT = "empty_document"
    NOT_UTF8 = "not_utf8"
    DUPLICATE_DOCUMENT_ID = "duplicate_document_id"
    INVALID_DOCUMENT_ID = "invalid_document_id"
    METADATA_TOO_LARGE = "metadata_too_large"
    INVALID_SUBMITTER = "invalid_submitter"
    SEARCH_FAILED = "search_failed"


# --- chunking --------------------------------------------------------------------------------------

_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


def chunk_text(text: str, chunk_chars: int, overlap_chars: int) -> list[str]:
    """Split `text` into chunks of at most `chunk_chars` characters that overlap by about `overlap_chars`.

    A chunk ends at the last paragraph, line, sentence or word break in its second half, so chunks rarely
    cut a word; the next chunk starts `overlap_chars` before that end, at a word start. Whitespace-only
    chunks are dropped. Deterministic: the same text always gives the same chunks (ids depend on it).
    """
    if chunk_chars <= 0 or not 0 <= overlap_chars < chunk_chars:
        raise ValueError("need chunk_chars > 0 and 0 <= overlap_chars < chunk_chars")
    chunks: list[str] = []
    start, length = 0, len(text)
    while start < length:
        end = min(start + chunk_chars, length)
        if end < length:
            window = text[start + chunk_chars // 2 : end]
            for separator in _BREAKS:
                cut = window.rfind(separator)
                if cut >= 0:
                    end = start + chunk_chars // 2 + cut + len(separator)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= length:
            break
        next_start = max(end - overlap_chars, start + 1)
        space = text.find(" ", next_start, end)
        start = space + 1 if overlap_chars and 0 <= space < end - 1 else next_start
    return chunks


def chunk_key(tenant: str, document_id: str, index: int) -> str:
    """The primary key of a chunk: stable per (tenant, document, position), so re-ingesting overwrites."""
    digest = hashlib.sha256(f"{tenant}\x00{document_id}".encode()).hexdigest()[:40]
    return f"{digest}-{index:06d}"


# --- documents -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDocument:
    document_id: str
    chunks: list[str]
    metadata: dict[str, Any]


def _utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InputError(ErrorCode.NOT_UTF8, f"{what} is not valid UTF-8 text ({exc.reason})") from exc


def check_submitter(submitter: str) -> None:
    """The subject's submitter token must be an identifier: nats-server binds it only when permissions are on."""
    if not _IDENTIFIER.fullmatch(submitter):
        raise InputError(ErrorCode.INVALID_SUBMITTER, f"submitter {submitter!r} is not an identifier")


def check_document_id(document_id: str) -> None:
    """A document id must be UTF-8 text that can be written as an expression literal (to delete it later)."""
    _utf8_size(document_id, f"document id {document_id!r}")
    try:
        literal(document_id)
    except InputError as exc:
        raise InputError(ErrorCode.INVALID_DOCUMENT_ID, f"document id {document_id!r}: {exc.message}") from exc


def prepare_documents(
    ingest: DocumentsIngest, *, max_document_bytes: int, chunk_chars: int, overlap_chars: int
) -> list[PreparedDocument]:
    """Validate a whole batch and chunk it, or raise InputError naming the first bad document.

    Nothing is written for a batch with a bad document, so a batch is applied entirely or not at all
    as far as input checks go.
    """
    seen: set[str] = set()
    prepared = []
    for doc in ingest.documents:
        label = f"document {doc.id!r}"
        check_document_id(doc.id)
        if doc.id in seen:
            raise InputError(ErrorCode.DUPLICATE_DOCUMENT_ID, f"{label} appears twice in one batch")
        seen.add(doc.id)
        size = _utf8_size(doc.text, f"{label}: text")
        if size > max_document_bytes:
            raise InputError(
                ErrorCode.DOCUMENT_TOO_LARGE, f"{label} is {size} bytes; the limit is {max_document_bytes}"
            )
        metadata_size = _utf8_size(repr(doc.metadata), f"{label}: metadata")
        if metadata_size > MAX_METADATA_BYTES:
            raise InputError(ErrorCode.METADATA_TOO_LARGE, f"{label}: metadata is over {MAX_METADATA_BYTES} bytes")
        chunks = chunk_text(doc.text, chunk_chars, overlap_chars)
        if not chunks:
            raise InputError(ErrorCode.EMPTY_DOCUMENT, f"{label} has no text")
        prepared.append(PreparedDocument(doc.id, chunks, dict(doc.metadata)))
    return prepared


# --- filters ---------------------------------------------------------------------------------------


def literal(value: Any) -> str:
    """`value` as a Milvus expression literal. Strings are quoted with every special character escaped.

    Raises InputError for values with no safe literal: control characters other than tab/newline/CR,
    non-finite floats, integers outside int64, and anything that is not a str, bool, int or float.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InputError(ErrorCode.INVALID_FILTER, f"integer {value} is outside int64")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(ErrorCode.INVALID_FILTER, f"{value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if len(value) > MAX_STRING_LITERAL_CHARS:
            raise InputError(ErrorCode.INVALID_FILTER, f"filter value longer than {MAX_STRING_LITERAL_CHARS}")
        out = []
        for char in value:
            if char in _ESCAPES:
                out.append(_ESCAPES[char])
            elif ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF:
                raise InputError(ErrorCode.INVALID_FILTER, f"filter value contains control character {char!r}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    raise InputError(ErrorCode.INVALID_FILTER, f"unsupported filter value type {type(value).__name__}")


def _condition(flt: MetadataFilter) -> str:
    if not _FIELD_NAME.fullmatch(flt.field):  # the contract checks too; this module must not depend on it
        raise InputError(ErrorCode.INVALID_FILTER, f"invalid metadata field name {flt.field!r}")
    target = f'{METADATA_FIELD}["{flt.field}"]'
    if flt.op == "in":
        if not isinstance(flt.value, list) or not flt.value:
            raise InputError(ErrorCode.INVALID_FILTER, f"'in' on {flt.field!r} needs a non-empty list")
        if len(flt.value) > MAX_IN_VALUES:
            raise InputError(ErrorCode.INVALID_FILTER, f"'in' on {flt.field!r} takes at most {MAX_IN_VALUES} values")
        # Milvus Lite cannot apply `in` to a JSON path: an equivalent disjunction works on both engines.
        return "(" + " or ".join(f"{target} == {literal(v)}" for v in flt.value) + ")"
    if isinstance(flt.value, list):
        raise InputError(ErrorCode.INVALID_FILTER, f"{flt.op!r} on {flt.field!r} takes one value, not a list")
    if flt.op not in ("eq", "ne") and isinstance(flt.value, bool):
        raise InputError(ErrorCode.INVALID_FILTER, f"{flt.op!r} on {flt.field!r} cannot compare a boolean")
    return f"{target} {_COMPARISONS[flt.op]} {literal(flt.value)}"


def tenant_condition(tenant: str) -> str:
    """The condition every query and delete starts with: Milvus Lite does not isolate partition keys."""
    return f"{TENANT_FIELD} == {literal(tenant)}"


def search_filter(tenant: str, filters: Sequence[MetadataFilter]) -> str:
    """The tenant condition AND every metadata condition. `ne` matches chunks that have the field."""
    return " and ".join([tenant_condition(tenant), *(_condition(f) for f in filters)])


def documents_filter(tenant: str, document_ids: Iterable[str]) -> str:
    """Chunks of these documents of this tenant."""
    ids = list(document_ids)
    return f"{tenant_condition(tenant)} and {DOCUMENT_FIELD} in [{', '.join(literal(i) for i in ids)}]"


def stale_chunks_filter(tenant: str, chunk_counts: dict[str, int]) -> str:
    """Chunks that shorter new versions of these documents no longer have (one expression per batch)."""
    stale = " or ".join(
        f"({DOCUMENT_FIELD} == {literal(document_id)} and {CHUNK_INDEX_FIELD} >= {count})"
        for document_id, count in chunk_counts.items()
    )
    return f"{tenant_condition(tenant)} and ({stale})"


# --- fusion ----------------------------------------------------------------------------------------


def _normalized(hits: Sequence[Hit]) -> dict[tuple[str, int], float]:
    """Each hit's score divided by its list's best score, below 0 counted as 0.

    Both scores have a natural floor of 0 (BM25 never goes below it; a cosine similarity under 0 means
    unrelated), so dividing by the best keeps how far apart candidates are, and the weakest candidate of
    a list still counts more than a chunk the list did not propose (min-max scaling would give it 0).
    """
    best = max((h.score for h in hits), default=0.0)
    if best <= 0:
        return {}
    return {(h.document_id, h.chunk_index): max(h.score, 0.0) / best for h in hits}


def fuse(dense: Sequence[Hit], bm25: Sequence[Hit], *, dense_weight: float, limit: int) -> list[Hit]:
    """Hybrid ranking: a convex combination of the two lists' normalised scores, best first.

    `dense_weight` (0..1) is the share of the dense score; a chunk missing from a list scores 0 there.
    Unlike equal-weight reciprocal rank fusion, a weak list cannot pull a confident strong list's top hit
    down by rank alone: scores keep how far apart the candidates are. The weight is chosen on a
    development split of an evaluation set (see bench/eval_retrieval.py). Ties keep dense order first.
    """
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError("dense_weight must be within 0..1")
    dense_scores, bm25_scores = _normalized(dense), _normalized(bm25)
    first: dict[tuple[str, int], Hit] = {}
    for hit in (*dense, *bm25):
        first.setdefault((hit.document_id, hit.chunk_index), hit)
    fused = {
        key: dense_weight * dense_scores.get(key, 0.0) + (1.0 - dense_weight) * bm25_scores.get(key, 0.0)
        for key in first
    }
    order = sorted(first, key=lambda key: -fused[key])  # stable: dense order breaks ties
    return [replace(first[key], score=fused[key]) for key in order[:limit]]
