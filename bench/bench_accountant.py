"""The cost-accountant: usage ingestion and reservation latency, against raw floors measured in the same run.

Figures, not a test. For each database (SQLite file, Postgres schema) it measures:

1. store batch insert: `SqlAccountantStore.record_usage` on batches of `--batch` priced records (ledger rows
   with ON CONFLICT DO NOTHING, reservation settlement, every scope's counter upserted, soft-limit checks),
   against the floor: a plain SQLAlchemy Core `insert()` of the same rows into a table of the same shape,
   one commit per batch;
2. ingestion through JetStream: `--events` usage records pre-published on `agentbus.usage.<tenant>`, then
   consumed by the accountant (`python -m agentbus.cost_accountant`, its own process) into the ledger,
   against the floor: a plain nats-py process pulling the same records from its own durable consumer
   (fetch batches of 256, json.loads, one Core insert and commit per fetch, then ack). Rate = records
   written between the first and the last row seen (polling the table every 20 ms), so start-up is left out;
3. reservation latency: `--runs` concurrent runs, each making `--reservations` reservations one after the
   other over request/reply (all in one tenant, so they contend on the same tenant, agent and model
   budgets), p50 and p99; against the floor: the same requests answered by a bare nats-py responder that
   replies at once (the bus round trip alone).

    uv run python bench/bench_accountant.py [--events 20000] [--runs 32] [--reservations 100]
                                            [--databases sqlite,postgres] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import yaml
from agentbus.contracts.budget import BudgetReserveRequest
from agentbus.contracts.registry import BUDGET_RESERVE, USAGE, USAGE_RECORDED, Header
from agentbus.contracts.usage import UsageRecorded
from agentbus.cost_accountant.adapters.schema import ledger
from agentbus.cost_accountant.adapters.sql_store import SqlAccountantStore, create_engine, migrate
from agentbus.cost_accountant.budgets import BudgetConfig, BudgetPolicy
from agentbus.cost_accountant.config import load_price_table
from agentbus.cost_accountant.ports import PricedUsage
from agentbus.cost_accountant.pricing import price_usage
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import Column, MetaData, Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

REPO_ROOT = Path(__file__).resolve().parent.parent
PRICES_FILE = REPO_ROOT / "config" / "prices.yaml"
TENANT = "bench"
MODELS = ("gpt-4o-mini", "gpt-4o", "scripted", "llama-3-8b-stable")
FLOOR_DURABLE = "bench-floor-usage"
FLOOR_FETCH = 256
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"

floor_metadata = MetaData()
floor_ledger = Table(
    "floor_ledger", floor_metadata, *(Column(c.name, c.type, primary_key=c.primary_key) for c in ledger.columns)
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def usage_record(i: int, run: str) -> UsageRecorded:
    gpu = MODELS[i % len(MODELS)] == "llama-3-8b-stable"
    return UsageRecorded(
        usage_id=f"llm:{run}-{i}",
        kind="llm",
        tenant=TENANT,
        task_id=f"task-{i % 500}",
        agent="assistant",
        model=MODELS[i % len(MODELS)],
        prompt_tokens=200 + i % 1000,
        completion_tokens=50 + i % 300,
        gpu_seconds=1.5 if gpu else 0.0,
        node_class="gpu-l4" if gpu else None,
    )


def ledger_row(record: UsageRecorded, cost: int) -> dict[str, Any]:
    at = record.at.astimezone(UTC).replace(tzinfo=None)
    return {
        "usage_id": record.usage_id,
        "kind": record.kind,
        "tenant": record.tenant,
        "task_id": record.task_id,
        "agent": record.agent,
        "submitted_by": None,
        "model": record.model,
        "tool": record.tool,
        "node_class": record.node_class,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "gpu_seconds": record.gpu_seconds,
        "cost_nanousd": cost,
        "priced_by_default": False,
        "reservation_id": record.reservation_id,
        "at": at,
        "day": at.date().isoformat(),
        "recorded_at": datetime.now(UTC).replace(tzinfo=None),
    }


@dataclass(frozen=True)
class Database:
    kind: str
    url: str
    schema: str | None


@contextlib.asynccontextmanager
async def database(kind: str, folder: Path, postgres_url: str) -> AsyncIterator[Database]:
    if kind == "sqlite":
        yield Database(kind, f"sqlite+aiosqlite:///{folder / 'bench.db'}", None)
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_url)
    async with admin.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield Database(kind, postgres_url, schema)
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.dispose()


async def prepare(db: Database) -> AsyncEngine:
    engine = create_engine(db.url, schema=db.schema)
    await migrate(engine)
    async with engine.begin() as connection:
        await connection.run_sync(floor_metadata.create_all)
    return engine


async def clear(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in ("ledger", "floor_ledger", "budget_counters", "reservations", "tasks", "budget_alerts"):
            await connection.execute(text(f"DELETE FROM {table}"))


# --- 1. store batch insert -------------------------------------------------------------------------


async def bench_store(db: Database, engine: AsyncEngine, events: int, batch: int) -> tuple[float, float]:
    prices = load_price_table(PRICES_FILE)
    run = uuid.uuid4().hex[:6]
    priced = []
    for i in range(events):
        record = usage_record(i, run)
        priced.append(PricedUsage(record, price_usage(prices, record).nano, False))
    rows = [ledger_row(entry.usage, entry.cost_nano) for entry in priced]
    store = SqlAccountantStore(engine, BudgetPolicy(BudgetConfig()), reservation_ttl_seconds=600)

    started = time.perf_counter()
    for offset in range(0, events, batch):
        await store.record_usage(priced[offset : offset + batch], datetime.now(UTC))
    agentbus_rate = events / (time.perf_counter() - started)

    started = time.perf_counter()
    for offset in range(0, events, batch):
        async with engine.begin() as connection:
            await connection.execute(insert(floor_ledger), rows[offset : offset + batch])
    floor_rate = events / (time.perf_counter() - started)
    return agentbus_rate, floor_rate


# --- 2. ingestion through JetStream ----------------------------------------------------------------


async def count_rows(engine: AsyncEngine, table: Table) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(table)) or 0)


async def ingest_rate(engine: AsyncEngine, table: Table, expected: int, timeout: float = 300.0) -> float:
    """Rows written per second between the first and the last row seen in `table`."""
    deadline = time.perf_counter() + timeout
    first: tuple[float, int] | None = None
    while time.perf_counter() < deadline:
        count = await count_rows(engine, table)
        now = time.perf_counter()
        if count and first is None:
            first = (now, count)
        if count >= expected and first is not None:
            return (count - first[1]) / (now - first[0]) if now > first[0] else float("nan")
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{table.name}: {await count_rows(engine, table)} of {expected} rows after {timeout}s")


async def publish_usage(url: str, events: int, run: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = USAGE_RECORDED.format(tenant=TENANT)
    for offset in range(0, events, 1000):
        records = [usage_record(i, run) for i in range(offset, min(offset + 1000, events))]
        await asyncio.gather(
            *(
                js.publish(subject, r.model_dump_json().encode(), headers={Header.MSG_ID.value: r.usage_id})
                for r in records
            )
        )
    await nc.close()


async def floor_consumer(url: str, db_url: str, schema: str | None) -> None:
    """The floor's consumer process: nats-py fetch, json.loads, one Core insert and commit per fetch, ack."""
    engine = create_engine(db_url, schema=schema)
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe_bind(durable=FLOOR_DURABLE, stream=USAGE.name)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(FLOOR_FETCH, timeout=1.0)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        rows = []
        for msg in msgs:
            record = json.loads(msg.data)
            at = datetime.fromisoformat(record["at"]).astimezone(UTC).replace(tzinfo=None)
            rows.append(
                {
                    **{c.name: record.get(c.name) for c in floor_ledger.columns},
                    "cost_nanousd": 0,
                    "priced_by_default": False,
                    "at": at,
                    "day": at.date().isoformat(),
                    "recorded_at": at,
                }
            )
        async with engine.begin() as connection:
            await connection.execute(insert(floor_ledger), rows)
        for msg in msgs:
            await msg.ack()
    await nc.close()
    await engine.dispose()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str]) -> Any:
    proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("the accountant did not become ready")


