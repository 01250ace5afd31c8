"""The exported-span ledger in SQL: a SQLite file for one exporter, PostgreSQL shared by several replicas.

One row per span. A replica claims the spans of a batch before exporting them (the row names it as owner
until `lease_until`), marks them exported once the backend took them, and only then acks their messages.
Claims are taken with single statements that the database serialises (an insert that does nothing on
conflict, and an update whose condition is re-checked under the row lock), so two replicas never both hold
a live claim on one span. Times are the database's clock, so replicas' clocks never need to agree.

Every transaction is short (a few statements over the ids of one batch); on SQLite each one begins
IMMEDIATE, so two processes sharing the file take turns instead of failing to upgrade a read lock.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from agentbus.runtime.errors import ConfigurationError
from agentbus.trace_exporter.ports import SpanClaims, SpanKey
from sqlalchemy import Column, Float, Index, MetaData, String, Table, delete, event, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

metadata = MetaData()
spans_table = Table(
    "trace_exporter_spans",
    metadata,
    Column("span_key", String(100), primary_key=True, comment="<trace id>:<span id>"),
    Column("owner", String(200), nullable=True, comment="The replica holding the claim; NULL once exported."),
    Column("lease_until", Float, nullable=False, comment="The claim lapses then (epoch seconds, database clock)."),
    Column("exported_at", Float, nullable=True, comment="When the backend took the span; NULL while claimed."),
    Column("touched_at", Float, nullable=False, comment="Last claim, renewal or export; what pruning reads."),
)
Index("trace_exporter_spans_by_touch", spans_table.c.touched_at)

_CHUNK = 500  # ids per statement: far below every driver's parameter limit
_WAL_ATTEMPTS = 200  # 10 s of 50 ms waits
_NOW_SQL = {
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
    "postgresql": "SELECT extract(epoch FROM clock_timestamp())::float8",
}


def span_key(key: SpanKey) -> str:
    trace_id, span_id = key
    return f"{trace_id}:{span_id}"


def _pair(stored: str) -> SpanKey:
    trace_id, _, span_id = stored.partition(":")
    return trace_id, span_id


def _chunks(keys: Iterable[SpanKey]) -> Iterator[list[str]]:
    # Sorted, so concurrent claims on PostgreSQL lock rows in one order.
    ordered = sorted({span_key(k) for k in keys})
    for i in range(0, len(ordered), _CHUNK):
        yield ordered[i : i + _CHUNK]


def default_owner() -> str:
    """Who this process is in the ledger: its host (the pod's name), pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url`: sqlite+aiosqlite:///path (created if missing) or postgresql+asyncpg://..."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _use_immediate_transactions(engine)
        return engine
    if backend != "postgresql":
        raise ConfigurationError(f"the trace ledger needs SQLite or PostgreSQL, not {backend!r} ({parsed!r})")
    return create_async_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)


def _use_immediate_transactions(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy, not the driver, begins transactions, so that they can begin IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: Any) -> None:
    # Switching a new file to WAL needs it to itself, and SQLite answers "locked" at once rather than wait
    # (the busy timeout does not apply): replicas opening a fresh file together take turns here.
    for _ in range(_WAL_ATTEMPTS - 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.05)
        else:
            return
    cursor.execute("PRAGMA journal_mode=WAL")


