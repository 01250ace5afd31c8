"""The retriever end to end: real nats-server, real Milvus Lite file, the packaged MiniLM model."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import nats.errors
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.rag import DocumentsDelete, DocumentsIngest, IngestDocument, SearchReply
from agentbus.contracts.registry import (
    DEAD_LETTER,
    RAG_DELETE_DOCUMENTS,
    RAG_INGEST_DOCUMENTS,
    RAG_SEARCH,
    RETRIEVER_DELETES,
    RETRIEVER_INGEST,
    USAGE,
    USAGE_RECORDED,
    budget_subject,
)
from agentbus.contracts.usage import UsageRecorded
from agentbus.retriever.adapters.milvus import INGESTED_BY_FIELD, KEY_FIELD
from agentbus.retriever.app import RetrieverApp
from agentbus.retriever.domain import CHUNK_INDEX_FIELD, DOCUMENT_FIELD, ErrorCode, tenant_condition
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy


def new_tenant(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_until_consumed(js: JetStreamContext, timeout: float = 60.0) -> None:
    """Until the retriever's consumers hold nothing pending or unacked: every published batch is handled."""
    async with asyncio.timeout(timeout):
        while True:
            infos = [await js.consumer_info(c.stream, c.durable) for c in (RETRIEVER_INGEST, RETRIEVER_DELETES)]
            if all(not i.num_pending and not i.num_ack_pending for i in infos):
                return
            await asyncio.sleep(0.05)


PASSWORD_DOC = (
    "To reset your password, open Settings, choose Security and click 'Reset password'. "
    "A link valid for 30 minutes is sent to your e-mail address. " * 4
)
INVOICE_DOC = "Invoices are issued on the first working day of each month and can be downloaded as PDF from Billing."
VPN_DOC = "The VPN client needs port 1194/UDP open. If the tunnel drops, check the firewall and restart the client."


SUBMITTER = "kb-app"


async def ingest(
    nc: NatsClient,
    tenant: str,
    docs: list[IngestDocument],
    *,
    payload_tenant: str | None = None,
    submitter: str = SUBMITTER,
) -> int:
    message = DocumentsIngest(tenant=payload_tenant or tenant, documents=docs)
    subject = RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter=submitter)
    ack = await nc.jetstream().publish(subject, message.model_dump_json().encode())
    return ack.seq


async def delete(nc: NatsClient, tenant: str, document_ids: list[str], *, submitter: str = SUBMITTER) -> None:
    message = DocumentsDelete(tenant=tenant, document_ids=document_ids)
    subject = RAG_DELETE_DOCUMENTS.format(tenant=tenant, submitter=submitter)
    await nc.jetstream().publish(subject, message.model_dump_json().encode())


async def search(nc: NatsClient, tenant: str, payload: dict[str, Any] | bytes) -> SearchReply:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = await nc.request(RAG_SEARCH.format(tenant=tenant), data, timeout=30)
    return SearchReply.model_validate_json(reply.data)


async def chunk_rows(app: RetrieverApp, tenant: str) -> list[dict[str, Any]]:
    assert app.index is not None
    rows: list[dict[str, Any]] = await asyncio.to_thread(
        app.index.client.query,
        app.index.collection,
        filter=tenant_condition(tenant),
        output_fields=[KEY_FIELD, DOCUMENT_FIELD, CHUNK_INDEX_FIELD, INGESTED_BY_FIELD],
        limit=1000,
    )
    return rows


async def dead_letter_for(nc: NatsClient, seq: int, timeout: float = 30) -> DeadLetter:
    subject = DEAD_LETTER.format(stream=RETRIEVER_INGEST.stream, consumer=RETRIEVER_INGEST.durable)
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        async with asyncio.timeout(timeout):
            while True:
                letter = DeadLetter.model_validate_json((await sub.next_msg(timeout=timeout)).data)
                if letter.stream_seq == seq:
                    return letter
    finally:
        await sub.unsubscribe()


