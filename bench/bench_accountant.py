"""The cost-accountant against in-memory group-commit floors measured in the same run, on SQLite and Postgres.

Figures, not a test. For each database (a SQLite file, a Postgres schema), on one nats-server of its own:

1. reservations: `--runs` concurrent runs, each making `--per-run` reservations one after the other over
   request/reply (one tenant, so every decision contends on the same tenant, agent and model budgets),
   against the accountant (`python -m agentbus.cost_accountant`, its own process) and against the floor: a
   minimal reference implementation in this file (`floor-reserver`, its own process, no agentbus code):
   budget counters in a dict, each reservation decided at once, every decision since the last commit
   written in one transaction (executemany with the plain driver: sqlite3 on a writer thread, or asyncpg),
   and the replies sent only after that commit. Reported: reservations/s (all requests over the wall
   time), p50 and p99 latency (nearest rank), and the server process's CPU per reservation. The two are
   measured in turn, `--repeat` times, alternating which goes first; the table shows medians.
2. exactness: `--runs` runs racing for a budget that admits exactly `--tight` reservations, on both; the
   number allowed must be exactly `--tight` and the database must hold exactly those (else the bench fails).
3. usage ingest, `--repeat` times: `--events` usage records over 16 tenants (so every budget partition gets
   some) are published, then ingested by the accountant through its partition consumers, and by the floor:
   one plain nats-py consumer process (`floor-ingest`) pulling the same records from its own durable
   consumer (fetch 256, json.loads, one executemany into a table shaped like the ledger, with the same
   primary key and indexes, and one commit per fetch, then ack). Rate = records acked between the first and
   the last ack seen (both ack only after the commit that wrote the record; the consumers' state is asked
   of the server every 20 ms), so start-up is left out; afterwards every record must be in its table,
   once. The order alternates.

    uv run python bench/bench_accountant.py [--runs 32] [--per-run 200] [--repeat 3] [--events 20000]
                                            [--databases sqlite,postgres] [--phases reservations,ingest]
                                            [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import nats
import yaml
from agentbus.contracts.budget import BudgetReserveRequest
from agentbus.contracts.registry import (
    ACCOUNTANT_USAGE,
    BUDGET_RESERVE,
    USAGE,
    USAGE_RECORDED,
    Header,
    budget_subject,
)
from agentbus.contracts.usage import UsageRecorded
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
PRICES_FILE = REPO_ROOT / "config" / "prices.yaml"
TENANT = "bench"
TIGHT_TENANT = "bench-tight"
MODEL = "gpt-4o-mini"
PROMPT_TOKENS, COMPLETION_TOKENS = 2000, 500
# gpt-4o-mini in config/prices.yaml: $0.15 / $0.60 per million tokens.
AMOUNT_NANO = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600
INGEST_TENANTS = [f"bench-{i}" for i in range(16)]
INGEST_MODELS = ("gpt-4o-mini", "hosted-llm", "scripted", "llama-3-8b-stable")
FLOOR_SUBJECT = "benchfloor.reserve"
FLOOR_DURABLE = "bench-floor-usage"
FLOOR_FETCH = 256
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the floor's database: plain drivers, no agentbus code ------------------------------------------


FLOOR_RESERVATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS floor_reservations (tenant VARCHAR(64) NOT NULL, task_id VARCHAR(64) NOT NULL, "
    "reservation_id VARCHAR(200) NOT NULL, amount BIGINT NOT NULL, allowed BOOLEAN NOT NULL, "
    "created_at TIMESTAMP NOT NULL, PRIMARY KEY (tenant, task_id, reservation_id))"
)
FLOOR_LEDGER_COLUMNS = (
    "usage_id",
    "kind",
    "tenant",
    "task_id",
    "agent",
    "submitted_by",
    "model",
    "tool",
    "node_class",
    "prompt_tokens",
    "completion_tokens",
    "gpu_seconds",
    "cost_nanousd",
    "priced_by_default",
    "reservation_id",
    "at",
    "day",
    "recorded_at",
)
# The ledger's shape: the same columns, primary key and indexes (adapters/schema.py).
FLOOR_LEDGER_DDL = (
    "CREATE TABLE IF NOT EXISTS floor_ledger (usage_id VARCHAR(200) NOT NULL, kind VARCHAR(16) NOT NULL, "
    "tenant VARCHAR(64) NOT NULL, task_id VARCHAR(64), agent VARCHAR(64), submitted_by VARCHAR(64), "
    "model VARCHAR(200), tool VARCHAR(200), node_class VARCHAR(100), prompt_tokens BIGINT NOT NULL, "
    "completion_tokens BIGINT NOT NULL, gpu_seconds FLOAT NOT NULL, cost_nanousd BIGINT NOT NULL, "
    "priced_by_default BOOLEAN NOT NULL, reservation_id VARCHAR(200), at TIMESTAMP NOT NULL, "
    "day VARCHAR(10) NOT NULL, recorded_at TIMESTAMP NOT NULL, PRIMARY KEY (tenant, usage_id))",
    "CREATE INDEX IF NOT EXISTS ix_floor_ledger_tenant_task ON floor_ledger (tenant, task_id)",
    "CREATE INDEX IF NOT EXISTS ix_floor_ledger_at ON floor_ledger (at)",
)


class FloorDb:
    """One writer: sqlite3 on a dedicated thread (WAL, synchronous=FULL), or one asyncpg connection."""

    def __init__(self, url: str, schema: str | None) -> None:
        self._url = url
        self._schema = schema
        self._sqlite: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1)
        self._pg: asyncpg.Connection | None = None

    @property
    def is_sqlite(self) -> bool:
        return self._url.startswith("sqlite")

    async def open(self, ddl: tuple[str, ...]) -> None:
        if self.is_sqlite:
            path = self._url.split("///", 1)[1]

            def connect() -> None:
                self._sqlite = sqlite3.connect(path, isolation_level=None, timeout=30)
                self._sqlite.execute("PRAGMA journal_mode=WAL")
                self._sqlite.execute("PRAGMA synchronous=FULL")
                for statement in ddl:
                    self._sqlite.execute(statement)

            await asyncio.get_running_loop().run_in_executor(self._thread, connect)
            return
        dsn = self._url.replace("postgresql+asyncpg://", "postgresql://")
        settings = {"search_path": self._schema} if self._schema else {}
        self._pg = await asyncpg.connect(dsn, server_settings=settings)
        for statement in ddl:
            await self._pg.execute(statement)

    async def insert(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Insert `rows` and commit, in one transaction."""
        if self._sqlite is not None:
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            connection = self._sqlite

            def write() -> None:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(sql, rows)
                connection.execute("COMMIT")

            await asyncio.get_running_loop().run_in_executor(self._thread, write)
            return
        assert self._pg is not None
        placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
        async with self._pg.transaction():
            await self._pg.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})", rows)

    async def close(self) -> None:
        if self._sqlite is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite.close)
        if self._pg is not None:
            await self._pg.close()
        self._thread.shutdown()


