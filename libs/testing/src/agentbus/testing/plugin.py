"""pytest fixtures that start real servers. Nothing JetStream does is mocked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import pytest_asyncio
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerError, NatsServerProcess, NatsUser, free_port
from nats.aio.client import Client as NatsClient


@contextlib.contextmanager
def running_nats_server(
    store_dir: Path, extra_config: str = "", users: tuple[NatsUser, ...] = ()
) -> Iterator[NatsServerProcess]:
    """A nats-server with JetStream under `store_dir`, on free ports, stopped on exit.

    With `users`, the server requires authentication and enforces each user's permissions.
    """
    server = NatsServerProcess(
        store_dir=store_dir,
        port=free_port(),
        monitor_port=free_port(),
        extra_config=extra_config,
        log_file=store_dir / "nats-server.log",
        users=users,
    )
    store_dir.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def skip_outside_ci(reason: str) -> NoReturn:
    """Skip a test whose real server or tool is missing; under CI (CI=true) fail instead, since CI must run it."""
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(f"{reason} (CI must run this test, not skip it)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def nats_server_or_skip(
    store_dir: Path, extra_config: str = "", users: tuple[NatsUser, ...] = ()
) -> Iterator[NatsServerProcess]:
    """`running_nats_server` for a fixture: when the server cannot start, skip, except under CI=true."""
    try:
        with running_nats_server(store_dir, extra_config, users) as server:
            yield server
    except NatsServerError as exc:
        skip_outside_ci(f"nats-server unavailable: {exc}")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    """One real nats-server for the test session. Under CI=true a failure to start fails, never skips."""
    with nats_server_or_skip(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServerProcess) -> str:
    return nats_server.url


@pytest_asyncio.fixture(scope="session")
async def bootstrapped_nats(nats_server: NatsServerProcess) -> NatsServerProcess:
    """The session's server with the registry's streams, consumers and buckets applied."""
    nc = await connect_nats(nats_server.url, "agentbus-test-bootstrap")
    try:
        await apply_topology(nc.jetstream())
    finally:
        await nc.close()
    return nats_server


@pytest_asyncio.fixture
async def nats_client(nats_server: NatsServerProcess) -> AsyncIterator[NatsClient]:
    """A connection to the session's server for one test."""
    nc = await connect_nats(nats_server.url, "agentbus-test")
    try:
        yield nc
    finally:
        await nc.close()
