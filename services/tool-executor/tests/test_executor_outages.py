"""What the executor does while something it depends on is down, against the real things: a Postgres database
that refuses connections, a retriever that is not there, publishes that were committed but never made. Valid
work waits; nothing is dead-lettered or failed for an outage, and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest_asyncio
from agentbus.contracts.rag import RetrievedChunk, SearchReply, SearchRequest
from agentbus.contracts.registry import DEAD_LETTER, EXECUTOR_CALLS, EXECUTOR_DECISIONS, RAG_SEARCH
from agentbus.runtime.metrics import HANDLED_METRIC
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.domain import CallRecord, CallStatus, ToolResult, approval_id_for
from agentbus.tool_executor.service.messages import result_message
from executor_harness import (
    RunnerStandIn,
    StartExecutor,
    decision_payload,
    make_call,
    new_id,
    publish_call,
    publish_decision,
    publish_withdrawal,
    sha,
    stream_payloads,
    usage_records,
    wait_until,
)
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import create_async_engine
from store_support import POSTGRES_URL, database


def _handled(app: ToolExecutorApp, consumer: str, outcome: str) -> float:
    return app.registry.get_sample_value(HANDLED_METRIC, {"consumer": consumer, "outcome": outcome}) or 0.0


class PostgresSwitch:
    """Makes one Postgres database refuse connections (and drops those it has), then lets it serve again."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")

    async def down(self) -> None:
        async with self._admin.connect() as conn:
            await conn.exec_driver_sql(f'ALTER DATABASE "{self._name}" ALLOW_CONNECTIONS false')
            await conn.exec_driver_sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self._name}'"
            )

    async def up(self) -> None:
        async with self._admin.connect() as conn:
            await conn.exec_driver_sql(f'ALTER DATABASE "{self._name}" ALLOW_CONNECTIONS true')

    async def close(self) -> None:
        await self.up()
        await self._admin.dispose()


@pytest_asyncio.fixture
async def postgres_url(tmp_path: Path) -> AsyncIterator[str]:
    async with database("postgres", tmp_path) as url:
        yield url


async def test_a_database_outage_is_waited_for_and_never_dead_letters_a_call_or_a_decision(
    start_executor: StartExecutor,
    own_client: NatsClient,
    runner: RunnerStandIn,
    tmp_path: Path,
    postgres_url: str,
) -> None:
    executor = await start_executor(database_url=postgres_url)
    tenant = new_id("t")
    approved = tmp_path / "approved.txt"
    plain = tmp_path / "plain.txt"
    waiting = make_call("append_marker", {"path": str(approved), "sleep": 0}, tenant=tenant)
    await publish_call(own_client, waiting)
    await runner.wait_for(waiting.call_id, "approval_pending")
    switch = PostgresSwitch(postgres_url.rsplit("/", 1)[1])
    try:
        await switch.down()
        call = make_call("marker_now", {"path": str(plain)}, tenant=tenant)
        await publish_call(own_client, call)
        approve = decision_payload(approval_id_for(waiting.call_id), "alice", "approve", sha(waiting))
        await publish_decision(own_client, tenant, "alice", approve)

        async def both_waited_past_max_deliver() -> bool:
            return all(
                _handled(executor, spec.durable, "waiting") >= spec.max_deliver
                for spec in (EXECUTOR_CALLS, EXECUTOR_DECISIONS)
            )

        # Any other failure would have been dead-lettered by now: max_deliver deliveries have failed.
        await wait_until(both_waited_past_max_deliver, timeout=60)
        assert not plain.exists()
        assert not approved.exists()
    finally:
        await switch.close()
    assert (await runner.wait_for(call.call_id, "result", timeout=60)).ok
    assert (await runner.wait_for(waiting.call_id, "result", timeout=60)).ok
    assert plain.read_text().splitlines() == ["run"]
    assert len(approved.read_text().splitlines()) == 1
    for spec in (EXECUTOR_CALLS, EXECUTOR_DECISIONS):
        letters = await stream_payloads(own_client, DEAD_LETTER.format(stream=spec.stream, consumer=spec.durable))
        assert [letter for letter in letters if tenant in letter.get("subject", "")] == []
        assert _handled(executor, spec.durable, "dead_lettered") == 0


async def test_a_tool_that_finishes_while_the_database_is_down_keeps_its_outcome(
    start_executor: StartExecutor,
    own_client: NatsClient,
    runner: RunnerStandIn,
    tmp_path: Path,
    postgres_url: str,
) -> None:
    executor = await start_executor(database_url=postgres_url)
    marker = tmp_path / "through.txt"
    call = make_call("slow_marker", {"path": str(marker), "sleep": 1.0}, tenant=new_id("t"))
    await publish_call(own_client, call)
    async with asyncio.timeout(20):
        while not marker.exists():
            await asyncio.sleep(0.02)
    switch = PostgresSwitch(postgres_url.rsplit("/", 1)[1])
    try:
        await switch.down()
        async with asyncio.timeout(20):
            while marker.read_text().splitlines() != ["run", "done"]:
                await asyncio.sleep(0.05)
        # Longer than the lease: its renewal failed meanwhile, and the sweep sees a lapsed claim once it can read.
        await asyncio.sleep(executor.config.execution_lease_seconds * 1.5)
    finally:
        await switch.close()
    result = await runner.wait_for(call.call_id, "result", timeout=60)
    assert result.ok, result.content
    assert marker.read_text().splitlines() == ["run", "done"]
    recorded = await executor.store.get_call(call.call_id)
    assert recorded is not None
    assert (recorded.status, recorded.attempts) == (CallStatus.SUCCEEDED, 1), "never taken over"


