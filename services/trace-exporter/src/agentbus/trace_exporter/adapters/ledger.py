"""The exported-span record in a small SQLite file (stdlib sqlite3, on one worker thread)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from agentbus.runtime.errors import ConfigurationError

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exported_spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    exported_at REAL NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS exported_spans_by_time ON exported_spans (exported_at);
"""
_LOOKUP_CHUNK = 400  # SQLite's default limit is 32766 variables; stay far below it


class SqliteExportLedger:
    """Span ids exported so far, committed before the span messages are acked.

    One connection, used only from one worker thread, so the event loop never waits on the disk. WAL with
    synchronous=NORMAL: a commit survives a crash of the process (what a redelivery follows); only a power
    loss may take the last commits, which would re-export those spans once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-ledger")
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            assert self._db is not None, "ledger not open"
            return work(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            return db

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"cannot open the exported-span ledger {self.path}: {exc}") from exc

    async def exported(self, span_ids: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        wanted = list(span_ids)

        def lookup(db: sqlite3.Connection) -> set[tuple[str, str]]:
            found: set[tuple[str, str]] = set()
            for i in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[i : i + _LOOKUP_CHUNK]
                placeholders = ",".join("(?,?)" for _ in chunk)
                params = [part for pair in chunk for part in pair]
                # Only "(?,?)" placeholders are formatted in; the ids travel as parameters.
                query = (
                    f"SELECT trace_id, span_id FROM exported_spans WHERE (trace_id, span_id) IN (VALUES {placeholders})"  # noqa: S608
                )
                rows = db.execute(query, params)
                found.update((row[0], row[1]) for row in rows)
            return found

        return await self._run(lookup) if wanted else set()

    async def record(self, span_ids: Iterable[tuple[str, str]]) -> None:
        now = time.time()
        rows = [(trace_id, span_id, now) for trace_id, span_id in span_ids]

        def insert(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.executemany("INSERT OR IGNORE INTO exported_spans VALUES (?, ?, ?)", rows)

        if rows:
            await self._run(insert)

    async def forget_older_than(self, seconds: float) -> int:
        cutoff = time.time() - seconds

        def delete(db: sqlite3.Connection) -> int:
            with db:
                db.execute("BEGIN")
                return db.execute("DELETE FROM exported_spans WHERE exported_at < ?", (cutoff,)).rowcount

        return await self._run(delete)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=False)
