"""Real databases for the executor's store tests: a SQLite file, or a fresh Postgres database dropped after."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import sqlalchemy as sa
from agentbus.testing import skip_outside_ci
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DATABASE_KINDS = ("sqlite", "postgres")


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database of `kind`. Without a Postgres server the test skips, except under CI=true."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    name = f"executor_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        await admin.dispose()
        skip_outside_ci(f"postgres unavailable: {exc}")
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()
