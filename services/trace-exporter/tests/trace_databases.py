"""Real databases for the exported-span ledger: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from agentbus.testing import skip_outside_ci
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DATABASE_KINDS = ("sqlite", "postgres")


@contextlib.asynccontextmanager
async def ledger_database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty ledger database of `kind`. Under CI=true a missing PostgreSQL fails, never skips."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'trace-ledger.sqlite3'}"
        return
    database = f"trace_ledger_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    except (OSError, SQLAlchemyError) as exc:
        await admin.dispose()
        skip_outside_ci(f"PostgreSQL unavailable at {POSTGRES_URL}: {exc}")
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{database}"
    finally:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.dispose()