def floor_price(request: dict[str, Any]) -> int:
    return int(request["estimated_prompt_tokens"]) * 150 + int(request["estimated_completion_tokens"]) * 600


async def floor_reserver(url: str, db_url: str, schema: str | None, limits: dict[str, int]) -> None:
    """The reservation floor: counters in memory, a decision at once, replies after one group commit."""
    db = FloorDb(db_url, schema)
    await db.open((FLOOR_RESERVATIONS_DDL,))
    nc = await nats.connect(url)
    reserved: dict[str, int] = {}
    decided: dict[tuple[str, str, str], bytes] = {}
    pending: list[tuple[str, tuple[Any, ...], bytes]] = []
    wake = asyncio.Event()

    async def on_request(msg: Msg) -> None:
        request = json.loads(msg.data)
        key = (request["tenant"], request["task_id"], request["reservation_id"])
        if key in decided:
            pending.append((msg.reply, (), decided[key]))
            wake.set()
            return
        amount = floor_price(request)
        tenant = request["tenant"]
        held = reserved.get(tenant, 0)
        allowed = held + amount <= limits.get(tenant, 1 << 62)
        if allowed:
            reserved[tenant] = held + amount
        reply = json.dumps({"reservation_id": key[2], "allowed": allowed, "reserved_usd": amount / 1e9}).encode()
        decided[key] = reply
        pending.append((msg.reply, (*key, amount, allowed, datetime.now(UTC).replace(tzinfo=None)), reply))
        wake.set()

    async def committer() -> None:
        columns = ("tenant", "task_id", "reservation_id", "amount", "allowed", "created_at")
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                batch = pending[:]
                pending.clear()
                rows = [row for _, row, _ in batch if row]
                if rows:
                    await db.insert("floor_reservations", columns, rows)
                for reply, _, data in batch:
                    await nc.publish(reply, data)

    await nc.subscribe(f"{FLOOR_SUBJECT}.>", cb=on_request)
    task = asyncio.create_task(committer())
    await _until_terminated()
    task.cancel()
    await nc.close()
    await db.close()


