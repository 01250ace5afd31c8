"""Cross-service fixtures: the real runner and worker, in this process, on the session's nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from helpers import AGENTS_DIR


@pytest_asyncio.fixture(scope="session")
async def suite(bootstrapped_nats: NatsServerProcess) -> AsyncIterator[list[BusService]]:
    """agent-runner and inference-worker (scripted engine) serving the session's server."""
    services = [
        create_runner(RunnerSettings(nats_url=bootstrapped_nats.url, agents_dir=AGENTS_DIR, drain_timeout_seconds=2)),
        create_worker(WorkerSettings(nats_url=bootstrapped_nats.url, drain_timeout_seconds=2)),
    ]
    for service in services:
        await service.start()
    yield services
    for service in services:
        await service.stop()
