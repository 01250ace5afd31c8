"""Records in the orchestrator's JetStream key-value bucket, written compare-and-set: runs
(`run.<tenant>.<run_id>`), concurrency slots (`slots.<tenant>.<workflow>`) and the step index
(`step.<tenant>.<task_id>`)."""

from __future__ import annotations

from typing import Generic

from agentbus.runtime.errors import DependencyUnavailableError
from agentbus.workflow_orchestrator.ports import RecordExistsError, RecordT, RevisionConflictError
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

# The bucket's stream answering nothing (a server restarting, a cluster electing a leader) is an outage.
_OUTAGE = (NoStreamResponseError, ServiceUnavailableError)


class NatsKvRecordStore(Generic[RecordT]):
    def __init__(self, bucket: KeyValue, record_type: type[RecordT]) -> None:
        self._bucket = bucket
        self._type: type[RecordT] = record_type

    async def get(self, key: str) -> tuple[RecordT, int] | None:
        try:
            entry = await self._bucket.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except _OUTAGE as exc:
            raise DependencyUnavailableError(f"the workflow bucket did not answer: {exc!r}") from exc
        if entry.value is None:
            return None
        return self._type.model_validate_json(entry.value), entry.revision or 0

    async def create(self, key: str, record: RecordT) -> int:
        try:
            return await self._bucket.create(key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise RecordExistsError(key) from exc
        except _OUTAGE as exc:
            raise DependencyUnavailableError(f"the workflow bucket did not answer: {exc!r}") from exc

    async def update(self, key: str, record: RecordT, revision: int) -> int:
        try:
            return await self._bucket.update(key, record.model_dump_json().encode(), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise RevisionConflictError(key) from exc
        except _OUTAGE as exc:
            raise DependencyUnavailableError(f"the workflow bucket did not answer: {exc!r}") from exc


class NatsKvStepIndex:
    """`step.<tenant>.<task_id>` -> run id: created once, before the step's task is submitted."""

    def __init__(self, bucket: KeyValue) -> None:
        self._bucket = bucket

    @staticmethod
    def _key(tenant: str, task_id: str) -> str:
        return f"step.{tenant}.{task_id}"

    async def put(self, tenant: str, task_id: str, run_id: str) -> None:
        try:
            await self._bucket.create(self._key(tenant, task_id), run_id.encode())
        except KeyWrongLastSequenceError:
            found = await self.run_of(tenant, task_id)
            if found != run_id:
                # Task ids carry a secret per run: two runs cannot derive the same one.
                raise RuntimeError(f"step task {task_id} of run {run_id} is indexed to run {found}") from None
        except _OUTAGE as exc:
            raise DependencyUnavailableError(f"the workflow bucket did not answer: {exc!r}") from exc

    async def run_of(self, tenant: str, task_id: str) -> str | None:
        try:
            entry = await self._bucket.get(self._key(tenant, task_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except _OUTAGE as exc:
            raise DependencyUnavailableError(f"the workflow bucket did not answer: {exc!r}") from exc
        return entry.value.decode() if entry.value else None