async def floor_ingest(url: str, db_url: str, schema: str | None) -> None:
    """The ingest floor: fetch, json.loads, one insert and commit per fetch, ack."""
    db = FloorDb(db_url, schema)
    await db.open(FLOOR_LEDGER_DDL)
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
        now = datetime.now(UTC).replace(tzinfo=None)
        for msg in msgs:
            record = json.loads(msg.data)
            at = datetime.fromisoformat(record["at"]).astimezone(UTC).replace(tzinfo=None)
            values = {**record, "cost_nanousd": 0, "priced_by_default": False, "at": at, "recorded_at": now}
            values["day"] = at.date().isoformat()
            rows.append(tuple(values.get(column) for column in FLOOR_LEDGER_COLUMNS))
        await db.insert("floor_ledger", FLOOR_LEDGER_COLUMNS, rows)
        for msg in msgs:
            await msg.ack()
    await nc.close()
    await db.close()


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# --- the driver ---------------------------------------------------------------------------------------


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
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield Database(kind, postgres_url, schema)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def scalar(db: Database, sql: str) -> Any:
    if db.kind == "sqlite":
        path = db.url.split("///", 1)[1]

        def read() -> Any:
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
                return connection.execute(sql).fetchone()[0]

        return await asyncio.to_thread(read)
    connection = await asyncpg.connect(
        db.url.replace("postgresql+asyncpg://", "postgresql://"), server_settings={"search_path": db.schema or ""}
    )
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the accountant exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("the accountant did not become ready")


@dataclass
class Trial:
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    allowed: int


async def reserve_runs(
    url: str, subject_of: Callable[[str], str], tenant: str, runs: int, per_run: int, tag: str
) -> tuple[list[float], float, int]:
    """`runs` concurrent runs, each reserving `per_run` times in turn: latencies, wall seconds, allowed."""
    nc = await nats.connect(url)
    subject = subject_of(tenant)
    latencies: list[float] = []
    allowed = 0

    async def one_run(run: int) -> None:
        nonlocal allowed
        for step in range(per_run):
            request = BudgetReserveRequest(
                reservation_id=f"llm:{tag}-{run}.step-{step}",
                tenant=tenant,
                task_id=f"{tag}-{run}",
                agent="assistant",
                kind="llm",
                model=MODEL,
                estimated_prompt_tokens=PROMPT_TOKENS,
                estimated_completion_tokens=COMPLETION_TOKENS,
                submitted_by=f"user-{run % 8}",
            ).model_dump_json()
            started = time.perf_counter()
            reply = await nc.request(subject, request.encode(), timeout=30)
            latencies.append(time.perf_counter() - started)
            verdict = json.loads(reply.data)
            if verdict.get("error"):
                raise RuntimeError(f"error reply: {reply.data!r}")
            allowed += bool(verdict["allowed"])

    started = time.perf_counter()
    await asyncio.gather(*(one_run(run) for run in range(runs)))
    wall = time.perf_counter() - started
    await nc.close()
    return latencies, wall, allowed


async def trial(url: str, subject_of: Callable[[str], str], pid: int, runs: int, per_run: int, tag: str) -> Trial:
    cpu_before = cpu_seconds(pid)
    latencies, wall, allowed = await reserve_runs(url, subject_of, TENANT, runs, per_run, tag)
    cpu = cpu_seconds(pid) - cpu_before
    total = runs * per_run
    return Trial(
        rate=total / wall,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_ms=cpu * 1000 / total,
        allowed=allowed,
    )