# --- 3. reservation latency ------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def reservation_latencies(url: str, subject: str, runs: int, per_run: int, tag: str) -> list[float]:
    nc = await nats.connect(url)
    latencies: list[float] = []

    async def one_run(run: int) -> None:
        for step in range(per_run):
            request = BudgetReserveRequest(
                reservation_id=f"llm:{tag}-{run}-{step}",
                tenant=TENANT,
                task_id=f"{tag}-{run}",
                agent="assistant",
                kind="llm",
                model=MODELS[step % 2],
                estimated_prompt_tokens=2000,
                estimated_completion_tokens=500,
                submitted_by=f"user-{run % 8}",
            )
            data = request.model_dump_json().encode()
            started = time.perf_counter()
            reply = await nc.request(subject, data, timeout=30)
            latencies.append(time.perf_counter() - started)
            if b'"allowed":true' not in reply.data and b'"reservation_id"' not in reply.data:
                raise RuntimeError(f"unexpected reply: {reply.data!r}")

    await asyncio.gather(*(one_run(run) for run in range(runs)))
    await nc.close()
    return latencies


async def echo_floor(url: str, runs: int, per_run: int) -> list[float]:
    responder = await nats.connect(url)

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"schema_version":1,"reservation_id":"x","allowed":true}')

    subject = f"benchfloor.reserve.{TENANT}"
    await responder.subscribe(subject, queue="benchfloor", cb=answer)
    try:
        return await reservation_latencies(url, subject, runs, per_run, "floor")
    finally:
        await responder.close()


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    store: tuple[float, float]
    ingest: tuple[float, float]
    reserve: tuple[list[float], list[float]]


