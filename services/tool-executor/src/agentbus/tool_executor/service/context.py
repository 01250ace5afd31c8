"""What every use case of the executor shares: its tools and approvers, the store, the publisher (with the
outbox marks that follow each publish), metrics, spans, the clock and this process's identity in claims."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import jsonschema
from agentbus.contracts.common import utc_now
from agentbus.runtime.logging import get_logger
from agentbus.runtime.spans import SpanAttribute, SpanEmitter
from agentbus.runtime.tool_registry import ToolDefinition
from agentbus.tool_executor.domain import ApprovalRecord, ApprovalStatus, CallRecord
from agentbus.tool_executor.policy import ApproverDirectory, CompiledPolicy
from agentbus.tool_executor.ports import AuditEntry, ExecutorStore, OutgoingMessage, Publisher
from agentbus.tool_executor.service.faults import FaultPoints
from agentbus.tool_executor.service.messages import trace_of, verdict_of
from agentbus.tool_executor.service.metrics import ExecutorMetrics

_log = get_logger(__name__)

_MARK_DELAY_SECONDS = 0.05


@dataclass(frozen=True)
class LoadedTool:
    definition: ToolDefinition
    policy: CompiledPolicy
    arguments: jsonschema.Draft202012Validator


class Executor:
    def __init__(
        self,
        tools: Mapping[str, LoadedTool],
        approvers: ApproverDirectory,
        store: ExecutorStore,
        publisher: Publisher,
        metrics: ExecutorMetrics,
        spans: SpanEmitter,
        *,
        lease_seconds: float,
        faults: FaultPoints | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.tools = tools
        self.approvers = approvers
        self.store = store
        self.metrics = metrics
        self.spans = spans
        self.lease = timedelta(seconds=lease_seconds)
        self.faults = faults or FaultPoints()
        self.clock = clock
        self.owner = f"executor-{uuid.uuid4().hex[:16]}"
        """This process's identity in execution claims."""
        self._publisher = publisher
        self._to_mark: list[str] = []
        self._marker: asyncio.Task[None] | None = None

    # --- publishing --------------------------------------------------------------------------------------

    async def publish(self, messages: list[OutgoingMessage]) -> None:
        """Publish committed outbox messages, in order; they are marked published shortly after, in batches.

        A mark lost in a crash only means a re-publish, which the stream drops as a duplicate; batching the
        marks saves a write per message.
        """
        for message in messages:
            await self._publisher.publish(message)
            self._to_mark.append(message.msg_id)
            if self._marker is None or self._marker.done():
                self._marker = asyncio.create_task(self._mark_published(), name="outbox-marks")

    async def publish_together(self, messages: list[OutgoingMessage]) -> None:
        """Publish messages whose order does not matter (each on its own stream) at once: one ack wait for all."""
        await asyncio.gather(*(self._publisher.publish(message) for message in messages))
        self._to_mark.extend(message.msg_id for message in messages)
        if self._marker is None or self._marker.done():
            self._marker = asyncio.create_task(self._mark_published(), name="outbox-marks")

    async def flush(self, call_id: str | None, *, created_before: datetime | None = None) -> None:
        """Publish what a call (or every call) still has unpublished, oldest first."""
        stored = await self.store.transact(lambda ledger: ledger.unpublished(call_id, created_before=created_before))
        await self.publish([message.message for message in stored])

    async def publish_verdict(self, entry: AuditEntry) -> None:
        subject, payload = verdict_of(entry)
        await self._publisher.notify(subject, payload)

    async def flush_marks(self) -> None:
        """Record the publications not yet marked (at shutdown, after the consumers drained)."""
        while self._marker is not None and not self._marker.done():
            await asyncio.gather(self._marker, return_exceptions=True)

    async def _mark_published(self) -> None:
        await asyncio.sleep(_MARK_DELAY_SECONDS)
        while self._to_mark:
            batch, self._to_mark = self._to_mark, []
            at = self.clock()
            try:
                await self._mark(batch, at)
            except Exception as exc:
                # Unmarked messages are published again by the sweep; the stream drops the repeats.
                _log.warning("outbox_mark_failed", count=len(batch), error=repr(exc))

    async def _mark(self, msg_ids: list[str], at: datetime) -> None:
        await self.store.transact(lambda ledger: ledger.mark_published(msg_ids, at))

    # --- what follows a commit ---------------------------------------------------------------------------

    def resolved(
        self, record: CallRecord, approval: ApprovalRecord, status: ApprovalStatus, by: str | None, at: datetime
    ) -> None:
        """Count a resolved approval and record the span of its wait."""
        self.metrics.approvals_resolved.labels(approval.tool, status.value).inc()
        trace, parent = trace_of(record)
        self.spans.record(
            name=f"approval {approval.tool}",
            kind="approval_wait",
            trace=trace,
            parent_span_id=parent,
            start=approval.requested_at,
            end=at,
            task_id=approval.task_id,
            tenant=approval.tenant,
            status="ok" if status is ApprovalStatus.APPROVED else "error",
            status_message=None if status is ApprovalStatus.APPROVED else status.value,
            attributes={
                SpanAttribute.TOOL.value: approval.tool,
                SpanAttribute.AGENT.value: approval.agent,
                "agentbus.approval_id": approval.approval_id,
                "agentbus.approval.outcome": status.value,
                "agentbus.approval.by": by,
                "agentbus.approval.risk": approval.risk,
            },
        )