async def test_ingest_search_reingest_without_duplicates_then_delete(
    retriever: RetrieverApp, nats_client: NatsClient
) -> None:
    tenant = new_tenant()
    docs = [
        IngestDocument(id="kb/password.md", text=PASSWORD_DOC, metadata={"kind": "howto", "year": 2024}),
        IngestDocument(id="kb/invoices.md", text=INVOICE_DOC, metadata={"kind": "faq", "year": 2023}),
        IngestDocument(id="kb/vpn.md", text=VPN_DOC, metadata={"kind": "howto", "year": 2025}),
    ]
    await ingest(nats_client, tenant, docs)
    await wait_until_consumed(nats_client.jetstream())

    for mode in ("hybrid", "dense", "bm25"):
        reply = await search(
            nats_client, tenant, {"tenant": tenant, "query": "how do I reset my password", "mode": mode}
        )
        assert reply.error is None, reply.error
        assert reply.chunks[0].document_id == "kb/password.md", mode
        assert reply.chunks[0].metadata == {"kind": "howto", "year": 2024}
        assert "Reset password" in reply.chunks[0].text
    filtered = await search(
        nats_client,
        tenant,
        {"tenant": tenant, "query": "password", "filters": [{"field": "kind", "op": "eq", "value": "faq"}]},
    )
    assert {c.document_id for c in filtered.chunks} == {"kb/invoices.md"}
    recent = await search(
        nats_client,
        tenant,
        {"tenant": tenant, "query": "client", "filters": [{"field": "year", "op": "gte", "value": 2025}], "top_k": 10},
    )
    assert {c.document_id for c in recent.chunks} == {"kb/vpn.md"}

    before = await chunk_rows(retriever, tenant)
    password_chunks = sorted(r[CHUNK_INDEX_FIELD] for r in before if r[DOCUMENT_FIELD] == "kb/password.md")
    assert password_chunks == list(range(len(password_chunks)))
    assert len(password_chunks) > 1

    assert {r[INGESTED_BY_FIELD] for r in before} == {SUBMITTER}

    # The same batch again, then a shorter version of one document by another submitter: no duplicates,
    # no leftovers, and each chunk names the submitter who wrote it last.
    await ingest(nats_client, tenant, docs)
    await ingest(
        nats_client,
        tenant,
        [IngestDocument(id="kb/password.md", text="Passwords are reset by support.")],
        submitter="helpdesk-bot",
    )
    await wait_until_consumed(nats_client.jetstream())
    after = await chunk_rows(retriever, tenant)
    assert {(r[DOCUMENT_FIELD], r[INGESTED_BY_FIELD]) for r in after} == {
        ("kb/password.md", "helpdesk-bot"),
        ("kb/invoices.md", SUBMITTER),
        ("kb/vpn.md", SUBMITTER),
    }
    assert len({r[KEY_FIELD] for r in after}) == len(after)
    assert [r[CHUNK_INDEX_FIELD] for r in after if r[DOCUMENT_FIELD] == "kb/password.md"] == [0]
    assert len(after) == len(before) - len(password_chunks) + 1
    reply = await search(
        nats_client,
        tenant,
        {"tenant": tenant, "query": "reset password", "top_k": retriever.retriever_settings.max_top_k},
    )
    assert [c.text for c in reply.chunks if c.document_id == "kb/password.md"] == ["Passwords are reset by support."]

    await delete(nats_client, tenant, ["kb/password.md", "kb/never-existed.md"])
    await wait_until_consumed(nats_client.jetstream())
    reply = await search(
        nats_client,
        tenant,
        {"tenant": tenant, "query": "reset password", "top_k": retriever.retriever_settings.max_top_k},
    )
    assert reply.error is None
    assert {c.document_id for c in reply.chunks} == {"kb/invoices.md", "kb/vpn.md"}

    await delete(nats_client, tenant, ["kb/invoices.md", "kb/vpn.md"], submitter="another-app")
    await wait_until_consumed(nats_client.jetstream())
    assert await chunk_rows(retriever, tenant) == []
    gone = await search(nats_client, tenant, {"tenant": tenant, "query": "reset password"})
    assert gone.error is not None
    assert gone.error.code == ErrorCode.UNKNOWN_TENANT


HOSTILE_TENANTS: list[Any] = [
    "",
    "*",
    ">",
    "victim*",
    "VICTIM",
    " victim",
    'x" or tenant != "x',
    "x' or '1'=='1",
    'attacker" or tenant == "victim',
    "attacker\\",
    "../victim",
    "victim\x00",
    "v\u0456ctim",  # a Cyrillic i
    "a" * 65,
    None,
    ["attacker", "victim"],
    {"$ne": "x"},
]
_FUZZ = random.Random(5)
HOSTILE_TENANTS += [
    "".join(_FUZZ.choice("victim\"'\\ *>.%$[]{}()=!&|\n\t\x00-_") for _ in range(_FUZZ.randint(1, 70)))
    for _ in range(40)
]
HOSTILE_FILTERS: list[Any] = [
    [{"field": "owner", "op": "eq", "value": 'attacker" or tenant == "victim'}],
    [{"field": "owner", "op": "ne", "value": 'x" or tenant != "'}],
    [{"field": "owner", "op": "in", "value": ["attacker", '") or tenant == "victim" or ("']}],
    [{"field": 'owner"] == "x" or tenant == "victim" or metadata["owner', "op": "eq", "value": "x"}],
    [{"field": "tenant", "op": "ne", "value": "attacker"}],
    [{"field": "owner", "op": "eq", "value": "attacker\\"}],
    [{"field": "owner", "op": "eq", "value": 'attacker\\" or tenant == \\"victim'}],
    [{"field": "owner", "op": "like", "value": "%"}],
    [{"field": "owner", "op": "eq", "value": "x", "or": "tenant == 'victim'"}],
    [{"field": "owner", "op": "eq", "value": "\u0000 or 1==1"}],
]


