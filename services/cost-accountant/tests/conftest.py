"""Each test module of the accountant gets a nats-server of its own: the owner of a budget partition serves its
subjects and durable consumer, so accountants of different modules must never meet on one server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import nats_server_or_skip
from nats.aio.client import Client as NatsClient


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    with nats_server_or_skip(tmp_path_factory.mktemp("accountant-nats")) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def own_client(own_server: NatsServerProcess) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(own_server.url, "accountant-tests")
    await apply_topology(nc.jetstream())
    yield nc
    await nc.close()