class SqlExportLedger:
    """Claims, exported marks and their pruning, in one table (see the module docstring)."""

    def __init__(self, url: str, *, owner: str | None = None) -> None:
        self.url = url
        self.owner = owner or default_owner()
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the trace ledger is not open")
        return self._engine

    async def open(self) -> None:
        engine = create_engine(self.url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(metadata.create_all, checkfirst=True)
        except SQLAlchemyError as exc:
            await engine.dispose()
            if _lost_creation_race(exc):
                # Another replica created the table in the same instant: it is there now.
                return await self._reopen()
            raise ConfigurationError(f"cannot open the exported-span ledger {make_url(self.url)!r}: {exc}") from exc
        self._engine = engine
        return None

    async def _reopen(self) -> None:
        engine = create_engine(self.url)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all, checkfirst=True)
        self._engine = engine

    async def claim(self, keys: Collection[SpanKey], lease_seconds: float) -> SpanClaims:
        table = spans_table
        mine: set[SpanKey] = set()
        exported: set[SpanKey] = set()
        elsewhere: set[SpanKey] = set()
        async with self.engine.begin() as connection:
            now = await _now(connection)
            until = now + lease_seconds
            for chunk in _chunks(keys):
                rows = [
                    {"span_key": k, "owner": self.owner, "lease_until": until, "exported_at": None, "touched_at": now}
                    for k in chunk
                ]
                # executemany of one statement: compiled once and cached, where a multi-row VALUES is compiled
                # anew for every batch (that compilation was a quarter of the exporter's CPU).
                await connection.execute(_insert(connection).on_conflict_do_nothing(), rows)
                # Take over claims that lapsed (a replica that died or stalled), and renew this replica's own.
                await connection.execute(
                    update(table)
                    .where(
                        table.c.span_key.in_(chunk),
                        table.c.exported_at.is_(None),
                        (table.c.lease_until < now) | (table.c.owner == self.owner),
                    )
                    .values(owner=self.owner, lease_until=until, touched_at=now)
                )
                result = await connection.execute(
                    select(table.c.span_key, table.c.owner, table.c.exported_at).where(table.c.span_key.in_(chunk))
                )
                for stored, owner, exported_at in result:
                    key = _pair(stored)
                    if exported_at is not None:
                        exported.add(key)
                    elif owner == self.owner:
                        mine.add(key)
                    else:
                        elsewhere.add(key)
        return SpanClaims(mine=frozenset(mine), exported=frozenset(exported), elsewhere=frozenset(elsewhere))

    async def renew(self, keys: Collection[SpanKey], lease_seconds: float) -> set[SpanKey]:
        table = spans_table
        still: set[SpanKey] = set()
        async with self.engine.begin() as connection:
            now = await _now(connection)
            for chunk in _chunks(keys):
                mine = (table.c.span_key.in_(chunk), table.c.owner == self.owner, table.c.exported_at.is_(None))
                await connection.execute(
                    update(table).where(*mine).values(lease_until=now + lease_seconds, touched_at=now)
                )
                result = await connection.execute(select(table.c.span_key).where(*mine))
                still.update(_pair(stored) for (stored,) in result)
        return still

    async def record(self, keys: Collection[SpanKey]) -> None:
        async with self.engine.begin() as connection:
            now = await _now(connection)
            for chunk in _chunks(keys):
                rows = [
                    {"span_key": k, "owner": None, "lease_until": now, "exported_at": now, "touched_at": now}
                    for k in chunk
                ]
                statement = _insert(connection)
                await connection.execute(
                    statement.on_conflict_do_update(
                        index_elements=[spans_table.c.span_key],
                        set_={
                            "owner": None,
                            "exported_at": statement.excluded.exported_at,
                            "lease_until": statement.excluded.lease_until,
                            "touched_at": statement.excluded.touched_at,
                        },
                    ),
                    rows,
                )

    async def release(self, keys: Collection[SpanKey]) -> None:
        table = spans_table
        async with self.engine.begin() as connection:
            for chunk in _chunks(keys):
                await connection.execute(
                    delete(table).where(
                        table.c.span_key.in_(chunk), table.c.owner == self.owner, table.c.exported_at.is_(None)
                    )
                )

    async def forget_older_than(self, seconds: float) -> int:
        async with self.engine.begin() as connection:
            cutoff = await _now(connection) - seconds
            result = await connection.execute(delete(spans_table).where(spans_table.c.touched_at < cutoff))
            return int(result.rowcount)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()


def _insert(connection: AsyncConnection) -> Any:
    """INSERT with ON CONFLICT for the connection's dialect (the same API in both)."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(spans_table)
    return sqlite.insert(spans_table)


async def _now(connection: AsyncConnection) -> float:
    return float((await connection.execute(text(_NOW_SQL[connection.dialect.name]))).scalar_one())


def _lost_creation_race(exc: SQLAlchemyError) -> bool:
    message = str(exc).lower()
    return "already exists" in message or "duplicate key" in message
