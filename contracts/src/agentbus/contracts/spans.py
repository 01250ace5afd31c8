"""Internal span events: every service reports what it did, for one trace per task."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from agentbus.contracts.common import BusMessage, Identifier
from pydantic import Field

SpanKind = Literal["task", "agent_step", "generation", "tool", "retrieval", "approval_wait"]


class SpanRecorded(BusMessage):
    """A finished span. `span_id` is unique, so the exporter exports each span once."""

    trace_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="W3C trace id.")
    span_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="W3C span id.")
    parent_span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    name: str = Field(min_length=1, max_length=200)
    kind: SpanKind
    service: str
    task_id: Identifier | None = None
    tenant: Identifier | None = None
    start: datetime
    end: datetime
    status: Literal["ok", "error"] = "ok"
    status_message: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
