"""Decode a span message (one span, or a batch of them) and export its spans; acked only once all are exported."""

from __future__ import annotations

from agentbus.contracts.spans import spans_in
from agentbus.runtime.consumer import Delivery
from agentbus.runtime.errors import TerminalError
from agentbus.trace_exporter.service import SpanExportService, SpanRejected
from pydantic import ValidationError

SCHEMA_VIOLATION = "schema_violation"
EXPORT_REJECTED = "export_rejected"


class ExporterHandlers:
    def __init__(self, service: SpanExportService) -> None:
        self._service = service

    async def on_span_recorded(self, delivery: Delivery) -> None:
        try:
            spans = spans_in(delivery.data)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        try:
            # A refused span dead-letters its whole message; the others are exported and recorded in the
            # ledger first, so replaying the dead letter exports only what was refused.
            await self._service.export_all(spans)
        except SpanRejected as exc:
            raise TerminalError(EXPORT_REJECTED, str(exc)) from exc
