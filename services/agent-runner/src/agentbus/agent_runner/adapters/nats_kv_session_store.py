"""Sessions of a `nats-kv` memory store in the AGENTBUS_SESSIONS bucket, written compare-and-set.

Keys are `<store>.<tenant>.<submitter>.<session_id>`. Every write carries the store's TTL as a per-message
TTL (`Nats-TTL`): the server removes a session nobody wrote for that long. A deletion is a purge marker
that expires the same way.
"""

from __future__ import annotations

from agentbus.agent_runner.ports import MemoryUnavailableError, RevisionConflictError, SessionExistsError
from agentbus.agent_runner.sessions import SessionKey, SessionRecord
from agentbus.contracts.registry import SESSIONS
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.errors import ServiceUnavailableError as JetStreamUnavailableError
from nats.js.kv import KeyValue

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_OPERATION = "KV-Operation"
_WRONG_LAST_SEQUENCE = (10071, 10164)
_UNAVAILABLE = (
    NatsTimeoutError,
    TimeoutError,
    NoRespondersError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    JetStreamUnavailableError,
)


class NatsKvSessionStore:
    def __init__(self, js: JetStreamContext, bucket: KeyValue, store: str, ttl_seconds: int) -> None:
        self._js = js
        self._bucket = bucket
        self._store = store
        self._ttl = float(ttl_seconds)
        self._stream = f"KV_{SESSIONS.bucket}"

    def _key(self, key: SessionKey) -> str:
        return f"{self._store}.{key.text}"

    def _subject(self, key: str) -> str:
        return f"$KV.{SESSIONS.bucket}.{key}"

    async def get(self, key: SessionKey) -> tuple[SessionRecord, int] | None:
        try:
            entry = await self._bucket.get(self._key(key))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"sessions bucket: {exc!r}") from exc
        if not entry.value:
            return None
        return SessionRecord.model_validate_json(entry.value), entry.revision or 0

    async def create(self, key: SessionKey, record: SessionRecord) -> int:
        try:
            return await self._bucket.create(self._key(key), record.model_dump_json().encode(), msg_ttl=self._ttl)
        except KeyWrongLastSequenceError as exc:
            raise SessionExistsError(key.text) from exc
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"sessions bucket: {exc!r}") from exc

    async def _write(self, key: SessionKey, payload: bytes, revision: int, headers: dict[str, str]) -> int:
        # KeyValue.update takes no TTL: publish the write itself, on the key's subject, expecting `revision`.
        try:
            ack = await self._js.publish(
                self._subject(self._key(key)),
                payload,
                headers={_EXPECTED_LAST: str(revision), **headers},
                msg_ttl=self._ttl,
            )
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"sessions bucket: {exc!r}") from exc
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RevisionConflictError(key.text) from exc
            raise
        return int(ack.seq)

    async def update(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        return await self._write(key, record.model_dump_json().encode(), revision, {})

    async def delete(self, key: SessionKey, revision: int) -> bool:
        try:
            await self._write(key, b"", revision, {_OPERATION: "PURGE", "Nats-Rollup": "sub"})
        except RevisionConflictError:
            return False
        return True

    async def owned(self, tenant: str, submitter: str, limit: int) -> list[SessionRecord]:
        """Reads the stored messages under the submitter's prefix one by one (a bucket keeps one per key)."""
        subject = self._subject(f"{self._store}.{tenant}.{submitter}.*")
        found: list[SessionRecord] = []
        sequence = 0
        while len(found) < limit:
            try:
                message = await self._js.get_msg(self._stream, seq=sequence + 1, subject=subject, next=True)
            except NotFoundError:
                break
            except _UNAVAILABLE as exc:
                raise MemoryUnavailableError(f"sessions bucket: {exc!r}") from exc
            sequence = message.seq or sequence + 1
            if message.data and (message.headers or {}).get(_OPERATION) is None:
                found.append(SessionRecord.model_validate_json(message.data))
        return found

    async def close(self) -> None:
        return None
