"""Approval decisions through the tool-executor, against a raw floor, in one run. Figures, not a test.

It starts a nats-server (from the wheel) with the registry's topology and the tool-executor as its own
process (SQLite in a temporary folder, log level WARNING) with one bench tool, `bench_render` (the pure
render_manifest built-in behind `approval: always`). It publishes N tool calls, waits for their
`approval_pending` updates, then measures:

- throughput: N decisions published as fast as possible; decisions/s = N / (time from the first decision
  to the last `result` update);
- latency: M decisions one at a time; p50/p99 from publishing a decision to its `approval_resolved` update,
  and to its `result` update.

The floor is the same hop in plain nats-py and sqlite3, in its own process on the same server with its own
stream: pull a decision, compare-and-set one row (`UPDATE ... WHERE status='pending'`, committed with the
same durability: WAL, synchronous=FULL), publish one update with a Nats-Msg-Id, ack. What the executor does
on top is the comparison: validating the decision, the approver and hash checks, the audit row, the outbox,
claiming the call under a lease, running the tool, recording its outcome, and four publishes per decision.

    uv run python bench/bench_approvals.py [--calls 1000] [--latency 200] [--postgres postgresql+asyncpg://...]

With `--postgres URL` the executor's store is a fresh database on that server (created and dropped by the
bench) instead of SQLite; the floor stays on SQLite.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
from agentbus.contracts.approvals import arguments_sha256
from agentbus.contracts.registry import APPROVAL_DECISION, TOOL_CALL, TOOL_UPDATE
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.server import NatsServerProcess, free_port
from agentbus.tool_executor.domain import approval_id_for
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from sqlalchemy.ext.asyncio import create_async_engine

TENANT = "bench"
FLOOR_STREAM = "BENCHFLOOR_DECISIONS"
FLOOR_SUBJECT = "benchfloor.decisions"
FLOOR_UPDATES = "benchfloor.updates"
FLOOR_DURABLE = "benchfloor-decisions"

BENCH_TOOL = """
name: bench_render
description: Render manifests, after approval (bench).
kind: python
parameters: {type: object, properties: {name: {type: string}, image: {type: string}}, required: [name, image]}
approval:
  policy: always
  approvers: {"*": [alice]}
python: {callable: "agentbus.tool_executor.builtins.kubernetes:render_manifest"}
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the floor -------------------------------------------------------------------------------------


