"""Alembic environment (async template).

The service runs migrations through `SqlApprovalStore.migrate`, which hands over an open connection in
`config.attributes["connection"]`. Run by the `alembic` command instead (writing a new revision), it
connects to `-x url=...` or the ini file's `sqlalchemy.url` with an async engine.
"""

from __future__ import annotations

import asyncio

from agentbus.tool_executor.adapters.schema import metadata
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure_and_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("give a database: alembic -x url=... or sqlalchemy.url in the ini file")
    asyncio.run(_run_with_own_engine(url))


_run()
