"""Chunking, chunk keys and filter expressions, checked against Milvus Lite's own expression lexer."""

from __future__ import annotations

import random
import string
from itertools import pairwise

import pytest
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, MetadataFilter
from agentbus.retriever.domain import (
    ErrorCode,
    InputError,
    chunk_key,
    chunk_text,
    fuse,
    literal,
    prepare_documents,
    search_filter,
)
from agentbus.retriever.ports import Hit
from milvus_lite.search.filter.ast import And, CmpOp, FieldRef, StringLit  # type: ignore[import-untyped]
from milvus_lite.search.filter.parser import parse_expr  # type: ignore[import-untyped]
from milvus_lite.search.filter.tokens import TokenKind, tokenize  # type: ignore[import-untyped]

TEXT = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))


def test_chunks_are_bounded_overlapping_and_cover_the_text() -> None:
    chunks = chunk_text(TEXT, 300, 60)
    assert len(chunks) > 10
    assert all(len(c) <= 300 for c in chunks)
    for previous, current in pairwise(chunks):
        assert current[:20] in previous  # the next chunk starts inside the previous one
    words = set(TEXT.split())
    assert words == {w for c in chunks for w in c.split()}
    assert chunks == chunk_text(TEXT, 300, 60)


def test_chunks_break_at_words_and_short_texts_stay_whole() -> None:
    assert chunk_text("  short text  ", 300, 60) == ["short text"]
    assert chunk_text("   \n\t ", 300, 60) == []
    for chunk in chunk_text(TEXT, 300, 60):
        assert chunk.split()[0] in TEXT.split()
    unbroken = "x" * 1000
    assert "".join(chunk_text(unbroken, 300, 0)) == unbroken


def test_chunk_keys_are_stable_per_tenant_document_and_position() -> None:
    assert chunk_key("acme", "doc", 0) == chunk_key("acme", "doc", 0)
    keys = {chunk_key(t, d, i) for t in ("acme", "globex") for d in ("a", "b", "a\x00b") for i in range(3)}
    assert len(keys) == 18
    assert all(len(k) <= 64 for k in keys)


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'quote " inside',
        "single ' quote",
        "back\\slash",
        '\\" or tenant != "x',
        '" or tenant != "',
        "new\nline\ttab\rcr",
        "ünïcödé — 数字",
        "",
    ],
)
def test_string_literals_lex_back_to_exactly_the_value(value: str) -> None:
    tokens = tokenize(literal(value))
    assert [t.kind for t in tokens] == [TokenKind.STRING, TokenKind.EOF]
    assert tokens[0].value == value


def test_random_strings_never_escape_their_literal() -> None:
    rng = random.Random(7)
    alphabet = string.printable + "\"'\\äß数"
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        has_control = any((ord(c) < 0x20 and c not in "\t\n\r") or ord(c) == 0x7F for c in value)
        if has_control:
            with pytest.raises(InputError):
                literal(value)
            continue
        rendered = literal(value)
        tokens = tokenize(rendered)
        assert len(tokens) == 2
        assert tokens[0].value == value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**64, "\x00", "bell\x07"])
def test_values_without_a_safe_literal_are_rejected(value: object) -> None:
    with pytest.raises(InputError) as raised:
        literal(value)
    assert raised.value.code == ErrorCode.INVALID_FILTER


def test_search_filter_always_starts_with_the_tenant_and_parses() -> None:
    filters = [
        MetadataFilter(field="lang", op="eq", value='en" or tenant == "other'),
        MetadataFilter(field="year", op="gte", value=2020),
        MetadataFilter(field="kind", op="in", value=["faq", "guide"]),
        MetadataFilter(field="draft", op="ne", value=True),
    ]
    expression = search_filter("acme", filters)
    tree = parse_expr(expression)
    # One AND whose first operand is exactly `tenant == "acme"`; no other operand names a top-level field,
    # so no value can widen the tenant condition.
    assert isinstance(tree, And)
    assert len(tree.operands) == 5
    first = tree.operands[0]
    assert isinstance(first, CmpOp)
    assert first.op == "=="
    assert first.left == FieldRef(name="tenant", pos=0)
    assert isinstance(first.right, StringLit)
    assert first.right.value == "acme"
    assert "FieldRef(name='tenant'" not in repr(tree.operands[1:])
    assert "StringLit(value='en\" or tenant == \"other'" in repr(tree.operands[1])


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        (MetadataFilter(field="kind", op="in", value=[]), "non-empty"),
        (MetadataFilter(field="kind", op="in", value="faq"), "non-empty"),
        (MetadataFilter(field="kind", op="eq", value=["a"]), "not a list"),
        (MetadataFilter(field="flag", op="gt", value=True), "boolean"),
        (MetadataFilter(field="kind", op="in", value=list(range(101))), "at most"),
    ],
)
def test_ill_formed_filters_are_rejected(flt: MetadataFilter, message: str) -> None:
    with pytest.raises(InputError, match=message) as raised:
        search_filter("acme", [flt])
    assert raised.value.code == ErrorCode.INVALID_FILTER