def agentbus_subject(tenant: str) -> str:
    return budget_subject(BUDGET_RESERVE, tenant)


def floor_subject(tenant: str) -> str:
    return f"{FLOOR_SUBJECT}.{zlib.crc32(tenant.encode()) % 8}.{tenant}"


def usage_record(i: int, run: str) -> UsageRecorded:
    model = INGEST_MODELS[i % len(INGEST_MODELS)]
    gpu = model == "llama-3-8b-stable"
    tenant = INGEST_TENANTS[i % len(INGEST_TENANTS)]
    return UsageRecorded(
        usage_id=f"llm:{run}-{i}",
        kind="llm",
        tenant=tenant,
        task_id=f"task-{run}-{i % 500}",  # new tasks every repeat, as real traffic brings
        agent="assistant",
        model=model,
        prompt_tokens=200 + i % 1000,
        completion_tokens=50 + i % 300,
        gpu_seconds=1.5 if gpu else 0.0,
        node_class="gpu-l4" if gpu else None,
    )


async def publish_usage(url: str, events: int, run: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for offset in range(0, events, 1000):
        records = [usage_record(i, run) for i in range(offset, min(offset + 1000, events))]
        await asyncio.gather(
            *(
                js.publish(
                    budget_subject(USAGE_RECORDED, r.tenant),
                    r.model_dump_json().encode(),
                    headers={Header.MSG_ID.value: r.usage_id},
                )
                for r in records
            )
        )
    await nc.close()


async def ingest_rate(url: str, durables: list[str], events: int, timeout: float = 600.0) -> float:
    """Records acked per second between the first and the last ack seen on `durables` (both systems ack a
    record only after the transaction that wrote it committed). The consumers' state is asked of the server
    every 20 ms, which costs the same however large the tables have grown."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def outstanding() -> int:
        infos = await asyncio.gather(*(js.consumer_info(USAGE.name, durable) for durable in durables))
        return sum(info.num_pending + info.num_ack_pending for info in infos)

    try:
        deadline = time.perf_counter() + timeout
        total: int | None = None
        first: tuple[float, int] | None = None
        while time.perf_counter() < deadline:
            left = await outstanding()
            now = time.perf_counter()
            total = left if total is None else max(total, left)
            done = total - left
            if done and first is None:
                first = (now, done)
            if total >= events and left == 0 and first is not None:
                return (done - first[1]) / (now - first[0]) if now > first[0] else float("nan")
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{durables}: records still outstanding after {timeout}s")
    finally:
        await nc.close()


@dataclass
class Figures:
    agentbus: list[Trial] = field(default_factory=list)
    floor: list[Trial] = field(default_factory=list)
    exact: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(agentbus allowed, agentbus rows held, floor allowed, floor rows allowed) in the tight race."""
    ingest: list[float] = field(default_factory=list)
    floor_ingest: list[float] = field(default_factory=list)


def accountant_env(server_url: str, db: Database, budgets: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AGENTBUS_ACCOUNTANT_NATS_URL": server_url,
            "AGENTBUS_ACCOUNTANT_DATABASE_URL": db.url,
            "AGENTBUS_ACCOUNTANT_PRICES_FILE": str(PRICES_FILE),
            "AGENTBUS_ACCOUNTANT_BUDGETS_FILE": str(budgets),
            "AGENTBUS_ACCOUNTANT_HTTP_PORT": str(port),
            "AGENTBUS_ACCOUNTANT_LOG_LEVEL": "WARNING",
        }
    )
    if db.schema:
        env["AGENTBUS_ACCOUNTANT_DATABASE_SCHEMA"] = db.schema
    return env


