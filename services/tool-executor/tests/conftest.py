"""Fixtures of the executor's tests: a nats-server of their own (no other service may share its consumers),
the runner's stand-in, and executors started in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import nats_server_or_skip
from agentbus.tool_executor.app import ToolExecutorApp, create_app
from executor_harness import RunnerStandIn, StartExecutor, executor_settings
from nats.aio.client import Client as NatsClient


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    with nats_server_or_skip(tmp_path_factory.mktemp("executor-nats")) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def own_client(own_server: NatsServerProcess) -> AsyncIterator[NatsClient]:
    nc = await connect_nats(own_server.url, "executor-tests")
    await apply_topology(nc.jetstream())
    yield nc
    await nc.close()


@pytest_asyncio.fixture(scope="module")
async def runner(own_client: NatsClient) -> AsyncIterator[RunnerStandIn]:
    stand_in = RunnerStandIn(own_client)
    await stand_in.start()
    yield stand_in
    await stand_in.stop()


@pytest_asyncio.fixture
async def start_executor(own_server: NatsServerProcess, tmp_path: Path) -> AsyncIterator[StartExecutor]:
    started: list[ToolExecutorApp] = []

    async def start(**overrides: Any) -> ToolExecutorApp:
        app = create_app(executor_settings(own_server.url, tmp_path, **overrides))
        await app.start()
        started.append(app)
        return app

    yield start
    for app in started:
        await app.stop()


@pytest_asyncio.fixture
async def executor(start_executor: StartExecutor) -> ToolExecutorApp:
    return await start_executor()
