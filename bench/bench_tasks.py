"""agentbus vs. the floor: task throughput and per-step overhead, side by side, in one run.

Figures, not a test. It starts the embedded suite (nats-server from the wheel, the topology, the
agent-runner and the inference-worker as separate processes, engine `scripted`: a deterministic offline
engine, NOT a language model), then starts the floor (bench/floor.py: the same hops, acks and KV writes
in plain nats-py, as two processes) on the same nats-server with its own streams. It then measures both,
interleaved, `--repeat` times, and prints medians:

- throughput: N tasks submitted as fast as possible (async publishes); tasks/s = N / (time from the first
  submit to the last `completed` event);
- latency: tasks submitted one at a time, each after the previous completed; end-to-end time from the
  submit to the `completed` event; overhead per agent step = latency / steps;
- CPU per task of each process (runner, worker, nats-server) during the one-step throughput runs.

Completion times come from a core subscription on each system's `...tasks.events.<tenant>.>`.

    uv run python bench/bench_tasks.py [--tasks 2000] [--latency-tasks 500] [--repeat 3]
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
from agentbus.cli.suite import Suite
from agentbus.contracts.registry import (
    LLM_REQUESTS,
    LLM_RESULTS,
    RUNNER_LLM_RESULTS,
    RUNNER_SUBMISSIONS,
    TASKS,
    inference_consumer,
)
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
FLOOR_SCRIPT = BENCH_DIR / "floor.py"
TENANT = "bench"
MSG_ID = "Nats-Msg-Id"
TERMINAL = frozenset({"rejected", "completed", "failed", "cancelled", "budget_exceeded"})
P50_RATIO_GOAL = 2.0
THROUGHPUT_GOAL = 500.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The floor's names (they must match bench/floor.py, which this file runs as a script).
FLOOR_PREFIX = "benchfloor"
FLOOR_CONSUMERS = (
    ("BENCHFLOOR_TASKS", "benchfloor-runner-submissions"),
    ("BENCHFLOOR_LLM_RESULTS", "benchfloor-runner-llm-results"),
    ("BENCHFLOOR_LLM_REQUESTS", "benchfloor-worker-scripted"),
)


@dataclass(frozen=True)
class Workload:
    """A kind of task: which agent, which input, and how many agent (LLM) steps it takes."""

    name: str
    agent: str
    input: str
    steps: int

    def payload(self, task_id: str) -> bytes:
        """A `TaskSubmitted`, as any client would publish it."""
        submission = {
            "schema_version": 1,
            "task_id": task_id,
            "tenant": TENANT,
            "agent": self.agent,
            "input": self.input,
        }
        return json.dumps(submission, separators=(",", ":")).encode()


ONE_STEP = Workload("1-step", "echo", "Say hello to the benchmark.", 1)
THREE_STEP = Workload("3-step", "assistant", "calculator(1+1) and word_count(a b c)", 3)
WORKLOADS = (ONE_STEP, THREE_STEP)


@dataclass
class System:
    """One implementation of the pipeline: where to submit, where events appear, which processes."""

    name: str
    prefix: str
    consumers: tuple[tuple[str, str], ...]
    pids: dict[str, int]

    @property
    def submit_subject(self) -> str:
        return f"{self.prefix}.tasks.submit.{TENANT}"

    @property
    def events_subject(self) -> str:
        return f"{self.prefix}.tasks.events.{TENANT}.>"


class Completions:
    """Resolves a future per task id when its terminal event arrives (fails it unless `completed`)."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[float]] = {}

    def expect(self, task_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[task_id] = future
        return future

    def forget(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    async def on_event(self, msg: Msg) -> None:
        received = time.perf_counter()
        event: dict[str, Any] = json.loads(msg.data)
        kind = event.get("kind")
        if kind not in TERMINAL:
            return
        future = self._waiting.pop(str(event.get("task_id")), None)
        if future is None or future.done():
            return
        if kind == "completed":
            future.set_result(received)
        else:
            future.set_exception(RuntimeError(f"task {event.get('task_id')} ended {kind}: {event.get('error')}"))


@dataclass
class Results:
    """Every trial's figures, by system and metric name; the table shows each list's median."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, system: str, metric: str, value: float) -> None:
        self.values.setdefault(system, {}).setdefault(metric, []).append(value)

    def median(self, system: str, metric: str) -> float:
        samples = self.values.get(system, {}).get(metric, [])
        return statistics.median(samples) if samples else float("nan")


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- measurements ------------------------------------------------------------------------------------


async def wait_drained(js: JetStreamContext, system: System, timeout: float = 10.0) -> None:
    """Wait until none of the system's consumers has a message pending or unacked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [await js.consumer_info(stream, durable) for stream, durable in system.consumers]
        if all((info.num_pending or 0) + (info.num_ack_pending or 0) == 0 for info in infos):
            return
        await asyncio.sleep(0.05)
    say(f"warning: {system.name} consumers not drained after {timeout}s")


async def throughput_trial(
    js: JetStreamContext, system: System, workload: Workload, n: int, tag: str, completions: Completions
) -> tuple[float, dict[str, float]]:
    """Submit `n` tasks as fast as possible; tasks/s and CPU seconds per task of each process."""
    ids = [f"{tag}-{i:06d}" for i in range(n)]
    futures = [completions.expect(task_id) for task_id in ids]
    cpu_before = {role: cpu_seconds(pid) for role, pid in system.pids.items()}
    started = time.perf_counter()
    acks: list[asyncio.Future[PubAck]] = []
    for task_id in ids:
        acks.append(await js.publish_async(system.submit_subject, workload.payload(task_id), headers={MSG_ID: task_id}))
    await asyncio.gather(*acks)
    finished = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(60.0, n * workload.steps / 20))
    elapsed = max(finished) - started
    await wait_drained(js, system)
    cpu = {role: (cpu_seconds(pid) - cpu_before[role]) / n for role, pid in system.pids.items()}
    return n / elapsed, cpu


async def latency_trial(
    js: JetStreamContext, system: System, workload: Workload, n: int, tag: str, completions: Completions
) -> list[float]:
    """Submit `n` tasks one at a time; each one's submit-to-completed time in seconds."""
    samples = []
    for i in range(n):
        task_id = f"{tag}-{i:06d}"
        future = completions.expect(task_id)
        started = time.perf_counter()
        await js.publish(system.submit_subject, workload.payload(task_id), headers={MSG_ID: task_id})
        finished = await asyncio.wait_for(future, timeout=30.0)
        samples.append(finished - started)
    await wait_drained(js, system)
    return samples


async def measure(url: str, systems: list[System], args: argparse.Namespace, results: Results, run_id: str) -> None:
    nc = await nats.connect(url, name="bench-driver")
    js = nc.jetstream(timeout=10.0)
    completions = Completions()
    for system in systems:
        await nc.subscribe(system.events_subject, cb=completions.on_event, pending_msgs_limit=1_000_000)
    try:
        for system in systems:
            say(f"warm-up: {system.name}")
            for workload in WORKLOADS:
                await throughput_trial(
                    js, system, workload, args.warmup, f"{run_id}-w-{system.name}-{workload.name}", completions
                )
                await latency_trial(js, system, workload, 20, f"{run_id}-wl-{system.name}-{workload.name}", completions)
        for repeat in range(args.repeat):
            # Alternate which system goes first, so slow drift of a noisy machine hits both alike.
            order = systems if repeat % 2 == 0 else list(reversed(systems))
            for system in order:
                for workload in WORKLOADS:
                    tag = f"{run_id}-r{repeat}-{system.name}-{workload.name}"
                    await asyncio.sleep(0.5)
                    rate, cpu = await throughput_trial(js, system, workload, args.tasks, f"{tag}-t", completions)
                    results.add(system.name, f"{workload.name} tasks/s", rate)
                    for role, seconds in cpu.items():
                        results.add(system.name, f"{workload.name} {role} CPU ms/task", seconds * 1000)
                    await asyncio.sleep(0.5)
                    latencies = await latency_trial(js, system, workload, args.latency_tasks, f"{tag}-l", completions)
                    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                    results.add(system.name, f"{workload.name} latency p50 ms", p50 * 1000)
                    results.add(system.name, f"{workload.name} latency p99 ms", p99 * 1000)
                    results.add(system.name, f"{workload.name} per-step p50 ms", p50 * 1000 / workload.steps)
                    results.add(system.name, f"{workload.name} per-step p99 ms", p99 * 1000 / workload.steps)
                    say(
                        f"repeat {repeat + 1}/{args.repeat} {system.name:8} {workload.name}: "
                        f"{rate:7.1f} tasks/s; latency p50 {p50 * 1000:6.2f} ms, p99 {p99 * 1000:6.2f} ms"
                    )
    finally:
        completions.forget()
        await nc.close()


# --- processes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_processes(url: str, concurrency: int, batch: int) -> Iterator[dict[str, int]]:
    """Create the floor's topology, start its runner and worker, yield their pids, stop them."""
    subprocess.run([sys.executable, str(FLOOR_SCRIPT), "setup", "--url", url], check=True)
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        for role in ("runner", "worker"):
            command = [sys.executable, str(FLOOR_SCRIPT), role, "--url", url]
            command += ["--concurrency", str(concurrency), "--batch", str(batch)]
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                text=True,
            )
            processes[role] = process
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor {role} did not start (exit status {process.poll()})")
        yield {role: process.pid for role, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def print_table(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """The table of medians (ratio = agentbus / floor), the goals, and the same as a dict."""
    metrics = [
        ("1-step tasks/s", "tasks/s, 1-step tasks (N submitted at once)"),
        ("3-step tasks/s", "tasks/s, 3-step tasks (N submitted at once)"),
        ("1-step latency p50 ms", "1-step task latency p50, ms (= per-step overhead)"),
        ("1-step latency p99 ms", "1-step task latency p99, ms (= per-step overhead)"),
        ("3-step latency p50 ms", "3-step task latency p50, ms"),
        ("3-step latency p99 ms", "3-step task latency p99, ms"),
        ("3-step per-step p50 ms", "3-step overhead per agent step p50, ms"),
        ("3-step per-step p99 ms", "3-step overhead per agent step p99, ms"),
    ]
    for workload in WORKLOADS:
        for role in ("runner", "worker", "nats-server", "driver"):
            metrics.append((f"{workload.name} {role} CPU ms/task", f"{role} CPU per {workload.name} task, ms"))
    width = max(len(label) for _, label in metrics)
    print()
    print(
        f"medians of {args.repeat} runs; N={args.tasks} tasks per throughput run, "
        f"{args.latency_tasks} tasks per latency run; ratio = agentbus / floor"
    )
    print(f"{'metric':{width}} | {'agentbus':>9} | {'floor':>9} | {'ratio':>6}")
    print(f"{'-' * width}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 6}")
    table: dict[str, Any] = {}
    for key, label in metrics:
        ours, floor = results.median("agentbus", key), results.median("floor", key)
        ratio = ours / floor if floor else float("nan")
        print(f"{label:{width}} | {ours:9.2f} | {floor:9.2f} | {ratio:6.2f}")
        table[key] = {"agentbus": ours, "floor": floor, "ratio": ratio}
    ratios = [table[k]["ratio"] for k in ("1-step latency p50 ms", "3-step per-step p50 ms")]
    rate = table["1-step tasks/s"]["agentbus"]
    latency_ok = all(r <= P50_RATIO_GOAL for r in ratios)
    rate_ok = rate >= THROUGHPUT_GOAL
    print()
    print(
        f"goal: p50 per-step overhead <= {P50_RATIO_GOAL:.0f}x the floor: "
        f"{'MET' if latency_ok else 'NOT MET'} (1-step {ratios[0]:.2f}x, 3-step {ratios[1]:.2f}x)"
    )
    print(f"goal: >= {THROUGHPUT_GOAL:.0f} one-step tasks/s: {'MET' if rate_ok else 'NOT MET'} ({rate:.0f} tasks/s)")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="agentbus vs. a raw nats-py floor: tasks/s and per-step overhead.")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per throughput run (default 2000)")
    parser.add_argument("--latency-tasks", type=int, default=500, help="tasks per latency run (default 500)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="tasks per warm-up run (default 200)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="messages in flight per consumer, both systems (default 64)"
    )
    parser.add_argument("--batch", type=int, default=64, help="messages per fetch, both systems (default 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write every trial's figures here")
    args = parser.parse_args(argv)
    if min(args.tasks, args.latency_tasks, args.repeat, args.warmup, args.concurrency, args.batch) < 1:
        parser.error("every count must be at least 1")

    os.environ.update(
        {
            "AGENTBUS_RUNNER_LOG_LEVEL": "WARNING",
            # The floor has no budget hop: measure the runner's own path (bench_accountant measures budgets).
            "AGENTBUS_RUNNER_BUDGETS_ENABLED": "false",
            "AGENTBUS_WORKER_LOG_LEVEL": "WARNING",
            "AGENTBUS_RUNNER_CONSUMER_CONCURRENCY": str(args.concurrency),
            "AGENTBUS_RUNNER_FETCH_BATCH": str(args.batch),
            "AGENTBUS_WORKER_MAX_CONCURRENCY": str(args.concurrency),
            "AGENTBUS_WORKER_FETCH_BATCH": str(args.batch),
        }
    )
    run_id = f"b{int(time.time())}"
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentbus-bench-") as state_dir:
        suite = Suite(Path(state_dir), REPO_ROOT / "agents", echo=sys.stderr)
        suite.start()
        try:
            assert suite.server is not None
            assert suite.server.pid is not None
            server_pid = suite.server.pid
            runner_pid, worker_pid = (s.process.pid for s in suite.services)
            agentbus = System(
                "agentbus",
                "agentbus",
                (
                    (TASKS.name, RUNNER_SUBMISSIONS.durable),
                    (LLM_RESULTS.name, RUNNER_LLM_RESULTS.durable),
                    (LLM_REQUESTS.name, inference_consumer("scripted").durable),
                ),
                {"runner": runner_pid, "worker": worker_pid, "nats-server": server_pid, "driver": os.getpid()},
            )
            with floor_processes(suite.nats_url, args.concurrency, args.batch) as floor_pids:
                floor = System(
                    "floor",
                    FLOOR_PREFIX,
                    FLOOR_CONSUMERS,
                    {**floor_pids, "nats-server": server_pid, "driver": os.getpid()},
                )
                asyncio.run(measure(suite.nats_url, [agentbus, floor], args, results, run_id))
        finally:
            suite.stop()
    say(f"measured in {time.monotonic() - started:.0f} s")
    print(
        f"machine: {os.cpu_count()} vCPU, Python {platform.python_version()}, {platform.platform()}; "
        "engine: scripted (deterministic offline engine, not an LLM)"
    )
    table = print_table(results, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "medians": table,
                    "trials": results.values,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
