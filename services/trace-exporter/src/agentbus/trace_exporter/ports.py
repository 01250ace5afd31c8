"""What the exporter needs from the outside: somewhere to send spans, and a record of what it sent."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from agentbus.trace_exporter.domain import ExportSpan


class BackendUnavailable(Exception):  # noqa: N818 - a condition, like ConnectionRefused, not a programming error
    """The trace backend cannot take spans now (down, overloaded, unreachable): retry later.

    `retry_after_seconds` is the backend's own hint (a Retry-After header), if it gave one.
    """

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class SpansRejected(Exception):  # noqa: N818 - the backend's verdict on the request, not a crash
    """The backend refused the request for good (malformed, too large): retrying the same spans cannot help."""


class TraceSink(Protocol):
    """Where spans go: Langfuse over OTLP/HTTP, or a local JSONL file."""

    name: str

    async def export(self, spans: Sequence[ExportSpan]) -> None:
        """Deliver all of `spans`, or raise BackendUnavailable / SpansRejected having delivered none."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


class ExportLedger(Protocol):
    """The ids of spans already exported. It outlives the process, so a redelivered span is skipped."""

    async def open(self) -> None:
        """Create or open the record."""
        ...

    async def exported(self, span_ids: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (trace_id, span_id) pairs were exported before."""
        ...

    async def record(self, span_ids: Iterable[tuple[str, str]]) -> None:
        """Remember these (trace_id, span_id) pairs as exported (durably, before the messages are acked)."""
        ...

    async def forget_older_than(self, seconds: float) -> int:
        """Forget ids recorded more than `seconds` ago; returns how many."""
        ...

    async def close(self) -> None:
        """Close the record."""
        ...
