"""Real databases for the accountant's tests: a SQLite file, or a fresh Postgres schema dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore, create_engine, migrate
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.testing import skip_outside_ci
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
DATABASE_KINDS = ("sqlite", "postgres")


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[tuple[str, str | None]]:
    """(url, schema) of an empty database of `kind`. Under CI=true a missing Postgres fails, never skips."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'accountant.db'}", None
        return
    schema = f"acct_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        await admin.dispose()
        skip_outside_ci(f"Postgres unavailable at {POSTGRES_URL}: {exc}")
    try:
        yield POSTGRES_URL, schema
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


async def open_store(
    url: str, schema: str | None, budgets: dict[str, Any] | None = None, *, ttl_seconds: float = 600.0
) -> SqlAccountantStore:
    """A migrated store on (url, schema) with the given budgets."""
    engine = create_engine(url, schema=schema)
    await migrate(engine)
    policy = BudgetPolicy(BudgetConfig.model_validate(budgets or {}))
    return SqlAccountantStore(engine, policy, reservation_ttl_seconds=ttl_seconds)