async def test_no_query_returns_another_tenants_chunk(retriever: RetrieverApp, nats_client: NatsClient) -> None:
    attacker, victim = new_tenant("attacker"), new_tenant("victim")
    shared_text = "The secret launch code for project nightingale is stored in the vault. "
    await ingest(
        nats_client,
        attacker,
        [IngestDocument(id="a1", text=shared_text + "attacker copy", metadata={"owner": "attacker"})],
    )
    await ingest(
        nats_client, victim, [IngestDocument(id="v1", text=shared_text + "victim copy", metadata={"owner": "victim"})]
    )
    await wait_until_consumed(nats_client.jetstream())
    query = "secret launch code nightingale"

    def assert_only_attacker(reply: SearchReply) -> None:
        assert all(c.metadata.get("owner") == "attacker" for c in reply.chunks), reply
        assert all("victim" not in c.text for c in reply.chunks), reply

    baseline = await search(
        nats_client, attacker, {"tenant": attacker, "query": query, "top_k": retriever.retriever_settings.max_top_k}
    )
    assert [c.document_id for c in baseline.chunks] == ["a1"]

    for hostile in [*HOSTILE_TENANTS, victim]:
        reply = await search(
            nats_client, attacker, {"tenant": hostile, "query": query, "top_k": retriever.retriever_settings.max_top_k}
        )
        assert reply.error is not None, hostile
        assert reply.chunks == []
    for hostile in HOSTILE_FILTERS:
        for mode in ("hybrid", "dense", "bm25"):
            payload = {
                "tenant": attacker,
                "query": query,
                "top_k": retriever.retriever_settings.max_top_k,
                "filters": hostile,
                "mode": mode,
            }
            reply = await search(nats_client, attacker, payload)
            assert_only_attacker(reply)
    # The victim's own subject with the attacker's payload (or the reverse) is a tenant mismatch.
    crossed = await search(nats_client, victim, {"tenant": attacker, "query": query})
    assert crossed.error is not None
    assert crossed.error.code == ErrorCode.TENANT_MISMATCH
    for token in ("*", ">"):
        # A wildcard is not a publishable subject token: nobody answers such a request.
        try:
            reply_msg = await nats_client.request(f"{RAG_SEARCH.wildcard[:-1]}{token}", b"{}", timeout=1)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            continue
        assert SearchReply.model_validate_json(reply_msg.data).chunks == []


async def test_bad_search_requests_get_a_clear_error(retriever: RetrieverApp, nats_client: NatsClient) -> None:
    tenant = new_tenant()
    await ingest(nats_client, tenant, [IngestDocument(id="d", text="Some indexed text about kettles.")])
    await wait_until_consumed(nats_client.jetstream())
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        ({"tenant": tenant, "query": ""}, ErrorCode.INVALID_QUERY),
        ({"tenant": tenant, "query": "   \n\t"}, ErrorCode.EMPTY_QUERY),
        ({"tenant": tenant, "query": "x" * 4001}, ErrorCode.INVALID_QUERY),
        ({"tenant": tenant, "query": "kettle", "top_k": 0}, ErrorCode.TOP_K_OUT_OF_RANGE),
        ({"tenant": tenant, "query": "kettle", "top_k": 51}, ErrorCode.TOP_K_OUT_OF_RANGE),
        (
            {"tenant": tenant, "query": "kettle", "top_k": retriever.retriever_settings.max_top_k + 1},
            ErrorCode.TOP_K_OUT_OF_RANGE,
        ),
        ({"tenant": tenant, "query": "kettle", "top_k": "five"}, ErrorCode.TOP_K_OUT_OF_RANGE),
        (
            {"tenant": tenant, "query": "kettle", "filters": [{"field": "a", "op": "in", "value": []}]},
            ErrorCode.INVALID_FILTER,
        ),
        (
            {"tenant": tenant, "query": "kettle", "filters": [{"field": "a", "op": "gt", "value": True}]},
            ErrorCode.INVALID_FILTER,
        ),
        (
            {"tenant": tenant, "query": "kettle", "filters": [{"field": "a", "op": "eq", "value": "\x07"}]},
            ErrorCode.INVALID_FILTER,
        ),
        (
            {"tenant": tenant, "query": "kettle", "filters": [{"field": "1a", "op": "eq", "value": 1}]},
            ErrorCode.INVALID_FILTER,
        ),
        ({"tenant": tenant, "query": "kettle", "mode": "sql"}, ErrorCode.MALFORMED_REQUEST),
        (b"not json", ErrorCode.MALFORMED_REQUEST),
        (b'{"tenant": "' + tenant.encode() + b'", "query": "caf\xe9"}', ErrorCode.MALFORMED_REQUEST),
        ({"tenant": "other", "query": "kettle"}, ErrorCode.TENANT_MISMATCH),
    ]
    for payload, code in cases:
        reply = await search(nats_client, tenant, payload)
        assert reply.error is not None, payload
        assert reply.error.code == code, (payload, reply.error)
        assert reply.chunks == []
    nobody = new_tenant("nobody")
    unknown = await search(nats_client, nobody, {"tenant": nobody, "query": "kettle"})
    assert unknown.error is not None
    assert unknown.error.code == ErrorCode.UNKNOWN_TENANT
    fine = await search(nats_client, tenant, {"tenant": tenant, "query": "kettle"})
    assert fine.error is None
    assert [c.document_id for c in fine.chunks] == ["d"]
    no_match = await search(
        nats_client, tenant, {"tenant": tenant, "query": "kettle", "filters": [{"field": "x", "op": "eq", "value": 1}]}
    )
    assert no_match.error is None
    assert no_match.chunks == []


