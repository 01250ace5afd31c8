"""In-memory fakes of the runner's ports, for unit tests of the use cases."""

from __future__ import annotations

from agentbus.agent_runner.ports import OutboxItem, RevisionConflictError, RunExistsError, RunRecord


class FakeRunStore:
    def __init__(self) -> None:
        self.records: dict[str, tuple[RunRecord, int]] = {}
        self._revision = 0

    async def get(self, task_id: str) -> tuple[RunRecord, int] | None:
        return self.records.get(task_id)

    async def create(self, task_id: str, record: RunRecord) -> int:
        if task_id in self.records:
            raise RunExistsError(task_id)
        self._revision += 1
        self.records[task_id] = (record, self._revision)
        return self._revision

    async def update(self, task_id: str, record: RunRecord, revision: int) -> int:
        if task_id not in self.records or self.records[task_id][1] != revision:
            raise RevisionConflictError(task_id)
        self._revision += 1
        self.records[task_id] = (record, self._revision)
        return self._revision


class CrashError(Exception):
    """Stands for the process dying at this point."""


class FakePublisher:
    """Keeps what was published; deduplicates by msg id like JetStream; can crash after N publishes."""

    def __init__(self) -> None:
        self.published: list[OutboxItem] = []
        self.attempts = 0
        self.crash_after: int | None = None

    async def publish(self, item: OutboxItem) -> None:
        if self.crash_after is not None and self.attempts >= self.crash_after:
            raise CrashError
        self.attempts += 1
        if item.msg_id not in {p.msg_id for p in self.published}:
            self.published.append(item)
