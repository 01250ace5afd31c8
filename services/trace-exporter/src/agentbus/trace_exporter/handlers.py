"""Decode a span event and export it; the message is acked only once the span is exported."""

from __future__ import annotations

from agentbus.contracts.spans import SpanRecorded
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
            span = SpanRecorded.model_validate_json(delivery.data)
        except ValidationError as exc:
            raise TerminalError(SCHEMA_VIOLATION, str(exc)) from exc
        try:
            await self._service.export(span)
        except SpanRejected as exc:
            raise TerminalError(EXPORT_REJECTED, str(exc)) from exc
