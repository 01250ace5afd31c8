"""Fakes of the exporter's ports, for unit tests of the use case."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Sequence

from agentbus.trace_exporter.domain import ExportSpan
from agentbus.trace_exporter.ports import BackendUnavailable, SpanClaims, SpanKey, SpansRejected


class FakeSink:
    """Records exported batches. `outages` failing calls first; spans named in `refuse` are rejected;
    `on_attempt` sees every attempt's spans first."""

    name = "fake"

    def __init__(
        self,
        outages: int = 0,
        refuse: Iterable[str] = (),
        retry_after: float | None = None,
        on_attempt: Callable[[Sequence[ExportSpan]], None] | None = None,
    ) -> None:
        self.outages = outages
        self.refuse = set(refuse)
        self.retry_after = retry_after
        self.on_attempt = on_attempt
        self.batches: list[list[ExportSpan]] = []
        self.attempts = 0
        self.closed = False

    async def export(self, spans: Sequence[ExportSpan]) -> None:
        self.attempts += 1
        if self.on_attempt is not None:
            self.on_attempt(spans)
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
    """The ledger in memory. `others` holds claims of other replicas: span key -> lease end (loop time)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.ids: set[SpanKey] = set()
        self.claims: set[SpanKey] = set()
        self.others: dict[SpanKey, float] = {}
        self.renewals = 0
        self.released: set[SpanKey] = set()
        self.opened = False
        self._clock = clock or (lambda: asyncio.get_running_loop().time())

    async def open(self) -> None:
        self.opened = True

    async def claim(self, keys: Collection[SpanKey], lease_seconds: float) -> SpanClaims:
        now = self._clock()
        exported = self.ids.intersection(keys)
        elsewhere = {k for k in keys if k not in exported and self.others.get(k, -1.0) > now}
        mine = set(keys) - exported - elsewhere
        for key in mine:
            self.others.pop(key, None)
        self.claims |= mine
        return SpanClaims(mine=frozenset(mine), exported=frozenset(exported), elsewhere=frozenset(elsewhere))

    async def renew(self, keys: Collection[SpanKey], lease_seconds: float) -> set[SpanKey]:
        self.renewals += 1
        return self.claims.intersection(keys)

    async def record(self, keys: Collection[SpanKey]) -> None:
        self.ids.update(keys)
        self.claims.difference_update(keys)

    async def release(self, keys: Collection[SpanKey]) -> None:
        self.released.update(self.claims.intersection(keys))
        self.claims.difference_update(keys)

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
