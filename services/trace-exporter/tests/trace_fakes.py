"""Fakes of the exporter's ports, for unit tests of the use case."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from agentbus.trace_exporter.domain import ExportSpan
from agentbus.trace_exporter.ports import BackendUnavailable, SpansRejected


class FakeSink:
    """Records exported batches. `outages` failing calls first; spans named in `refuse` are rejected."""

    name = "fake"

    def __init__(self, outages: int = 0, refuse: Iterable[str] = (), retry_after: float | None = None) -> None:
        self.outages = outages
        self.refuse = set(refuse)
        self.retry_after = retry_after
        self.batches: list[list[ExportSpan]] = []
        self.attempts = 0
        self.closed = False

    async def export(self, spans: Sequence[ExportSpan]) -> None:
        self.attempts += 1
        if self.outages > 0:
            self.outages -= 1
            raise BackendUnavailable("backend down", retry_after_seconds=self.retry_after)
        if any(span.name in self.refuse for span in spans):
            raise SpansRejected("400 bad span")
        self.batches.append(list(spans))

    @property
    def exported(self) -> list[ExportSpan]:
        return [span for batch in self.batches for span in batch]

    async def close(self) -> None:
        self.closed = True


class FakeLedger:
    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()
        self.opened = False

    async def open(self) -> None:
        self.opened = True

    async def exported(self, span_ids: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        return self.ids.intersection(span_ids)

    async def record(self, span_ids: Iterable[tuple[str, str]]) -> None:
        self.ids.update(span_ids)

    async def forget_older_than(self, seconds: float) -> int:
        return 0

    async def close(self) -> None:
        self.opened = False


class RecordingSleep:
    """Stands in for asyncio.sleep in the retry loop: records each delay instead of waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)
