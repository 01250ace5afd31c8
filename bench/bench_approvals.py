"""Approval decisions through the tool-executor, against a raw floor, in one run. Figures, not a test.

It starts a nats-server (from the wheel) with the registry's topology and the tool-executor as its own
process (log level WARNING) on SQLite in a temporary folder, or on a fresh Postgres database (`--postgres`),
with one bench tool behind `approval: always`. By default the tool is `bench_echo`, a python tool that
returns its argument, so the figures are the executor's own cost; `--tool render_manifest` runs the deploy
assistant's manifest renderer instead (pure-Python YAML: the tool's own CPU is then part of the figure).

Each trial puts N + M calls in the inbox (waiting for their `approval_pending` updates), then measures:

- throughput: N decisions published as fast as possible; decisions/s = N / (time from the first decision
  to the last `result` update), and the same to the last `approval_resolved` update;
- latency: M decisions one at a time; p50/p99 from publishing a decision to its `approval_resolved` update,
  and to its `result` update.

The floor is the same hop in plain nats-py and the plain database driver, in its own process on the same
server with its own stream: pull a decision, compare-and-set one row (`UPDATE ... WHERE status='pending'`)
committed with the same durability, publish one update with a Nats-Msg-Id, ack. On SQLite it is sqlite3 on a
thread (WAL, synchronous=FULL, one transaction per decision); on Postgres one asyncpg connection (one
autocommitted UPDATE per decision), in the same database as the executor. What the executor does on top is
the comparison: validating the decision, the approver, self-approval and hash checks, the audit row, the
outbox, claiming the call under a lease, running the tool, recording its outcome, four stream publishes and a
verdict per decision.

Every trial measures both, in alternating order; the table shows medians over `--repeat` trials.

    uv run python bench/bench_approvals.py [--calls 1000] [--latency 200] [--repeat 3] [--tool bench_echo]
    uv run python bench/bench_approvals.py --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # the floor's plain driver; it ships no type information
import nats
from agentbus.contracts.approvals import arguments_sha256
from agentbus.contracts.registry import APPROVAL_DECISION, TOOL_CALL, TOOL_UPDATE
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from agentbus.tool_executor.domain import approval_id_for
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

TENANT = "bench"
FLOOR_STREAM = "BENCHFLOOR_DECISIONS"
FLOOR_SUBJECT = "benchfloor.decisions"
FLOOR_UPDATES = "benchfloor.updates"
FLOOR_DURABLE = "benchfloor-decisions"
FLOOR_TABLE = "benchfloor_approvals"
FLOOR_UPDATE = f"UPDATE {FLOOR_TABLE} SET status='approved', decided_by=$1 WHERE approval_id=$2 AND status='pending'"
DEFAULT_CONCURRENCY = 256

TOOLS = {
    "bench_echo": """
name: bench_echo
description: Say the word back, after approval (bench).
kind: python
parameters: {type: object, properties: {word: {type: string}}, required: [word]}
approval:
  policy: always
  approvers: {"*": [alice]}
python: {callable: "bench_approvals:echo"}
""",
    "render_manifest": """
name: render_manifest
description: Render manifests, after approval (bench).
kind: python
parameters: {type: object, properties: {name: {type: string}, image: {type: string}}, required: [name, image]}
approval:
  policy: always
  approvers: {"*": [alice]}
