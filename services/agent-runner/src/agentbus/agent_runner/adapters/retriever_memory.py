"""Long-term memory in the retriever: `remember` ingests a fact as a document, `recall` searches for facts.

Facts live in the tenant's partition of the retriever's collection, tagged with their memory collection
(and who remembered them), so a recall is filtered to its collection, and with `per_user` to the
submitter's own facts; the retriever filters by tenant on every search. A fact's document id is derived
from the fact itself, so remembering it twice keeps one. A remember is ingested as the task's submitter
(the subject's last token), as if they had ingested it; a recall is billed by the retriever once per call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from agentbus.agent_runner.domain import ANONYMOUS, REMEMBER, MemoryCall
from agentbus.agent_runner.memory import KNOWLEDGE_BASE, LongTerm, MemoryStoreSpec
from agentbus.agent_runner.ports import MemoryOutcome, MemoryUnavailableError
from agentbus.contracts.rag import DocumentsIngest, IngestDocument, MetadataFilter, SearchReply, SearchRequest
from agentbus.contracts.registry import RAG_INGEST_DOCUMENTS, RAG_SEARCH, Header
from nats.aio.client import Client as NatsClient
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError as JetStreamUnavailableError
from pydantic import ValidationError

MAX_FACT_CHARS = 4000
COLLECTION_FIELD = "memory_collection"
USER_FIELD = "memory_user"
NOTHING_REMEMBERED = "unknown_tenant"
"""The retriever's answer for a tenant with nothing indexed: for a recall, simply nothing remembered yet."""
_UNAVAILABLE = (
    NatsTimeoutError,
    TimeoutError,
    NoRespondersError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    JetStreamUnavailableError,
)


def fact_document_id(long_term: LongTerm, user: str, fact: str) -> str:
    owner = user if long_term.per_user else ""
    digest = hashlib.sha256(f"{long_term.collection}\x00{owner}\x00{' '.join(fact.split())}".encode()).hexdigest()
    return f"memory-{digest[:40]}"


class RetrieverMemory:
    def __init__(
        self, nc: NatsClient, js: JetStreamContext, stores: Mapping[str, MemoryStoreSpec], timeout_seconds: float
    ) -> None:
        self._nc = nc
        self._js = js
        self._stores = stores
        self._timeout = timeout_seconds

    async def run(self, call: MemoryCall, traceparent: str | None) -> MemoryOutcome:
        store = self._stores.get(call.store)
        long_term = store.active_long_term if store is not None else None
        if long_term is None:
            return MemoryOutcome(f"memory store {call.store!r} keeps no long-term memory", ok=False)
        headers = {Header.TRACEPARENT.value: traceparent} if traceparent else {}
        user = call.submitted_by or ANONYMOUS
        try:
            if call.tool == REMEMBER:
                return await self._remember(call, long_term, user, headers)
            return await self._recall(call, long_term, user, headers)
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"the retriever did not answer a {call.tool}: {exc!r}") from exc

    async def _remember(
        self, call: MemoryCall, long_term: LongTerm, user: str, headers: dict[str, str]
    ) -> MemoryOutcome:
        fact = _text(call.arguments, "fact")
        if fact is None or len(fact) > MAX_FACT_CHARS:
            return MemoryOutcome(f"'fact' must be a non-empty string of at most {MAX_FACT_CHARS} characters", ok=False)
        metadata: dict[str, Any] = {
            COLLECTION_FIELD: long_term.collection,
            USER_FIELD: user,
            "memory_task": call.task_id,
        }
        if call.session_id is not None:
            metadata["memory_session"] = call.session_id
        document = IngestDocument(id=fact_document_id(long_term, user, fact), text=fact, metadata=metadata)
        await self._js.publish(
            RAG_INGEST_DOCUMENTS.format(tenant=call.tenant, submitter=user),
            DocumentsIngest(tenant=call.tenant, documents=[document]).model_dump_json().encode(),
            headers={Header.MSG_ID.value: f"memory:{call.call_id}", **headers},
            timeout=self._timeout,
        )
        return MemoryOutcome(f"Remembered: {fact}")

    async def _recall(self, call: MemoryCall, long_term: LongTerm, user: str, headers: dict[str, str]) -> MemoryOutcome:
        query = _text(call.arguments, "query")
        if query is None:
            return MemoryOutcome("'query' must be a non-empty string", ok=False)
        filters = []
        if long_term.collection != KNOWLEDGE_BASE:
            filters.append(MetadataFilter(field=COLLECTION_FIELD, value=long_term.collection))
        if long_term.per_user:
            filters.append(MetadataFilter(field=USER_FIELD, value=user))
        top_k = call.arguments.get("top_k")
        try:
            request = SearchRequest(
                tenant=call.tenant,
                query=query,
                top_k=min(top_k, long_term.top_k) if isinstance(top_k, int) and top_k > 0 else long_term.top_k,
                filters=filters,
                request_id=call.call_id,
                task_id=call.task_id,
            )
        except ValidationError as exc:
            return MemoryOutcome(f"invalid recall: {exc.errors()[0]['msg']}", ok=False)
        reply_message = await self._nc.request(
            RAG_SEARCH.format(tenant=call.tenant),
            request.model_dump_json().encode(),
            timeout=self._timeout,
            headers=headers or None,
        )
        reply = SearchReply.model_validate_json(reply_message.data)
        usage = [reply.usage_id] if reply.usage_id else []
        if reply.error is not None:
            if reply.error.code == NOTHING_REMEMBERED:
                return MemoryOutcome("Nothing is remembered yet.", usage_ids=usage)
            return MemoryOutcome(f"{reply.error.code}: {reply.error.message}", ok=False, usage_ids=usage)
        if not reply.chunks:
            return MemoryOutcome("Nothing remembered matches.", usage_ids=usage)
        lines = [f"[{number}] {chunk.text}" for number, chunk in enumerate(reply.chunks, start=1)]
        return MemoryOutcome("\n".join(lines), citations=list(reply.chunks), usage_ids=usage)


def _text(arguments: dict[str, Any], name: str) -> str | None:
    value = arguments.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None
