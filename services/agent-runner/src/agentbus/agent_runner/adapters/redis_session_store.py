"""Sessions of a `redis` memory store: one hash per session (`version`, `record`), written compare-and-set.

Each write is one Lua script: it compares the version the writer read, writes the next one and renews the
key's TTL (PEXPIRE), atomically on the server. A key created anew starts from the server's clock in
microseconds, so a session that expired and came back can never match a version read before it expired.
One key per script: it runs on Redis Cluster too.
"""

from __future__ import annotations

from typing import Any

from agentbus.agent_runner.ports import MemoryUnavailableError, RevisionConflictError, SessionExistsError
from agentbus.agent_runner.sessions import SessionKey, SessionRecord
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_WRITE = """
local current = redis.call('HGET', KEYS[1], 'version')
if current == false then current = '0' end
if current ~= ARGV[1] then return -1 end
local version
if current == '0' then
  local now = redis.call('TIME')
  version = tonumber(now[1]) * 1000000 + tonumber(now[2])
else
  version = tonumber(current) + 1
end
redis.call('HSET', KEYS[1], 'version', string.format('%d', version), 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return string.format('%d', version)
"""
_DELETE = """
local current = redis.call('HGET', KEYS[1], 'version')
if current ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_SCAN_BATCH = 200


class RedisSessionStore:
    def __init__(self, client: Redis, store: str, ttl_seconds: int, key_prefix: str) -> None:
        self._redis = client
        self._store = store
        self._ttl_ms = str(ttl_seconds * 1000)
        self._prefix = f"{key_prefix}:{store}"
        self._write_script = client.register_script(_WRITE)
        self._delete_script = client.register_script(_DELETE)

    @classmethod
    def from_url(cls, url: str, store: str, ttl_seconds: int, key_prefix: str) -> RedisSessionStore:
        """A store on its own connection pool; nothing connects until the first command."""
        client = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30)
        return cls(client, store, ttl_seconds, key_prefix)

    def _key(self, key: SessionKey) -> str:
        return f"{self._prefix}:{key.tenant}:{key.submitter}:{key.session_id}"

    async def _call(self, command: Any) -> Any:
        try:
            return await command
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"redis store {self._store!r}: {exc!r}") from exc

    async def get(self, key: SessionKey) -> tuple[SessionRecord, int] | None:
        version, record = await self._call(self._redis.hmget(self._key(key), ["version", "record"]))
        if version is None or record is None:
            return None
        return SessionRecord.model_validate_json(record), int(version)

    async def _write(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        written = await self._call(
            self._write_script(keys=[self._key(key)], args=[str(revision), record.model_dump_json(), self._ttl_ms])
        )
        return int(written)

    async def create(self, key: SessionKey, record: SessionRecord) -> int:
        version = await self._write(key, record, 0)
        if version < 0:
            raise SessionExistsError(key.text)
        return version

    async def update(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        version = await self._write(key, record, revision)
        if version < 0:
            raise RevisionConflictError(key.text)
        return version

    async def delete(self, key: SessionKey, revision: int) -> bool:
        return bool(await self._call(self._delete_script(keys=[self._key(key)], args=[str(revision)])))

    async def owned(self, tenant: str, submitter: str, limit: int) -> list[SessionRecord]:
        found: list[SessionRecord] = []
        pattern = f"{self._prefix}:{tenant}:{submitter}:*"
        try:
            async for name in self._redis.scan_iter(match=pattern, count=_SCAN_BATCH):
                record = await self._redis.hget(name, "record")
                if record is not None:
                    found.append(SessionRecord.model_validate_json(record))
                if len(found) >= limit:
                    break
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"redis store {self._store!r}: {exc!r}") from exc
        return found

    async def close(self) -> None:
        await self._redis.aclose()
