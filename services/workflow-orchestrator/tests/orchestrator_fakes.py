"""In-memory fakes of the orchestrator's ports, for unit tests of the use cases.

Every effect (a record written, an index entry, a publish) goes through one `Effects` counter that can stand for
the process dying just before the n-th effect, so a test can crash the orchestrator at every boundary.
"""

from __future__ import annotations

from typing import Generic

from agentbus.workflow_orchestrator.ports import (
    OutboxItem,
    RecordExistsError,
    RecordT,
    RevisionConflictError,
)


class CrashError(Exception):
    """Stands for the process dying at this point."""


class Effects:
    """Counts effects; with `crash_at`, the effect of that number is never done: CrashError is raised instead."""

    def __init__(self) -> None:
        self.count = 0
        self.crash_at: int | None = None

    def next(self) -> None:
        if self.crash_at is not None and self.count == self.crash_at:
            self.crash_at = None
            raise CrashError
        self.count += 1


class FakeRecordStore(Generic[RecordT]):
    def __init__(self, effects: Effects) -> None:
        self.records: dict[str, tuple[RecordT, int]] = {}
        self._revision = 0
        self._effects = effects

    async def get(self, key: str) -> tuple[RecordT, int] | None:
        return self.records.get(key)

    async def create(self, key: str, record: RecordT) -> int:
        if key in self.records:
            raise RecordExistsError(key)
        self._effects.next()
        self._revision += 1
        self.records[key] = (record, self._revision)
        return self._revision

    async def update(self, key: str, record: RecordT, revision: int) -> int:
        if key not in self.records or self.records[key][1] != revision:
            raise RevisionConflictError(key)
        self._effects.next()
        self._revision += 1
        self.records[key] = (record, self._revision)
        return self._revision


class FakeStepIndex:
    def __init__(self, effects: Effects) -> None:
        self.runs: dict[tuple[str, str], str] = {}
        self._effects = effects

    async def put(self, tenant: str, task_id: str, run_id: str) -> None:
        self._effects.next()
        assert self.runs.setdefault((tenant, task_id), run_id) == run_id

    async def run_of(self, tenant: str, task_id: str) -> str | None:
        return self.runs.get((tenant, task_id))


class FakePublisher:
    """Keeps what was published, in order; deduplicates by msg id like JetStream (and the runner by task id)."""

    def __init__(self, effects: Effects) -> None:
        self.published: list[OutboxItem] = []
        self.attempts = 0
        self._ids: set[str] = set()
        self._effects = effects

    async def publish(self, item: OutboxItem) -> None:
        self._effects.next()
        self.attempts += 1
        if item.msg_id not in self._ids:
            self._ids.add(item.msg_id)
            self.published.append(item)

    def on(self, prefix: str) -> list[OutboxItem]:
        return [item for item in self.published if item.subject.startswith(prefix)]