python: {callable: "agentbus.tool_executor.builtins.kubernetes:render_manifest"}
""",
}


async def echo(arguments: dict[str, Any], context: Any) -> str:
    """The bench tool: as little work as a tool can do, so that what is measured is the executor."""
    return str(arguments["word"])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


# --- the floor -------------------------------------------------------------------------------------


async def floor_worker(url: str, database: str, concurrency: int) -> None:
    """Pull decisions, CAS one row, publish one update, ack, `concurrency` in flight. Runs until SIGTERM."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=FLOOR_DURABLE, stream=FLOOR_STREAM)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    lock = asyncio.Lock()
    resolve: Callable[[str, str], Awaitable[bool]]
    if database.startswith("postgresql"):
        pg = await asyncpg.connect(_dsn(database))

        async def resolve_pg(approval_id: str, by: str) -> bool:
            return str(await pg.execute(FLOOR_UPDATE, by, approval_id)) == "UPDATE 1"

        resolve = resolve_pg
    else:
        db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")

        def resolve_sqlite(approval_id: str, by: str) -> bool:
            db.execute("BEGIN IMMEDIATE")
            changed = db.execute(FLOOR_UPDATE.replace("$1", "?").replace("$2", "?"), (by, approval_id)).rowcount
            db.execute("COMMIT")
            return bool(changed == 1)

        async def resolve_in_thread(approval_id: str, by: str) -> bool:
            return await asyncio.to_thread(resolve_sqlite, approval_id, by)

        resolve = resolve_in_thread

    async def handle(msg: Msg) -> None:
        decision = json.loads(msg.data)
        async with lock:
            won = await resolve(decision["approval_id"], decision["approver"])
        if won:
            update = {"approval_id": decision["approval_id"], "outcome": "approved"}
            await js.publish(
                FLOOR_UPDATES, json.dumps(update).encode(), headers={"Nats-Msg-Id": decision["approval_id"]}
            )
        await msg.ack()

    while not stop.is_set():
        try:
            msgs = await sub.fetch(concurrency, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        await asyncio.gather(*(handle(m) for m in msgs))
    await nc.close()


async def _setup_floor_stream(js: JetStreamContext) -> None:
    await js.add_stream(
        StreamConfig(
            name=FLOOR_STREAM,
            subjects=[FLOOR_SUBJECT, FLOOR_UPDATES],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        FLOOR_STREAM,
        ConsumerConfig(
            durable_name=FLOOR_DURABLE, filter_subject=FLOOR_SUBJECT, ack_policy=AckPolicy.EXPLICIT, ack_wait=30
        ),
    )


async def _add_floor_rows(database: str, ids: list[str]) -> None:
    create = f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (approval_id TEXT PRIMARY KEY, status TEXT, decided_by TEXT)"
    if database.startswith("postgresql"):
        pg = await asyncpg.connect(_dsn(database))
        try:
            await pg.execute(create)
            await pg.executemany(f"INSERT INTO {FLOOR_TABLE} VALUES ($1, 'pending', NULL)", [(i,) for i in ids])
        finally:
            await pg.close()
        return
    db = sqlite3.connect(database)
    db.execute(create)
    db.executemany(f"INSERT INTO {FLOOR_TABLE} VALUES (?, 'pending', NULL)", [(i,) for i in ids])
    db.commit()
    db.close()


# --- measuring -------------------------------------------------------------------------------------


class Arrivals:
    """Arrival times of updates by (id, kind), from a core subscription."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], float] = {}
        self.changed = asyncio.Event()

    async def on_update(self, msg: Msg) -> None:
        body = json.loads(msg.data)
        # A ToolCallUpdate has a kind; the floor's update is a resolution.
        key = (body["call_id"], body["kind"]) if "kind" in body else (body["approval_id"], "approval_resolved")
        self.times.setdefault(key, time.perf_counter())
        self.changed.set()

    async def wait(self, keys: list[tuple[str, str]], timeout: float = 600) -> None:
        async with asyncio.timeout(timeout):
            while not all(k in self.times for k in keys):
                self.changed.clear()
                await self.changed.wait()


def _call(trial: int, n: int, tool: str) -> dict[str, Any]:
    task = f"bench-{trial}-{n}"
    arguments = {"word": f"w{n}"} if tool == "bench_echo" else {"name": f"app-{n}", "image": "nginx:1.27"}
    return {
        "call_id": f"{task}.1.0",
        "tool_call_id": "c1",
        "task_id": task,
        "tenant": TENANT,
        "agent": "bench",
        "tool": tool,
        "arguments": arguments,
        "step": 1,
        "submitted_by": "sam",
    }


def _decision(call: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "approval_id": approval_id_for(call["call_id"]),
            "decision": "approve",
            "approver": "alice",
            "arguments_sha256": arguments_sha256(call["arguments"]),
        }
    ).encode()


@contextlib.asynccontextmanager
async def _database(root: Path, postgres: str | None) -> AsyncIterator[tuple[str, str]]:
    """(the executor's URL, the floor's database) on SQLite files, or both in one fresh Postgres database."""
    if postgres is None:
        yield f"sqlite+aiosqlite:///{root / 'executor.db'}", str(root / "floor.db")
        return
    name = f"bench_approvals_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(_dsn(postgres))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = f"{postgres.rsplit('/', 1)[0]}/{name}"
        yield url, url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@dataclass
class Trials:
    """Every trial's figures, by name."""

    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])