async def test_the_sweep_publishes_what_was_committed_but_not_published(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    call = make_call("marker_now", {"path": "/nonexistent"}, tenant=new_id("t"))
    result = ToolResult(False, "the outcome", "tool_failed", "failed")
    # A call whose outcome committed, and whose executor stopped before publishing it.
    finished = CallRecord(
        call_id=call.call_id,
        tool_call_id=call.tool_call_id,
        tenant=call.tenant,
        task_id=call.task_id,
        agent=call.agent,
        tool=call.tool,
        step=call.step,
        arguments=call.arguments,
        submitted_by=call.submitted_by,
        status=CallStatus.FAILED,
        approval_id=None,
        traceparent=None,
        created_at=datetime.now(UTC) - timedelta(minutes=1),
        result=result,
    )
    message = result_message(finished, result)
    assert await executor.store.transact(lambda ledger: ledger.insert_call(finished, None, [message]))
    update = await runner.wait_for(call.call_id, "result")
    assert update.content == "the outcome"

    async def marked() -> bool:
        return await executor.store.transact(lambda ledger: ledger.unpublished(call.call_id)) == []

    await wait_until(marked)


@contextlib.asynccontextmanager
async def _retriever(nc: NatsClient, tenant: str, seen: list[SearchRequest]) -> AsyncIterator[None]:
    async def answer(msg: Msg) -> None:
        request = SearchRequest.model_validate_json(msg.data)
        seen.append(request)
        chunk = RetrievedChunk(document_id="kb-1", chunk_index=0, text="Reset via the portal.", score=0.8)
        reply = SearchReply(chunks=[chunk], usage_id=f"retrieval:{tenant}:{request.request_id}")
        await msg.respond(reply.model_dump_json().encode())

    sub = await nc.subscribe(RAG_SEARCH.format(tenant=tenant), cb=answer)
    await nc.flush()
    try:
        yield
    finally:
        await sub.unsubscribe()


async def test_a_retrieval_waits_for_its_retriever_under_a_held_claim_and_then_succeeds(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("search_knowledge_base", {"query": "reset password"}, tenant=tenant)
    await publish_call(own_client, call)

    async def waited_twice() -> bool:
        value = executor.registry.get_sample_value(
            "agentbus_tool_dependency_waits_total", {"tool": "search_knowledge_base"}
        )
        return (value or 0) >= 2

    await wait_until(waited_twice)
    assert runner.kinds(call.call_id) == [], "no retriever is no reason to fail the call"
    info = await own_client.jetstream().consumer_info(EXECUTOR_CALLS.stream, EXECUTOR_CALLS.durable)
    assert info.num_ack_pending == 0, "the call's message was acked: the wait goes on under the claim"
    held = await executor.store.get_call(call.call_id)
    assert held is not None
    assert held.status is CallStatus.RUNNING
    assert held.lease_until is not None
    assert held.lease_until > datetime.now(UTC)
    assert held.attempts == 1

    seen: list[SearchRequest] = []
    async with _retriever(own_client, tenant, seen):
        result = await runner.wait_for(call.call_id, "result", timeout=30)
    assert result.ok, result.content
    assert [c.document_id for c in result.citations] == ["kb-1"]
    search_usage = f"retrieval:{tenant}:{call.call_id}"
    assert result.usage_ids == [f"tool:{call.call_id}", search_usage], "its own usage and the search's"
    assert {(r.request_id, r.task_id) for r in seen} == {(call.call_id, call.task_id)}
    assert [u["usage_id"] for u in await usage_records(own_client, tenant)] == [f"tool:{call.call_id}"]
    done = await executor.store.get_call(call.call_id)
    assert done is not None
    assert (done.status, done.attempts) == (CallStatus.SUCCEEDED, 1), "never taken over while it waited"


async def test_a_retrieval_stops_waiting_when_its_task_ends(
    executor: ToolExecutorApp, own_client: NatsClient, runner: RunnerStandIn
) -> None:
    tenant = new_id("t")
    call = make_call("search_knowledge_base", {"query": "reset password"}, tenant=tenant)
    await publish_call(own_client, call)

    async def running() -> bool:
        found = await executor.store.get_call(call.call_id)
        return found is not None and found.status is CallStatus.RUNNING

    await wait_until(running)
    await publish_withdrawal(own_client, call, reason="task deadline passed")
    result = await runner.wait_for(call.call_id, "result", timeout=30)
    assert result.error is not None
    assert result.error.code == "call_withdrawn"
    assert "waiting for the retriever" in result.content
    await asyncio.sleep(0.2)
    assert await usage_records(own_client, tenant) == [], "nothing ran, nothing is billed"