async def floor_worker(url: str, database: str) -> None:
    """Pull decisions, CAS one SQLite row, publish one update, ack. Runs until SIGTERM."""
    db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=FLOOR_DURABLE, stream=FLOOR_STREAM)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    lock = asyncio.Lock()

    def resolve(approval_id: str, by: str) -> bool:
        db.execute("BEGIN IMMEDIATE")
        changed = db.execute(
            "UPDATE approvals SET status='approved', decided_by=? WHERE approval_id=? AND status='pending'",
            (by, approval_id),
        ).rowcount
        db.execute("COMMIT")
        return changed == 1

    async def handle(msg: Msg) -> None:
        decision = json.loads(msg.data)
        async with lock:
            won = await asyncio.to_thread(resolve, decision["approval_id"], decision["approver"])
        if won:
            update = {"approval_id": decision["approval_id"], "outcome": "approved"}
            await js.publish(
                FLOOR_UPDATES, json.dumps(update).encode(), headers={"Nats-Msg-Id": decision["approval_id"]}
            )
        await msg.ack()

    while not stop.is_set():
        try:
            msgs = await sub.fetch(64, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        await asyncio.gather(*(handle(m) for m in msgs))
    await nc.close()


async def _setup_floor(js: Any, database: Path, ids: list[str]) -> None:
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
    db = sqlite3.connect(database)
    db.execute("CREATE TABLE approvals (approval_id TEXT PRIMARY KEY, status TEXT, decided_by TEXT)")
    db.executemany("INSERT INTO approvals VALUES (?, 'pending', NULL)", [(i,) for i in ids])
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

    async def wait(self, keys: list[tuple[str, str]], timeout: float = 300) -> None:
        async with asyncio.timeout(timeout):
            while not all(k in self.times for k in keys):
                self.changed.clear()
                await self.changed.wait()


def _call(n: int) -> dict[str, Any]:
    task = f"bench-{n}"
    return {
        "call_id": f"{task}.1.0",
        "tool_call_id": "c1",
        "task_id": task,
        "tenant": TENANT,
        "agent": "bench",
        "tool": "bench_render",
        "arguments": {"name": f"app-{n}", "image": "nginx:1.27"},
        "step": 1,
        "submitted_by": "sam",
    }


@contextlib.asynccontextmanager
async def _database(root: Path, postgres: str | None) -> AsyncIterator[str]:
    if postgres is None:
        yield f"sqlite+aiosqlite:///{root / 'executor.db'}"
        return
    name = f"bench_approvals_{os.getpid()}"
    admin = create_async_engine(postgres, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres.rsplit('/', 1)[0]}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


async def run(calls: int, latency_calls: int, postgres: str | None) -> dict[str, float]:
    total = calls + latency_calls
    with tempfile.TemporaryDirectory(prefix="bench-approvals-") as tmp:
        root = Path(tmp)
        server = NatsServerProcess(store_dir=root / "nats", port=free_port(), monitor_port=free_port())
        (root / "nats").mkdir()
        server.start()
        processes: list[subprocess.Popen[bytes]] = []
        database = _database(root, postgres)
        try:
            database_url = await database.__aenter__()
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await apply_topology(js)
            tools = root / "tools"
            tools.mkdir()
            (tools / "bench_render.yaml").write_text(BENCH_TOOL)
            (root / "approvers.yaml").write_text("groups: {}\n")
            port = free_port()
            env = {
                **os.environ,
                "AGENTBUS_EXECUTOR_NATS_URL": server.url,
                "AGENTBUS_EXECUTOR_TOOLS_DIR": str(tools),
                "AGENTBUS_EXECUTOR_APPROVERS_FILE": str(root / "approvers.yaml"),
                "AGENTBUS_EXECUTOR_DATABASE_URL": database_url,
                "AGENTBUS_EXECUTOR_LOG_LEVEL": "WARNING",
                "AGENTBUS_EXECUTOR_HTTP_PORT": str(port),
            }
            processes.append(_spawn([sys.executable, "-m", "agentbus.tool_executor"], env))
            await _ready(port)

            arrivals = Arrivals()
            await nc.subscribe(TOOL_UPDATE.format(tenant=TENANT), cb=arrivals.on_update)
            await nc.subscribe(FLOOR_UPDATES, cb=arrivals.on_update)
            bodies = [_call(n) for n in range(total)]
            for body in bodies:
                await js.publish(
                    TOOL_CALL.format(tenant=TENANT),
                    json.dumps(body).encode(),
                    headers={"Nats-Msg-Id": f"call:{body['call_id']}"},
                )
            await arrivals.wait([(b["call_id"], "approval_pending") for b in bodies])
            # The approval id derives from the call id; a client reads it from ApprovalRequested.
            approvals = {b["call_id"]: approval_id_for(b["call_id"]) for b in bodies}
            _log(f"{total} approvals pending")

            floor_ids = [f"floor-{n}" for n in range(total)]
            await _setup_floor(js, root / "floor.db", floor_ids)
            processes.append(_spawn([sys.executable, __file__, "--floor-worker", server.url, str(root / "floor.db")]))

            figures: dict[str, float] = {}
            subject = APPROVAL_DECISION.format(tenant=TENANT, approver="alice")

            def decision(call: dict[str, Any]) -> bytes:
                return json.dumps(
                    {
                        "approval_id": approvals[call["call_id"]],
                        "decision": "approve",
                        "approver": "alice",
                        "arguments_sha256": arguments_sha256(call["arguments"]),
                    }
                ).encode()

            # Throughput: all decisions at once.
            batch = bodies[:calls]
            started = time.perf_counter()
            acks = [js.publish(subject, decision(call)) for call in batch]
            await asyncio.gather(*acks)
            await arrivals.wait([(c["call_id"], "result") for c in batch])
            elapsed = max(arrivals.times[(c["call_id"], "result")] for c in batch) - started
            figures["agentbus_decisions_per_s"] = calls / elapsed
            _log(f"agentbus: {calls} decisions in {elapsed:.2f} s")

            floor_batch = floor_ids[:calls]
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    js.publish(FLOOR_SUBJECT, json.dumps({"approval_id": i, "approver": "alice"}).encode())
                    for i in floor_batch
                )
            )
            await arrivals.wait([(i, "approval_resolved") for i in floor_batch])
            elapsed = max(arrivals.times[(i, "approval_resolved")] for i in floor_batch) - started
            figures["floor_decisions_per_s"] = calls / elapsed
            _log(f"floor: {calls} decisions in {elapsed:.2f} s")

            # Latency: one decision at a time.
            to_resolved, to_result, floor_latency = [], [], []
            for call, floor_id in zip(bodies[calls:], floor_ids[calls:], strict=True):
                sent = time.perf_counter()
                await js.publish(subject, decision(call))
                await arrivals.wait([(call["call_id"], "result")])
                to_resolved.append(arrivals.times[(call["call_id"], "approval_resolved")] - sent)
                to_result.append(arrivals.times[(call["call_id"], "result")] - sent)
                sent = time.perf_counter()
                await js.publish(FLOOR_SUBJECT, json.dumps({"approval_id": floor_id, "approver": "alice"}).encode())
                await arrivals.wait([(floor_id, "approval_resolved")])
                floor_latency.append(arrivals.times[(floor_id, "approval_resolved")] - sent)
            for name, values in (
                ("agentbus_decision_to_resolved", to_resolved),
                ("agentbus_decision_to_result", to_result),
                ("floor_decision_to_update", floor_latency),
            ):
                figures[f"{name}_p50_ms"] = statistics.median(values) * 1000
                figures[f"{name}_p99_ms"] = _percentile(values, 0.99) * 1000
            await nc.close()
            return figures
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=30)
            await database.__aexit__(None, None, None)
            server.stop()


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env if env is not None else dict(os.environ))


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
    if len(sys.argv) == 4 and sys.argv[1] == "--floor-worker":
        asyncio.run(floor_worker(sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="decisions in the throughput run")
    parser.add_argument("--latency", type=int, default=200, help="decisions sent one at a time")
    parser.add_argument("--postgres", default=None, help="store the executor's state in Postgres (admin URL)")
    args = parser.parse_args()
    figures = asyncio.run(run(args.calls, args.latency, args.postgres))
    print(f"store: {'postgres' if args.postgres else 'sqlite'}")
    print(f"{'figure':<40} {'value':>10}")
    for name, value in figures.items():
        print(f"{name:<40} {value:>10.2f}")
    ratio = figures["agentbus_decisions_per_s"] / figures["floor_decisions_per_s"]
    print(f"{'agentbus / floor throughput':<40} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