async def test_bad_batches_are_dead_lettered_with_their_reason_and_write_nothing(
    retriever: RetrieverApp, nats_client: NatsClient
) -> None:
    tenant = new_tenant()
    good = IngestDocument(id="good", text="This document is fine on its own.")
    js = nats_client.jetstream()
    subject = RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter=SUBMITTER)
    cases = [
        (
            await ingest(
                nats_client,
                tenant,
                [good, IngestDocument(id="big", text="x" * (retriever.retriever_settings.max_document_bytes + 1))],
            ),
            ErrorCode.DOCUMENT_TOO_LARGE,
        ),
        (await ingest(nats_client, tenant, [good, IngestDocument(id="empty", text="  ")]), ErrorCode.EMPTY_DOCUMENT),
        (await ingest(nats_client, tenant, [good], payload_tenant="someone-else"), ErrorCode.TENANT_MISMATCH),
        (
            (
                await js.publish(
                    subject, b'{"tenant": "' + tenant.encode() + b'", "documents": [{"id": "a", "text": "\xff\xfe"}]}'
                )
            ).seq,
            "schema_violation",
        ),
        (
            (
                await js.publish(
                    subject, b'{"tenant": "' + tenant.encode() + b'", "documents": [{"id": "a", "text": "\\ud800"}]}'
                )
            ).seq,
            "schema_violation",  # the JSON parser refuses a lone surrogate before any model sees it
        ),
        ((await js.publish(subject, b"[]")).seq, "schema_violation"),
        (
            (
                await js.publish(
                    RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter="x" * 65),
                    DocumentsIngest(tenant=tenant, documents=[good]).model_dump_json().encode(),
                )
            ).seq,
            ErrorCode.INVALID_SUBMITTER,  # only server permissions bind the token, so it is checked here too
        ),
    ]
    for seq, code in cases:
        letter = await dead_letter_for(nats_client, seq)
        assert letter.error.code == code
    await wait_until_consumed(js)
    assert await chunk_rows(retriever, tenant) == []


async def test_a_search_with_a_request_id_is_billed_once(retriever: RetrieverApp, nats_client: NatsClient) -> None:
    tenant = new_tenant()
    await ingest(nats_client, tenant, [IngestDocument(id="d", text="Billing happens per search.")])
    await wait_until_consumed(nats_client.jetstream())
    request = {"tenant": tenant, "query": "billing", "request_id": "call-1", "task_id": "task-9"}
    for _ in range(3):
        billed = await search(nats_client, tenant, request)
        assert billed.error is None
        assert billed.usage_id == f"retrieval:{tenant}:call-1"
        # Published (and acknowledged by the stream) before the reply that names it.
        stored = await nats_client.jetstream().get_last_msg(USAGE.name, budget_subject(USAGE_RECORDED, tenant))
        assert UsageRecorded.model_validate_json(stored.data or b"").usage_id == billed.usage_id
    unbilled = await search(nats_client, tenant, {"tenant": tenant, "query": "billing"})
    assert unbilled.error is None
    assert unbilled.usage_id is None
    sub = await nats_client.jetstream().subscribe(
        budget_subject(USAGE_RECORDED, tenant),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        stream=USAGE.name,
    )
    records = []
    try:
        while True:
            try:
                records.append(UsageRecorded.model_validate_json((await sub.next_msg(timeout=2)).data))
            except nats.errors.TimeoutError:
                break
    finally:
        await sub.unsubscribe()
    assert [(r.usage_id, r.kind, r.task_id) for r in records] == [(f"retrieval:{tenant}:call-1", "retrieval", "task-9")]
