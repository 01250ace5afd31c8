"""Sessions of a `postgres` memory store: one row per session, written compare-and-set on a version.

Versions come from a sequence, so a row deleted (or expired) and created again never repeats a version a
writer read before. Expiry is `expires_at`, renewed on every write: an expired row reads as absent, is
replaced by the next create, and is removed when its owner's sessions are listed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agentbus.agent_runner.ports import MemoryUnavailableError, RevisionConflictError, SessionExistsError
from agentbus.agent_runner.sessions import SessionKey, SessionRecord
from sqlalchemy import BigInteger, Column, DateTime, MetaData, Sequence, Table, Text, and_, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_UNAVAILABLE = (OSError, OperationalError, InterfaceError)


def _session_table(name: str) -> tuple[Table, Sequence]:
    metadata = MetaData()
    versions = Sequence(f"{name}_versions", metadata=metadata)
    table = Table(
        name,
        metadata,
        Column("store", Text, primary_key=True),
        Column("tenant", Text, primary_key=True),
        Column("submitter", Text, primary_key=True),
        Column("session_id", Text, primary_key=True),
        Column("version", BigInteger, nullable=False),
        Column("record", Text, nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )
    return table, versions


def async_url(url: str) -> str:
    """`postgresql://...` as SQLAlchemy's asyncpg URL."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgres", "postgresql") else url


class PostgresSessionStore:
    def __init__(self, url: str, store: str, ttl_seconds: int, table: str) -> None:
        self._engine: AsyncEngine = create_async_engine(async_url(url), pool_size=4, pool_pre_ping=True)
        self._store = store
        self._ttl = timedelta(seconds=ttl_seconds)
        self._table, self._versions = _session_table(table)
        self._ready = False

    async def _execute(self, statement: Any) -> list[Any]:
        try:
            async with self._engine.begin() as connection:
                if not self._ready:
                    await connection.run_sync(self._table.metadata.create_all)
                    self._ready = True
                result = await connection.execute(statement)
                return list(result.all()) if result.returns_rows else []
        except _UNAVAILABLE as exc:
            raise MemoryUnavailableError(f"postgres store {self._store!r}: {exc!r}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise MemoryUnavailableError(f"postgres store {self._store!r}: {exc!r}") from exc
            raise

    def _is(self, key: SessionKey) -> Any:
        c = self._table.c
        return and_(
            c.store == self._store, c.tenant == key.tenant, c.submitter == key.submitter, c.session_id == key.session_id
        )

    def _expiry(self) -> datetime:
        return datetime.now(UTC) + self._ttl

    async def get(self, key: SessionKey) -> tuple[SessionRecord, int] | None:
        c = self._table.c
        rows = await self._execute(select(c.version, c.record).where(self._is(key), c.expires_at > func.now()))
        if not rows:
            return None
        return SessionRecord.model_validate_json(rows[0].record), int(rows[0].version)

    async def create(self, key: SessionKey, record: SessionRecord) -> int:
        c = self._table.c
        values = insert(self._table).values(
            store=self._store,
            tenant=key.tenant,
            submitter=key.submitter,
            session_id=key.session_id,
            version=self._versions.next_value(),
            record=record.model_dump_json(),
            expires_at=self._expiry(),
        )
        # An expired row is replaced as if it were absent; a live one is left alone.
        statement = values.on_conflict_do_update(
            index_elements=[c.store, c.tenant, c.submitter, c.session_id],
            set_={
                "version": values.excluded.version,
                "record": values.excluded.record,
                "expires_at": values.excluded.expires_at,
            },
            where=c.expires_at <= func.now(),
        ).returning(c.version)
        rows = await self._execute(statement)
        if not rows:
            raise SessionExistsError(key.text)
        return int(rows[0].version)

    async def update(self, key: SessionKey, record: SessionRecord, revision: int) -> int:
        c = self._table.c
        rows = await self._execute(
            update(self._table)
            .where(self._is(key), c.version == revision, c.expires_at > func.now())
            .values(version=self._versions.next_value(), record=record.model_dump_json(), expires_at=self._expiry())
            .returning(c.version)
        )
        if not rows:
            raise RevisionConflictError(key.text)
        return int(rows[0].version)

    async def delete(self, key: SessionKey, revision: int) -> bool:
        c = self._table.c
        rows = await self._execute(delete(self._table).where(self._is(key), c.version == revision).returning(c.version))
        return bool(rows)

    async def owned(self, tenant: str, submitter: str, limit: int) -> list[SessionRecord]:
        c = self._table.c
        owner = and_(c.store == self._store, c.tenant == tenant, c.submitter == submitter)
        await self._execute(delete(self._table).where(owner, c.expires_at <= func.now()))
        rows = await self._execute(select(c.record).where(owner).limit(limit))
        return [SessionRecord.model_validate_json(row.record) for row in rows]

    async def close(self) -> None:
        await self._engine.dispose()