class Bench:
    def __init__(self, js: JetStreamContext, arrivals: Arrivals, tool: str, executor: int, floor: int) -> None:
        self.js = js
        self.arrivals = arrivals
        self.tool = tool
        self.executor_pid = executor
        self.floor_pid = floor
        self.subject = APPROVAL_DECISION.format(tenant=TENANT, approver="alice")

    async def pending_calls(self, trial: int, count: int) -> list[dict[str, Any]]:
        bodies = [_call(trial, n, self.tool) for n in range(count)]
        await asyncio.gather(
            *(
                self.js.publish(
                    TOOL_CALL.format(tenant=TENANT),
                    json.dumps(body).encode(),
                    headers={"Nats-Msg-Id": f"call:{body['call_id']}"},
                )
                for body in bodies
            )
        )
        await self.arrivals.wait([(b["call_id"], "approval_pending") for b in bodies])
        return bodies

    async def agentbus_throughput(self, batch: list[dict[str, Any]], trials: Trials) -> None:
        cpu = _cpu_seconds(self.executor_pid)
        started = time.perf_counter()
        await asyncio.gather(*(self.js.publish(self.subject, _decision(call)) for call in batch))
        await self.arrivals.wait([(c["call_id"], "result") for c in batch])
        trials.add("agentbus_cpu_ms_per_decision", (_cpu_seconds(self.executor_pid) - cpu) * 1000 / len(batch))
        for kind, name in (("result", "agentbus_decisions_per_s"), ("approval_resolved", "agentbus_resolved_per_s")):
            elapsed = max(self.arrivals.times[(c["call_id"], kind)] for c in batch) - started
            trials.add(name, len(batch) / elapsed)
        _log(f"  agentbus: {len(batch)} decisions, {trials.figures['agentbus_decisions_per_s'][-1]:.0f}/s")

    async def floor_throughput(self, ids: list[str], trials: Trials) -> None:
        cpu = _cpu_seconds(self.floor_pid)
        started = time.perf_counter()
        await asyncio.gather(
            *(self.js.publish(FLOOR_SUBJECT, json.dumps({"approval_id": i, "approver": "alice"}).encode()) for i in ids)
        )
        await self.arrivals.wait([(i, "approval_resolved") for i in ids])
        elapsed = max(self.arrivals.times[(i, "approval_resolved")] for i in ids) - started
        trials.add("floor_decisions_per_s", len(ids) / elapsed)
        trials.add("floor_cpu_ms_per_decision", (_cpu_seconds(self.floor_pid) - cpu) * 1000 / len(ids))
        _log(f"  floor: {len(ids)} decisions, {trials.figures['floor_decisions_per_s'][-1]:.0f}/s")

    async def latency(
        self, calls: list[dict[str, Any]], floor_ids: list[str], agentbus_first: bool, trials: Trials
    ) -> None:
        to_resolved, to_result, floor = [], [], []
        for call, floor_id in zip(calls, floor_ids, strict=True):
            for system in ("agentbus", "floor") if agentbus_first else ("floor", "agentbus"):
                sent = time.perf_counter()
                if system == "agentbus":
                    await self.js.publish(self.subject, _decision(call))
                    await self.arrivals.wait([(call["call_id"], "result")])
                    to_resolved.append(self.arrivals.times[(call["call_id"], "approval_resolved")] - sent)
                    to_result.append(self.arrivals.times[(call["call_id"], "result")] - sent)
                else:
                    body = json.dumps({"approval_id": floor_id, "approver": "alice"}).encode()
                    await self.js.publish(FLOOR_SUBJECT, body)
                    await self.arrivals.wait([(floor_id, "approval_resolved")])
                    floor.append(self.arrivals.times[(floor_id, "approval_resolved")] - sent)
        for name, values in (
            ("agentbus_decision_to_resolved", to_resolved),
            ("agentbus_decision_to_result", to_result),
            ("floor_decision_to_update", floor),
        ):
            trials.add(f"{name}_p50_ms", statistics.median(values) * 1000)
            trials.add(f"{name}_p99_ms", _percentile(values, 0.99) * 1000)


