"""What the exporter needs from the outside: somewhere to send spans, and a record of what it sent."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
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


SpanKey = tuple[str, str]
"""(trace id, span id): what identifies a span across replicas and redeliveries."""


@dataclass(frozen=True)
class SpanClaims:
    """What the ledger says about the spans of a batch."""

    mine: frozenset[SpanKey]
    """Claimed by this exporter now: export them."""
    exported: frozenset[SpanKey]
    """Exported before (by any replica): ack without exporting."""
    elsewhere: frozenset[SpanKey]
    """Another replica holds a live claim on them: wait until it exported them or its claim lapsed."""


class ExportLedger(Protocol):
    """Which spans were exported, and which replica is exporting which, shared by every exporter replica.

    A span is exported only under a claim, and recorded as exported before its message is acked, so neither a
    redelivery (to any replica) nor two replicas holding copies of one span export it twice.
    """

    async def open(self) -> None:
        """Create or open the record."""
        ...

    async def claim(self, keys: Collection[SpanKey], lease_seconds: float) -> SpanClaims:
        """Claim every unexported span of `keys` that no other replica holds a live claim on, until the lease ends."""
        ...

    async def renew(self, keys: Collection[SpanKey], lease_seconds: float) -> set[SpanKey]:
        """Extend this exporter's claims on `keys`; returns those it still holds (a lapsed one may be taken)."""
        ...

    async def record(self, keys: Collection[SpanKey]) -> None:
        """Remember these spans as exported (durably, before the messages are acked)."""
        ...

    async def release(self, keys: Collection[SpanKey]) -> None:
        """Give up this exporter's claims on spans it did not export, so another replica may take them at once."""
        ...

    async def forget_older_than(self, seconds: float) -> int:
        """Forget spans last touched more than `seconds` ago; returns how many."""
        ...

    async def close(self) -> None:
        """Close the record."""
        ...