async def bench_reservations(
    kind: str, args: argparse.Namespace, server: NatsServerProcess, db: Database, env: dict[str, str], figures: Figures
) -> None:
    tight_limit = args.tight * AMOUNT_NANO
    floor_args = [
        sys.executable,
        __file__,
        "floor-reserver",
        server.url,
        db.url,
        db.schema or "",
        json.dumps({TIGHT_TENANT: tight_limit}),
    ]
    with (
        process([sys.executable, "-m", "agentbus.cost_accountant"], env) as accountant,
        process(floor_args, dict(os.environ)) as floor,
    ):
        wait_ready(int(env["AGENTBUS_ACCOUNTANT_HTTP_PORT"]), accountant)
        await asyncio.sleep(1.0)  # the floor's subscription
        log(f"[{kind}] warm-up")
        await reserve_runs(server.url, agentbus_subject, TENANT, args.runs, 20, "warm")
        await reserve_runs(server.url, floor_subject, TENANT, args.runs, 20, "warm")
        for repeat in range(args.repeat):
            order = ["agentbus", "floor"] if repeat % 2 == 0 else ["floor", "agentbus"]
            for system in order:
                tag = f"{system}-{repeat}"
                if system == "agentbus":
                    result = await trial(server.url, agentbus_subject, accountant.pid, args.runs, args.per_run, tag)
                    figures.agentbus.append(result)
                else:
                    result = await trial(server.url, floor_subject, floor.pid, args.runs, args.per_run, tag)
                    figures.floor.append(result)
                log(
                    f"[{kind}] {system:<8} {result.rate:8.0f}/s  p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:6.2f} ms  cpu {result.cpu_ms:.3f} ms/reservation"
                )
        log(f"[{kind}] exactness: {args.runs} runs racing for {args.tight} reservations")
        _, _, ours = await reserve_runs(server.url, agentbus_subject, TIGHT_TENANT, args.runs, 10, "tight")
        _, _, theirs = await reserve_runs(server.url, floor_subject, TIGHT_TENANT, args.runs, 10, "tight")
        held = int(
            await scalar(db, f"SELECT count(*) FROM reservations WHERE tenant = '{TIGHT_TENANT}' AND status = 'open'")
        )
        floor_held = int(
            await scalar(db, f"SELECT count(*) FROM floor_reservations WHERE tenant = '{TIGHT_TENANT}' AND allowed")
        )
        figures.exact = (ours, held, theirs, floor_held)
        if {ours, held, theirs, floor_held} != {args.tight}:
            raise RuntimeError(f"budget decisions were not exact: {figures.exact}, expected {args.tight}")