async def run(calls: int, latency_calls: int, repeat: int, tool: str, postgres: str | None, concurrency: int) -> Trials:
    total = calls + latency_calls
    trials = Trials()
    with tempfile.TemporaryDirectory(prefix="bench-approvals-") as tmp:
        root = Path(tmp)
        (root / "nats").mkdir()
        server = NatsServerProcess(store_dir=root / "nats", port=free_port(), monitor_port=free_port())
        server.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            async with _database(root, postgres) as (database_url, floor_database), _stopped_at_end(processes):
                nc = await nats.connect(server.url)
                js = nc.jetstream()
                await apply_topology(js)
                await _setup_floor_stream(js)
                tools = root / "tools"
                tools.mkdir()
                (tools / f"{tool}.yaml").write_text(TOOLS[tool])
                (root / "approvers.yaml").write_text("groups: {}\n")
                port = free_port()
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
                    ),
                    "AGENTBUS_EXECUTOR_NATS_URL": server.url,
                    "AGENTBUS_EXECUTOR_TOOLS_DIR": str(tools),
                    "AGENTBUS_EXECUTOR_APPROVERS_FILE": str(root / "approvers.yaml"),
                    "AGENTBUS_EXECUTOR_DATABASE_URL": database_url,
                    "AGENTBUS_EXECUTOR_LOG_LEVEL": "WARNING",
                    "AGENTBUS_EXECUTOR_HTTP_PORT": str(port),
                    "AGENTBUS_EXECUTOR_CONSUMER_CONCURRENCY": str(concurrency),
                }
                processes.append(_spawn([sys.executable, "-m", "agentbus.tool_executor"], env))
                await _ready(port)
                await _add_floor_rows(floor_database, [])
                processes.append(
                    _spawn(
                        [sys.executable, __file__, "--floor-worker", server.url, floor_database, str(concurrency)],
                        dict(os.environ),
                    )
                )
                arrivals = Arrivals()
                await nc.subscribe(TOOL_UPDATE.format(tenant=TENANT), cb=arrivals.on_update)
                await nc.subscribe(FLOOR_UPDATES, cb=arrivals.on_update)
                bench = Bench(js, arrivals, tool, processes[0].pid, processes[1].pid)
                for trial in range(repeat):
                    agentbus_first = trial % 2 == 0
                    _log(f"trial {trial + 1}/{repeat} ({'agentbus' if agentbus_first else 'floor'} first)")
                    bodies = await bench.pending_calls(trial, total)
                    floor_ids = [f"floor-{trial}-{n}" for n in range(total)]
                    await _add_floor_rows(floor_database, floor_ids)
                    first, second = (
                        (
                            bench.agentbus_throughput(bodies[:calls], trials),
                            bench.floor_throughput(floor_ids[:calls], trials),
                        )
                        if agentbus_first
                        else (
                            bench.floor_throughput(floor_ids[:calls], trials),
                            bench.agentbus_throughput(bodies[:calls], trials),
                        )
                    )
                    await first
                    await second
                    await bench.latency(bodies[calls:], floor_ids[calls:], agentbus_first, trials)
                await nc.close()
        finally:
            server.stop()
    return trials


@contextlib.asynccontextmanager
async def _stopped_at_end(processes: list[subprocess.Popen[bytes]]) -> AsyncIterator[None]:
    """Stops the processes started inside, before what they use (the database, the server) goes."""
    try:
        yield
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.to_thread(process.wait, 30)


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env)


async def _ready(port: int) -> None:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async with asyncio.timeout(60):
        while not await asyncio.to_thread(ready):
            await asyncio.sleep(0.1)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--floor-worker":
        asyncio.run(floor_worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="decisions in each throughput run")
    parser.add_argument("--latency", type=int, default=200, help="decisions sent one at a time in each trial")
    parser.add_argument("--repeat", type=int, default=3, help="trials; the table shows their medians")
    parser.add_argument("--tool", choices=sorted(TOOLS), default="bench_echo", help="the tool approved calls run")
    parser.add_argument("--postgres", default=None, help="executor and floor on Postgres (admin URL)")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="messages in flight, for both systems"
    )
    args = parser.parse_args()
    trials = asyncio.run(run(args.calls, args.latency, args.repeat, args.tool, args.postgres, args.concurrency))
    store = "postgres" if args.postgres else "sqlite"
    print(f"store: {store}, tool: {args.tool}, {args.concurrency} in flight, medians of {args.repeat}")
    print(f"{'figure':<40} {'median':>10}   trials")
    for name, values in trials.figures.items():
        print(f"{name:<40} {statistics.median(values):>10.2f}   {', '.join(f'{v:.2f}' for v in values)}")
    for label, agentbus, floor in (
        ("decisions/s to result / floor", "agentbus_decisions_per_s", "floor_decisions_per_s"),
        ("decisions/s to resolved / floor", "agentbus_resolved_per_s", "floor_decisions_per_s"),
        ("p50 decision->resolved / floor", "agentbus_decision_to_resolved_p50_ms", "floor_decision_to_update_p50_ms"),
        ("p99 decision->resolved / floor", "agentbus_decision_to_resolved_p99_ms", "floor_decision_to_update_p99_ms"),
    ):
        ratios = [a / f for a, f in zip(trials.figures[agentbus], trials.figures[floor], strict=True)]
        print(f"{label:<40} {statistics.median(ratios):>10.2f}   {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