async def bench_database(kind: str, args: argparse.Namespace, folder: Path) -> Figures:
    async with database(kind, folder, args.postgres_url) as db:
        engine = await prepare(db)
        try:
            log(f"[{kind}] store batch insert: {args.events} records in batches of {args.batch}")
            store = await bench_store(db, engine, args.events, args.batch)
            await clear(engine)
            server = NatsServerProcess(
                store_dir=folder / f"nats-{kind}", port=free_port(), monitor_port=free_port(), log_file=None
            )
            server.start()
            try:
                nc = await nats.connect(server.url)
                js = nc.jetstream()
                await apply_topology(js)
                await js.add_consumer(
                    USAGE.name,
                    ConsumerConfig(
                        durable_name=FLOOR_DURABLE,
                        filter_subject=USAGE_RECORDED.wildcard,
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        max_ack_pending=4096,
                    ),
                )
                await nc.close()
                log(f"[{kind}] publishing {args.events} usage records")
                await publish_usage(server.url, args.events, uuid.uuid4().hex[:6])
                env = dict(os.environ)
                log(f"[{kind}] floor consumer")
                floor_args = [sys.executable, __file__, "floor-consumer", server.url, db.url, db.schema or ""]
                with process(floor_args, env):
                    floor_ingest = await ingest_rate(engine, floor_ledger, args.events)
                budgets = folder / f"budgets-{kind}.yaml"
                budgets.write_text(
                    yaml.safe_dump({"tenants": {TENANT: {"monthly": {"hard_usd": 10_000_000}}}}), encoding="utf-8"
                )
                port = free_port()
                env.update(
                    {
                        "AGENTBUS_ACCOUNTANT_NATS_URL": server.url,
                        "AGENTBUS_ACCOUNTANT_DATABASE_URL": db.url,
                        "AGENTBUS_ACCOUNTANT_PRICES_FILE": str(PRICES_FILE),
                        "AGENTBUS_ACCOUNTANT_BUDGETS_FILE": str(budgets),
                        "AGENTBUS_ACCOUNTANT_HTTP_PORT": str(port),
                        "AGENTBUS_ACCOUNTANT_LOG_LEVEL": "WARNING",
                    }
                )
                if db.schema:
                    env["AGENTBUS_ACCOUNTANT_DATABASE_SCHEMA"] = db.schema
                log(f"[{kind}] accountant consumer")
                with process([sys.executable, "-m", "agentbus.cost_accountant"], env):
                    ingest = await ingest_rate(engine, ledger, args.events)
                    wait_ready(port)
                    log(f"[{kind}] reservations: {args.runs} concurrent runs x {args.reservations}")
                    await reservation_latencies(server.url, BUDGET_RESERVE.format(tenant=TENANT), 4, 20, "warm")
                    reserve = await reservation_latencies(
                        server.url, BUDGET_RESERVE.format(tenant=TENANT), args.runs, args.reservations, "r"
                    )
                    floor_reserve = await echo_floor(server.url, args.runs, args.reservations)
            finally:
                server.stop()
            return Figures(store, (ingest, floor_ingest), (reserve, floor_reserve))
        finally:
            await engine.dispose()


def report(results: dict[str, Figures], args: argparse.Namespace) -> None:
    print(f"# cost-accountant bench: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# {args.events} usage records; {args.runs} concurrent runs x {args.reservations} reservations")
    print(f"{'database':<9} {'measurement':<40} {'agentbus':>12} {'floor':>12} {'ratio':>7}")
    for kind, figures in results.items():
        store, floor_store = figures.store
        ratio = store / floor_store
        print(f"{kind:<9} {'store batch insert (records/s)':<40} {store:>12.0f} {floor_store:>12.0f} {ratio:>7.2f}")
        ingest, floor_ingest = figures.ingest
        print(
            f"{kind:<9} {'ingest via JetStream (records/s)':<40} {ingest:>12.0f} {floor_ingest:>12.0f} "
            f"{ingest / floor_ingest:>7.2f}"
        )
        reserve, floor_reserve = figures.reserve
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            ours, floor = percentile(reserve, q) * 1000, percentile(floor_reserve, q) * 1000
            print(f"{kind:<9} {'reservation ' + label + ' (ms)':<40} {ours:>12.2f} {floor:>12.2f} {ours / floor:>7.1f}")
        throughput = len(reserve) / (sum(reserve) / args.runs)
        print(f"{kind:<9} {'reservations/s (all runs)':<40} {throughput:>12.0f}")
        print(f"{kind:<9} {'reservation mean (ms)':<40} {statistics.fmean(reserve) * 1000:>12.2f}")


async def run(args: argparse.Namespace) -> None:
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="bench-accountant-") as tmp:
        for kind in args.databases.split(","):
            results[kind] = await bench_database(kind, args, Path(tmp))
    report(results, args)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "floor-consumer":
        url, db_url, schema = sys.argv[2:5]
        asyncio.run(floor_consumer(url, db_url, schema or None))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--reservations", type=int, default=100)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
