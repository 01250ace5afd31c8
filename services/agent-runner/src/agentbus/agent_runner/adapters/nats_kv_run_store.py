"""Run records in a JetStream key-value bucket, one key per run (`<tenant>.<task_id>`), written compare-and-set."""

from __future__ import annotations

from agentbus.agent_runner.ports import RevisionConflictError, RunExistsError, RunRecord
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class NatsKvRunStore:
    def __init__(self, bucket: KeyValue) -> None:
        self._bucket = bucket

    async def get(self, key: str) -> tuple[RunRecord, int] | None:
        try:
            entry = await self._bucket.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return RunRecord.model_validate_json(entry.value), entry.revision or 0

    async def create(self, key: str, record: RunRecord) -> int:
        try:
            return await self._bucket.create(key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise RunExistsError(key) from exc

    async def update(self, key: str, record: RunRecord, revision: int) -> int:
        try:
            return await self._bucket.update(key, record.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise RevisionConflictError(key) from exc
