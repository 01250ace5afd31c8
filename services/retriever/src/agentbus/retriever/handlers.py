"""Decode ingestion, deletion and search messages, call one use case, publish or reply with what it returns."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from agentbus.contracts.rag import DocumentsDelete, DocumentsIngest
from agentbus.contracts.registry import (
    RAG_DELETE_DOCUMENTS,
    RAG_INGEST_DOCUMENTS,
    RAG_SEARCH,
    USAGE_RECORDED,
    Header,
    budget_subject,
)
from agentbus.retriever.domain import InputError
from agentbus.retriever.service import RetrieverService, SearchOutcome
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.runtime.logging import get_logger
from agentbus.runtime.publishing import publish_message
from agentbus.runtime.spans import SpanAttribute, SpanEmitter
from agentbus.runtime.tracing import TraceContext
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"

_log = get_logger(__name__)


class RetrieverHandlers:
    def __init__(
        self, js: JetStreamContext, service: RetrieverService, search_concurrency: int, spans: SpanEmitter
    ) -> None:
        self._js = js
        self._spans = spans
        self._service = service
        self._slots = asyncio.Semaphore(search_concurrency)
        self._searches: set[asyncio.Task[None]] = set()

    async def on_documents_ingest(self, delivery: Delivery) -> None:
        tokens = RAG_INGEST_DOCUMENTS.parse(delivery.subject)
        tenant, submitter = tokens["tenant"], tokens["submitter"]
        try:
            message = DocumentsIngest.model_validate_json(delivery.data)
            outcome = await self._service.ingest(message, tenant, submitter)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        except InputError as exc:
            raise TerminalError(exc.code, exc.message) from exc
        _log.info(
            "documents_ingested",
            tenant=tenant,
            ingested_by=submitter,
            documents=outcome.documents,
            chunks=outcome.chunks,
            stale_chunks_deleted=outcome.stale_chunks_deleted,
        )

    async def on_documents_delete(self, delivery: Delivery) -> None:
        tokens = RAG_DELETE_DOCUMENTS.parse(delivery.subject)
        tenant, submitter = tokens["tenant"], tokens["submitter"]
        try:
            message = DocumentsDelete.model_validate_json(delivery.data)
            deleted = await self._service.delete(message, tenant)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        except InputError as exc:
            raise TerminalError(exc.code, exc.message) from exc
        _log.info(
            "documents_deleted",
            tenant=tenant,
            deleted_by=submitter,
            documents=len(message.document_ids),
            chunks=deleted,
        )

    async def on_search_request(self, msg: Msg) -> None:
        """Core-NATS callback: take a slot (waiting when all are busy), then answer in a task of its own."""
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._searches.add(task)
        task.add_done_callback(self._search_done)

    def _search_done(self, task: asyncio.Task[None]) -> None:
        self._searches.discard(task)
        self._slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("search_reply_failed", error=repr(error))

    async def _answer(self, msg: Msg) -> None:
        tenant = RAG_SEARCH.parse(msg.subject)["tenant"]
        incoming = TraceContext.parse((msg.headers or {}).get(Header.TRACEPARENT.value))
        started = datetime.now(UTC)
        outcome = await self._service.search(msg.data, tenant)
        ctx = incoming.child() if incoming else None
        reply = outcome.reply
        if outcome.usage is not None:
            # Before the reply, which names it: the caller's task waits for exactly this record to be priced,
            # so its cost is complete. The usage id makes a repeat harmless.
            await publish_message(
                self._js,
                budget_subject(USAGE_RECORDED, outcome.usage.tenant),
                outcome.usage,
                msg_id=outcome.usage.usage_id,
                trace=ctx,
            )
            reply = reply.model_copy(update={"usage_id": outcome.usage.usage_id})
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())
        else:
            _log.warning("search_without_reply_subject", tenant=tenant)
        if incoming is not None and ctx is not None:
            # Only searches that belong to a trace (an agent's tool call) get a span: an untraced search
            # would otherwise start a one-span trace of its own.
            self._record_span(ctx, incoming.span_id, started, tenant, outcome)

    def _record_span(
        self, ctx: TraceContext, parent_span_id: str, started: datetime, tenant: str, outcome: SearchOutcome
    ) -> None:
        reply = outcome.reply
        self._spans.record(
            name="retrieval",
            kind="retrieval",
            trace=ctx,
            parent_span_id=parent_span_id,
            start=started,
            end=datetime.now(UTC),
            task_id=outcome.request.task_id if outcome.request else None,
            tenant=tenant,
            status="error" if reply.error else "ok",
            status_message=f"{reply.error.code}: {reply.error.message}" if reply.error else None,
            attributes={
                SpanAttribute.INPUT: outcome.request.query if outcome.request else None,
                SpanAttribute.OUTPUT: [f"{c.document_id}#{c.chunk_index}" for c in reply.chunks],
                "retrieval.mode": outcome.request.mode if outcome.request else None,
                "retrieval.top_k": outcome.request.top_k if outcome.request else None,
            },
        )

    async def drain_searches(self, timeout: float) -> None:
        """Wait for searches in progress to be answered (on shutdown)."""
        if self._searches:
            await asyncio.wait(set(self._searches), timeout=timeout)
