"""The shared exported-span ledger on real databases (a SQLite file and PostgreSQL), as two replicas use it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
from agentbus.runtime.tracing import TraceContext
from agentbus.trace_exporter.adapters.ledger import SqlExportLedger
from agentbus.trace_exporter.ports import SpanKey


def _keys(count: int) -> list[SpanKey]:
    trace = TraceContext.new()
    return [(trace.trace_id, trace.child().span_id) for _ in range(count)]


@pytest_asyncio.fixture
async def replicas(ledger_url: str) -> AsyncIterator[tuple[SqlExportLedger, SqlExportLedger]]:
    """Two replicas' ledgers on one database, opened at the same moment (both create the table if missing)."""
    a, b = SqlExportLedger(ledger_url, owner="replica-a"), SqlExportLedger(ledger_url, owner="replica-b")
    await asyncio.gather(a.open(), b.open())
    yield a, b
    await a.close()
    await b.close()


async def test_a_claimed_span_is_not_claimable_by_another_replica_until_exported_or_released(
    replicas: tuple[SqlExportLedger, SqlExportLedger],
) -> None:
    a, b = replicas
    keys = _keys(4)
    first = await a.claim(keys, lease_seconds=60)
    assert first.mine == set(keys)
    assert first.exported == first.elsewhere == set()

    seen_by_b = await b.claim(keys, lease_seconds=60)
    assert seen_by_b.elsewhere == set(keys)
    assert seen_by_b.mine == seen_by_b.exported == set()

    await a.record(keys[:2])
    await a.release(keys[2:3])
    later = await b.claim(keys, lease_seconds=60)
    assert later.exported == set(keys[:2])
    assert later.mine == {keys[2]}, "a released claim is free at once"
    assert later.elsewhere == {keys[3]}


async def test_a_replica_renewing_its_own_claim_keeps_it(replicas: tuple[SqlExportLedger, SqlExportLedger]) -> None:
    a, b = replicas
    keys = _keys(3)
    await a.claim(keys, lease_seconds=0.5)
    await asyncio.sleep(0.2)
    assert await a.renew(keys, lease_seconds=60) == set(keys)
    await asyncio.sleep(0.5)
    assert (await b.claim(keys, lease_seconds=60)).elsewhere == set(keys)


async def test_a_lapsed_claim_is_taken_over_and_its_old_holder_cannot_renew_it(
    replicas: tuple[SqlExportLedger, SqlExportLedger],
) -> None:
    a, b = replicas
    keys = _keys(3)
    await a.claim(keys, lease_seconds=0.2)
    await asyncio.sleep(0.4)
    assert (await b.claim(keys, lease_seconds=60)).mine == set(keys)
    assert await a.renew(keys, lease_seconds=60) == set()
    await a.release(keys)  # not a's to release any more
    assert (await a.claim(keys, lease_seconds=60)).elsewhere == set(keys)


async def test_concurrent_claims_of_overlapping_batches_give_each_span_to_one_replica(
    replicas: tuple[SqlExportLedger, SqlExportLedger],
) -> None:
    a, b = replicas
    keys = _keys(600)  # more than one statement's chunk
    batches = [keys[i : i + 150] for i in range(0, 600, 75)]  # every span is in two batches
    results = await asyncio.gather(*(ledger.claim(batch, 60) for batch in batches for ledger in (a, b)))
    by_a = set().union(*(r.mine for r in results[0::2]))
    by_b = set().union(*(r.mine for r in results[1::2]))
    assert by_a | by_b == set(keys)
    assert by_a & by_b == set()


async def test_recording_is_idempotent_and_wins_over_any_claim(
    replicas: tuple[SqlExportLedger, SqlExportLedger],
) -> None:
    a, b = replicas
    keys = _keys(2)
    await b.claim(keys, lease_seconds=60)
    # a exported them all the same (its own claim had lapsed and was taken): the record says what happened.
    await a.record(keys)
    await a.record(keys)
    claims = await b.claim(keys, lease_seconds=60)
    assert claims.exported == set(keys)
    assert await b.renew(keys, lease_seconds=60) == set()


async def test_old_spans_are_forgotten(replicas: tuple[SqlExportLedger, SqlExportLedger]) -> None:
    a, _ = replicas
    old, claimed = _keys(3), _keys(2)
    await a.record(old)
    await a.claim(claimed, lease_seconds=60)
    assert await a.forget_older_than(3600) == 0
    await asyncio.sleep(0.05)
    assert await a.forget_older_than(0.01) == 5
    assert (await a.claim(old, lease_seconds=60)).mine == set(old)
