"""Fixtures of the trace-exporter tests: a fresh span consumer per test, a local OTLP receiver, ledger databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from agentbus.runtime.server import NatsServerProcess
from nats.aio.client import Client as NatsClient
from trace_bus import reset_span_stream
from trace_databases import DATABASE_KINDS, ledger_database
from trace_otlp_receiver import OtlpReceiver


@pytest_asyncio.fixture
async def span_bus(bootstrapped_nats: NatsServerProcess, nats_client: NatsClient) -> AsyncIterator[NatsClient]:
    """A connection to a server whose AGENTBUS_SPANS stream and exporter consumer hold nothing yet."""
    await reset_span_stream(nats_client)
    yield nats_client


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest_asyncio.fixture(params=DATABASE_KINDS)
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty exported-span ledger database: a SQLite file, then a fresh PostgreSQL database."""
    async with ledger_database(request.param, tmp_path) as url:
        yield url