def _ingest(*docs: IngestDocument) -> DocumentsIngest:
    return DocumentsIngest(tenant="acme", documents=list(docs))


@pytest.mark.parametrize(
    ("docs", "code"),
    [
        ((IngestDocument(id="a", text="x" * 2001),), ErrorCode.DOCUMENT_TOO_LARGE),
        ((IngestDocument(id="a", text="ok"), IngestDocument(id="a", text="again")), ErrorCode.DUPLICATE_DOCUMENT_ID),
        ((IngestDocument(id="a", text=" \n "),), ErrorCode.EMPTY_DOCUMENT),
        ((IngestDocument(id="a", text="lone \ud800 surrogate"),), ErrorCode.NOT_UTF8),
        ((IngestDocument(id="bad\x00id", text="ok"),), ErrorCode.INVALID_DOCUMENT_ID),
        ((IngestDocument(id="a", text="ok", metadata={"blob": "x" * 20_000}),), ErrorCode.METADATA_TOO_LARGE),
    ],
)
def test_a_bad_document_rejects_the_whole_batch(docs: tuple[IngestDocument, ...], code: str) -> None:
    batch = _ingest(IngestDocument(id="good", text="fine text"), *docs)
    with pytest.raises(InputError) as raised:
        prepare_documents(batch, max_document_bytes=2000, chunk_chars=300, overlap_chars=60)
    assert raised.value.code == code


def test_multibyte_text_is_measured_in_utf8_bytes() -> None:
    text = "数" * 700  # 2100 bytes, 700 characters
    with pytest.raises(InputError) as raised:
        prepare_documents(
            _ingest(IngestDocument(id="a", text=text)), max_document_bytes=2000, chunk_chars=300, overlap_chars=60
        )
    assert raised.value.code == ErrorCode.DOCUMENT_TOO_LARGE


def _hit(document_id: str, score: float, chunk_index: int = 0) -> Hit:
    return Hit(tenant="acme", document_id=document_id, chunk_index=chunk_index, text="", score=score, metadata={})


def test_fusion_weights_normalised_scores_and_merges_chunks_found_by_both() -> None:
    dense = [_hit("a", 0.80), _hit("b", 0.78), _hit("c", 0.40)]
    bm25 = [_hit("b", 9.0), _hit("d", 3.0)]
    fused = fuse(dense, bm25, dense_weight=0.7, limit=10)
    assert [(h.document_id, round(h.score, 4)) for h in fused] == [
        ("b", round(0.7 * 0.78 / 0.80 + 0.3, 4)),
        ("a", 0.7),
        ("c", 0.35),
        ("d", round(0.3 * 3 / 9, 4)),
    ]
    assert [h.document_id for h in fuse(dense, bm25, dense_weight=1.0, limit=2)] == ["a", "b"]
    assert [h.document_id for h in fuse(dense, bm25, dense_weight=0.0, limit=2)] == ["b", "d"]
    # Chunks of one document are distinct candidates.
    assert len(fuse([_hit("a", 0.9, 0)], [_hit("a", 1.0, 1)], dense_weight=0.5, limit=10)) == 2


def test_fusion_of_empty_or_non_positive_lists_keeps_the_other_order() -> None:
    dense = [_hit("a", 0.5), _hit("b", 0.4)]
    assert [h.document_id for h in fuse(dense, [], dense_weight=0.2, limit=5)] == ["a", "b"]
    assert [h.document_id for h in fuse([], dense, dense_weight=0.9, limit=5)] == ["a", "b"]
    below_zero = fuse([_hit("x", -0.2)], [_hit("y", 2.0)], dense_weight=0.9, limit=5)
    assert [h.document_id for h in below_zero] == ["y", "x"]
    with pytest.raises(ValueError, match="dense_weight"):
        fuse(dense, [], dense_weight=1.5, limit=5)
