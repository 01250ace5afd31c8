"""An agent answers from its tenant's documents, with citations, across the real runner, executor and retriever."""

from __future__ import annotations

import asyncio

from agentbus.contracts.rag import DocumentsIngest, IngestDocument, SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_INGEST_DOCUMENTS, RAG_SEARCH
from agentbus.runtime.service import BusService
from helpers import new_task_id, publish_submission, submission, task_events
from nats.aio.client import Client as NatsClient

REFUNDS = (
    "Refunds. Annual plans cancelled within 30 days are refunded in full. The money reaches the original "
    "payment method within 5 to 10 business days."
)
OTHER_TENANT_SECRET = "Globex internal: refunds are never granted to anyone."


async def _ingest_and_wait(nc: NatsClient, tenant: str, document: IngestDocument, probe: str) -> None:
    message = DocumentsIngest(tenant=tenant, documents=[document])
    subject = RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter=f"{tenant}-app")
    await nc.jetstream().publish(subject, message.model_dump_json().encode())
    request = SearchRequest(tenant=tenant, query=probe, top_k=5)
    async with asyncio.timeout(60):
        while True:
            reply = await nc.request(RAG_SEARCH.format(tenant=tenant), request.model_dump_json().encode(), timeout=30)
            found = SearchReply.model_validate_json(reply.data)
            if any(chunk.document_id == document.id for chunk in found.chunks):
                return
            await asyncio.sleep(0.2)


async def test_the_support_agent_answers_with_citations_from_its_own_tenant_only(
    suite: list[BusService], nats_client: NatsClient
) -> None:
    await _ingest_and_wait(nats_client, "acme", IngestDocument(id="kb-refunds", text=REFUNDS), "refunds")
    await _ingest_and_wait(nats_client, "globex", IngestDocument(id="kb-globex", text=OTHER_TENANT_SECRET), "refunds")

    task_id = new_task_id("support")
    text = 'search_knowledge_base(query="how long do refunds take")'
    await publish_submission(nats_client, submission(task_id, agent="support", text=text), submitter="carol")
    events = await task_events(nats_client, task_id, timeout=60)
    assert [e["kind"] for e in events] == ["accepted", "step", "step", "completed"]
    completed = events[-1]
    citations = completed["citations"]
    assert citations, f"the answer must cite what it retrieved: {completed['output']}"
    assert {c["document_id"] for c in citations} == {"kb-refunds"}
    assert "5 to 10 business days" in citations[0]["text"]
    assert "Globex" not in completed["output"]