async def bench_ingest(
    kind: str, args: argparse.Namespace, server: NatsServerProcess, db: Database, env: dict[str, str], figures: Figures
) -> None:
    nc = await nats.connect(server.url)
    await nc.jetstream().add_consumer(
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
    tables = FloorDb(db.url, db.schema)
    await tables.open(FLOOR_LEDGER_DDL)
    await tables.close()
    port = int(env["AGENTBUS_ACCOUNTANT_HTTP_PORT"])
    with process([sys.executable, "-m", "agentbus.cost_accountant"], env) as accountant:
        wait_ready(port, accountant)  # migrated: the ledger exists before anything is counted
    floor_ingest_args = [sys.executable, __file__, "floor-ingest", server.url, db.url, db.schema or ""]
    for repeat in range(args.repeat):
        log(f"[{kind}] ingest {repeat + 1}/{args.repeat}: publishing {args.events} usage records")
        await publish_usage(server.url, args.events, uuid.uuid4().hex[:6])
        order = ["floor", "agentbus"] if repeat % 2 == 0 else ["agentbus", "floor"]
        for system in order:
            if system == "floor":
                with process(floor_ingest_args, dict(os.environ)):
                    rate = await ingest_rate(server.url, [FLOOR_DURABLE], args.events)
                figures.floor_ingest.append(rate)
            else:
                with process([sys.executable, "-m", "agentbus.cost_accountant"], env):
                    rate = await ingest_rate(server.url, [spec.durable for spec in ACCOUNTANT_USAGE], args.events)
                figures.ingest.append(rate)
            written = int(await scalar(db, f"SELECT count(*) FROM {'floor_ledger' if system == 'floor' else 'ledger'}"))
            if written != args.events * (repeat + 1):
                raise RuntimeError(f"{system}: {written} rows written, {args.events * (repeat + 1)} published")
            log(f"[{kind}] {system:<8} ingest {rate:8.0f} records/s")


async def bench_database(kind: str, args: argparse.Namespace, folder: Path) -> Figures:
    figures = Figures()
    tight_limit = args.tight * AMOUNT_NANO
    async with database(kind, folder, args.postgres_url) as db:
        server = NatsServerProcess(
            store_dir=folder / f"nats-{kind}", port=free_port(), monitor_port=free_port(), log_file=None
        )
        server.start()
        try:
            nc = await nats.connect(server.url)
            await apply_topology(nc.jetstream())
            await nc.close()
            budgets = folder / f"budgets-{kind}.yaml"
            budgets.write_text(
                yaml.safe_dump(
                    {
                        "tenants": {
                            TENANT: {"monthly": {"hard_usd": 10_000_000}},
                            TIGHT_TENANT: {"monthly": {"hard_usd": tight_limit / 1e9}},
                        }
                    }
                ),
                encoding="utf-8",
            )
            env = accountant_env(server.url, db, budgets, free_port())
            if "reservations" in args.phases:
                await bench_reservations(kind, args, server, db, env, figures)
            if "ingest" in args.phases:
                await bench_ingest(kind, args, server, db, env, figures)
        finally:
            server.stop()
    return figures


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN where the floor's figure is 0 (a short run's CPU time can round to no clock tick)."""
    return ours / theirs if theirs else math.nan


def report(results: dict[str, Figures], args: argparse.Namespace) -> None:
    print(f"# cost-accountant bench: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"# {args.runs} concurrent runs x {args.per_run} reservations, medians of {args.repeat}; "
        f"{args.events} usage records"
    )
    print(f"{'database':<9} {'figure':<34} {'agentbus':>10} {'floor':>10} {'ratio':>7}")
    for kind, figures in results.items():

        def line(label: str, pick: Callable[[Trial], float], fmt: str, f: Figures = figures, k: str = kind) -> None:
            ours = statistics.median(pick(t) for t in f.agentbus)
            theirs = statistics.median(pick(t) for t in f.floor)
            print(f"{k:<9} {label:<34} {ours:>10{fmt}} {theirs:>10{fmt}} {ratio(ours, theirs):>7.2f}")

        if figures.agentbus:
            line("reservations/s", lambda t: t.rate, ".0f")
            line("reservation p50 (ms)", lambda t: t.p50_ms, ".2f")
            line("reservation p99 (ms)", lambda t: t.p99_ms, ".2f")
            line("server CPU per reservation (ms)", lambda t: t.cpu_ms, ".3f")
        if figures.ingest:
            ingest, floor_ingest = statistics.median(figures.ingest), statistics.median(figures.floor_ingest)
            label = "usage ingest (records/s)"
            print(f"{kind:<9} {label:<34} {ingest:>10.0f} {floor_ingest:>10.0f} {ratio(ingest, floor_ingest):>7.2f}")
        if figures.agentbus:
            ours, held, theirs, floor_held = figures.exact
            print(
                f"{kind:<9} exact race for {args.tight}: agentbus allowed {ours} (held {held}), "
                f"floor allowed {theirs} (held {floor_held})"
            )
        for system, trials in (("agentbus", figures.agentbus), ("floor", figures.floor)):
            if trials:
                print(
                    f"{kind:<9} trials {system:<9} reservations/s "
                    + ", ".join(f"{t.rate:.0f}" for t in trials)
                    + "; p99 ms "
                    + ", ".join(f"{t.p99_ms:.2f}" for t in trials)
                )
        for system, rates in (("agentbus", figures.ingest), ("floor", figures.floor_ingest)):
            if rates:
                print(f"{kind:<9} trials {system:<9} ingest records/s " + ", ".join(f"{r:.0f}" for r in rates))


async def run(args: argparse.Namespace) -> None:
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="bench-accountant-") as tmp:
        for kind in args.databases.split(","):
            results[kind] = await bench_database(kind, args, Path(tmp))
    report(results, args)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "floor-reserver":
        url, db_url, schema, limits = sys.argv[2:6]
        asyncio.run(floor_reserver(url, db_url, schema or None, json.loads(limits)))
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "floor-ingest":
        url, db_url, schema = sys.argv[2:5]
        asyncio.run(floor_ingest(url, db_url, schema or None))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=32, help="concurrent runs (requesters)")
    parser.add_argument("--per-run", type=int, default=200, help="reservations per run, one after the other")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tight", type=int, default=100, help="reservations the exactness race's budget admits")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--phases", default="reservations,ingest", help="which measurements to run")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
