"""Internal span events: every service reports what it did, for one trace per task."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from agentbus.contracts.common import BusMessage, Identifier
from pydantic import Field, TypeAdapter

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


MAX_SPANS_PER_BATCH = 1000


class SpanBatch(BusMessage):
    """Several finished spans of one service in one message, as an emitter sends them when spans pile up.

    On the same subject as single `SpanRecorded` events: one message, one stored entry and one ack for many
    spans. Each span is still exported once, by its own `span_id`.
    """

    spans: list[SpanRecorded] = Field(min_length=1, max_length=MAX_SPANS_PER_BATCH)


# Left to right, the batch first: a single span fails it at once (it has no `spans`). Measured per span:
# 2.5 µs in a batch and 4 µs alone this way, against 10 and 4 µs with the default "smart" union, and 10 and
# 3 µs with the single span tried first (a batch's spans are then read twice).
_SPAN_PAYLOAD: TypeAdapter[SpanBatch | SpanRecorded] = TypeAdapter(
    Annotated[SpanBatch | SpanRecorded, Field(union_mode="left_to_right")]
)


def spans_in(payload: bytes | str) -> list[SpanRecorded]:
    """The spans a span message carries: one `SpanRecorded`, or the spans of a `SpanBatch`.

    Raises pydantic's ValidationError when the payload is neither.
    """
    decoded = _SPAN_PAYLOAD.validate_json(payload)
    return decoded.spans if isinstance(decoded, SpanBatch) else [decoded]
