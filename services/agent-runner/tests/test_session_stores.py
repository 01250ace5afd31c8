"""The session stores against their real servers: nats-server (AGENTBUS_SESSIONS), Redis at 127.0.0.1:6379 and
PostgreSQL at 127.0.0.1:5432 (database `test`). Without Redis or PostgreSQL a test skips, except under CI=true.

Each store: a record is created once, updated only from the revision read, deleted only at that revision,
listed per tenant and submitter, and gone once idle for its TTL.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from agentbus.agent_runner.adapters.nats_kv_session_store import NatsKvSessionStore
from agentbus.agent_runner.adapters.postgres_session_store import PostgresSessionStore
from agentbus.agent_runner.adapters.redis_session_store import RedisSessionStore
from agentbus.agent_runner.ports import MemoryUnavailableError, RevisionConflictError, SessionExistsError, SessionStore
from agentbus.agent_runner.sessions import SessionKey, new_record
from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import SESSIONS
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import skip_outside_ci

REDIS_URL = os.environ.get("AGENTBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("AGENTBUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("nats-kv", "redis", "postgres")
TTL_SECONDS = 2
STORE_NAME = f"store{uuid.uuid4().hex[:8]}"
"""Each test's keys are its own (test-named session ids) under one store name per run."""


@pytest_asyncio.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, nats_server: NatsServerProcess) -> AsyncIterator[SessionStore]:
    name = STORE_NAME
    kind: str = request.param
    made: SessionStore
    if kind == "nats-kv":
        nc = await connect_nats(nats_server.url, "session-store-test")
        js = nc.jetstream()
        await apply_topology(js)
        made = NatsKvSessionStore(js, await js.key_value(SESSIONS.bucket), name, TTL_SECONDS)
        try:
            yield made
        finally:
            await nc.close()
        return
    if kind == "redis":
        made = RedisSessionStore.from_url(REDIS_URL, name, TTL_SECONDS, "agentbus-test")
    else:
        made = PostgresSessionStore(POSTGRES_URL, name, TTL_SECONDS, "agentbus_test_sessions")
    try:
        await made.get(SessionKey(name, "acme", "probe", "probe"))
    except MemoryUnavailableError as exc:
        await made.close()
        skip_outside_ci(f"{kind} unavailable: {exc}")
    try:
        yield made
    finally:
        await made.close()


def _key(store: SessionStore, tenant: str = "acme", submitter: str = "ada", session: str = "s1") -> SessionKey:
    """A key of its own for each store and test (the stores of one run share one name)."""
    return SessionKey(STORE_NAME, tenant, f"{submitter}{id(store)}", session)


async def test_writes_are_compare_and_set(store: SessionStore) -> None:
    key = _key(store)
    record = new_record(key, utc_now())
    first = await store.create(key, record)
    with pytest.raises(SessionExistsError):
        await store.create(key, record)
    running = record.model_copy(update={"running": "task-1"})
    second = await store.update(key, running, first)
    with pytest.raises(RevisionConflictError):
        await store.update(key, record, first)
    found = await store.get(key)
    assert found is not None
    assert found == (running, second)
    assert not await store.delete(key, first)
    assert await store.delete(key, second)
    assert await store.get(key) is None


async def test_sessions_are_listed_per_tenant_and_submitter(store: SessionStore) -> None:
    keys = [_key(store, session="a"), _key(store, session="b"), _key(store, submitter="bob"), _key(store, "globex")]
    for key in keys:
        await store.create(key, new_record(key, utc_now()))
    ada = keys[0].submitter
    owned = await store.owned("acme", ada, 10)
    assert sorted(record.session_id for record in owned) == ["a", "b"]
    assert [r.tenant for r in await store.owned("globex", ada, 10)] == ["globex"]
    assert len(await store.owned("acme", ada, 1)) == 1


async def test_an_idle_session_is_gone_after_the_ttl_and_a_write_renews_it(store: SessionStore) -> None:
    key = _key(store, session="idle")
    record = new_record(key, utc_now())
    revision = await store.create(key, record)
    await asyncio.sleep(TTL_SECONDS * 0.6)
    revision = await store.update(key, record.model_copy(update={"running": "t"}), revision)
    await asyncio.sleep(TTL_SECONDS * 0.6)
    assert await store.get(key) is not None, "a write renews the TTL"
    await asyncio.sleep(TTL_SECONDS * 0.8)
    assert await store.get(key) is None
    with pytest.raises(RevisionConflictError):
        await store.update(key, record, revision)
    assert await store.create(key, record) > 0, "an expired session starts anew"
