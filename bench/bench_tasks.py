"""The whole suite as users run it vs. the floor: task throughput and per-step overhead, in one run.

Figures, not a test. It starts, side by side, three suites as `agentbus up` starts them (nats-server from
the wheel with identities enforced, the topology, each service its own process, engine `scripted`: a
deterministic offline engine, NOT a language model) and the floor:

Every suite's agents name the shipped guardrail policies `no-secrets`, `privacy` and `size-limits` (every
input, tool call and answer is checked), and the accountant applies the shipped `config/limits.yaml` with
limits of the benchmark tenant's own, decided on every call and never reached:

- `suite`: every service, budgets on (each LLM step reserved with the cost-accountant, its rate limits
  decided in the same reservation, every run priced);
- `no-budgets`: every service, the runner's budgets switched off;
- `runner-worker`: only the agent-runner and the inference-worker (budgets off);
- `floor`: bench/floor.py, the same hops, acks and KV writes in plain nats-py, as two processes, on the
  first suite's nats-server with its own streams.

Tasks are submitted over the public subject as a submitter (`agentbus.tasks.submit.bench.bench-app`), and
completions come from a core subscription to the tenant's events, as any client sees them. It measures the
systems interleaved, `--repeat` times, and prints medians:

- throughput: N tasks submitted as fast as possible (async publishes); tasks/s = N / (time from the first
  submit to the last `completed` event);
- latency: tasks submitted one at a time, each after the previous completed; end-to-end time from the
  submit to the `completed` event; overhead per agent step = latency / steps;
- CPU per task of each process (runner, worker, nats-server) during the one-step throughput runs.

    uv run python bench/bench_tasks.py [--tasks 1000] [--latency-tasks 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
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
import yaml
from agentbus.cli.identities import ADMIN_USER, submitter_user
from agentbus.cli.suite import Suite
from agentbus.contracts import registry
from agentbus.contracts.registry import Service
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
FLOOR_SCRIPT = BENCH_DIR / "floor.py"
TENANT = "bench"
SUBMITTER = "bench-app"
IDENTITIES_YAML = f"tenants:\n  {TENANT}:\n    submitters: [{SUBMITTER}]\n"
MSG_ID = "Nats-Msg-Id"
TERMINAL = frozenset({"rejected", "completed", "failed", "cancelled", "budget_exceeded"})
BUDGETS_RATIO_GOAL = 0.8
FLOOR_RATIO_GOAL = 0.5
P50_BUDGETS_GOAL = 1.5
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
    """One implementation of the pipeline: its server, where to submit, where events appear, its processes."""

    name: str
    url: str
    submit_subject: str
    events_subject: str
    consumers: tuple[tuple[str, str], ...]
    pids: dict[str, int]
    submitter: tuple[str | None, str | None] = (None, None)
    """(user, password) that submits and follows events."""
    operator: tuple[str | None, str | None] = (None, None)
    """(user, password) that watches the consumers drain."""


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


async def wait_drained(js: JetStreamContext, system: System, timeout: float = 30.0) -> None:
    """Wait until none of the system's consumers has a message pending or unacked (spans and usage too, so
    one system's tail of work does not run into the next one's trial)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [await js.consumer_info(stream, durable) for stream, durable in system.consumers]
        if all((info.num_pending or 0) + (info.num_ack_pending or 0) == 0 for info in infos):
            return
        await asyncio.sleep(0.1)
    say(f"warning: {system.name} consumers not drained after {timeout}s")


@dataclass
class Connected:
    """A system's driver connections: `js` submits (as the submitter), `ops` watches consumers (operator)."""

    js: JetStreamContext
    ops: JetStreamContext


async def throughput_trial(
    connected: Connected, system: System, workload: Workload, n: int, tag: str, completions: Completions
) -> tuple[float, dict[str, float]]:
    """Submit `n` tasks as fast as possible; tasks/s and CPU seconds per task of each process."""
    ids = [f"{tag}-{i:06d}" for i in range(n)]
    futures = [completions.expect(task_id) for task_id in ids]
    cpu_before = {role: cpu_seconds(pid) for role, pid in system.pids.items()}
    started = time.perf_counter()
    acks: list[asyncio.Future[PubAck]] = []
    for task_id in ids:
        payload = workload.payload(task_id)
        acks.append(await connected.js.publish_async(system.submit_subject, payload, headers={MSG_ID: task_id}))
    await asyncio.gather(*acks)
    finished = await asyncio.wait_for(asyncio.gather(*futures), timeout=max(180.0, n * workload.steps / 5))
    elapsed = max(finished) - started
    await wait_drained(connected.ops, system)
    cpu = {role: (cpu_seconds(pid) - cpu_before[role]) / n for role, pid in system.pids.items()}
    return n / elapsed, cpu


async def latency_trial(
    connected: Connected, system: System, workload: Workload, n: int, tag: str, completions: Completions
) -> list[float]:
    """Submit `n` tasks one at a time; each one's submit-to-completed time in seconds."""
    samples = []
    for i in range(n):
        task_id = f"{tag}-{i:06d}"
        future = completions.expect(task_id)
        started = time.perf_counter()
        await connected.js.publish(system.submit_subject, workload.payload(task_id), headers={MSG_ID: task_id})
        finished = await asyncio.wait_for(future, timeout=30.0)
        samples.append(finished - started)
    await wait_drained(connected.ops, system)
    return samples


async def measure(systems: list[System], args: argparse.Namespace, results: Results, run_id: str) -> None:
    completions = Completions()
    clients: list[NatsClient] = []
    connected: dict[str, Connected] = {}
    for system in systems:
        user, password = system.submitter
        nc = await nats.connect(
            system.url, name="bench-driver", user=user, password=password, inbox_prefix=_inbox(user)
        )
        await nc.subscribe(system.events_subject, cb=completions.on_event, pending_msgs_limit=1_000_000)
        user, password = system.operator
        ops = await nats.connect(system.url, name="bench-ops", user=user, password=password)
        clients += [nc, ops]
        connected[system.name] = Connected(nc.jetstream(timeout=10.0), ops.jetstream(timeout=10.0))
    try:
        for system in systems:
            say(f"warm-up: {system.name}")
            for workload in WORKLOADS:
                tag = f"{run_id}-w-{system.name}-{workload.name}"
                await throughput_trial(connected[system.name], system, workload, args.warmup, tag, completions)
                await latency_trial(connected[system.name], system, workload, 20, f"{tag}-l", completions)
        for repeat in range(args.repeat):
            # Alternate which system goes first, so slow drift of a noisy machine hits both alike.
            order = systems if repeat % 2 == 0 else list(reversed(systems))
            for system in order:
                for workload in WORKLOADS:
                    tag = f"{run_id}-r{repeat}-{system.name}-{workload.name}"
                    await asyncio.sleep(0.5)
                    on = connected[system.name]
                    rate, cpu = await throughput_trial(on, system, workload, args.tasks, f"{tag}-t", completions)
                    results.add(system.name, f"{workload.name} tasks/s", rate)
                    for role, seconds in cpu.items():
                        results.add(system.name, f"{workload.name} {role} CPU ms/task", seconds * 1000)
                    await asyncio.sleep(0.5)
                    latencies = await latency_trial(on, system, workload, args.latency_tasks, f"{tag}-l", completions)
                    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                    results.add(system.name, f"{workload.name} latency p50 ms", p50 * 1000)
                    results.add(system.name, f"{workload.name} latency p99 ms", p99 * 1000)
                    results.add(system.name, f"{workload.name} per-step p50 ms", p50 * 1000 / workload.steps)
                    results.add(system.name, f"{workload.name} per-step p99 ms", p99 * 1000 / workload.steps)
                    say(
                        f"repeat {repeat + 1}/{args.repeat} {system.name:13} {workload.name}: "
                        f"{rate:7.1f} tasks/s; latency p50 {p50 * 1000:6.2f} ms, p99 {p99 * 1000:6.2f} ms"
                    )
    finally:
        completions.forget()
        for client in clients:
            await client.close()


def _inbox(user: str | None) -> str:
    return f"_INBOX_{user}" if user else "_INBOX"


# --- processes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_processes(url: str, concurrency: int, batch: int, env: dict[str, str]) -> Iterator[dict[str, int]]:
    """Create the floor's topology, start its runner and worker, yield their pids, stop them."""
    env = {**os.environ, **env}
    subprocess.run([sys.executable, str(FLOOR_SCRIPT), "setup", "--url", url], check=True, env=env)
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        for role in ("runner", "worker"):
            command = [sys.executable, str(FLOOR_SCRIPT), role, "--url", url]
            command += ["--concurrency", str(concurrency), "--batch", str(batch)]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
            processes[role] = process
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor {role} did not start (exit status {process.poll()})")
        # Named as the suite's processes are, so their CPU lines up in the table.
        names = {"runner": "agent-runner", "worker": "inference-worker"}
        yield {names[role]: process.pid for role, process in processes.items()}
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


SYSTEMS = ("suite", "no-budgets", "runner-worker", "floor")


def print_table(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """The table of medians with ratios, the goals of the whole suite, and the same as a dict."""
    metrics = [
        ("1-step tasks/s", "tasks/s, 1-step tasks (N at once)"),
        ("3-step tasks/s", "tasks/s, 3-step tasks (N at once)"),
        ("1-step latency p50 ms", "1-step latency p50, ms"),
        ("1-step latency p99 ms", "1-step latency p99, ms"),
        ("3-step latency p50 ms", "3-step latency p50, ms"),
        ("3-step per-step p50 ms", "3-step per-step p50, ms"),
        ("1-step agent-runner CPU ms/task", "runner CPU per 1-step task, ms"),
        ("1-step cost-accountant CPU ms/task", "accountant CPU per 1-step task, ms"),
        ("1-step nats-server CPU ms/task", "nats-server CPU per 1-step task, ms"),
    ]
    width = max(len(label) for _, label in metrics)
    print()
    print(
        f"medians of {args.repeat} runs; N={args.tasks} tasks per throughput run, {args.latency_tasks} per latency run"
    )
    header = f"{'metric':{width}} | " + " | ".join(f"{name:>13}" for name in SYSTEMS)
    header += " | suite/no-bud | suite/floor"
    print(header)
    print("-" * len(header))
    table: dict[str, Any] = {}
    for key, label in metrics:
        values = {name: results.median(name, key) for name in SYSTEMS}
        budgets_ratio = values["suite"] / values["no-budgets"] if values["no-budgets"] else float("nan")
        floor_ratio = values["suite"] / values["floor"] if values["floor"] else float("nan")
        cells = " | ".join(f"{values[name]:13.2f}" for name in SYSTEMS)
        print(f"{label:{width}} | {cells} | {budgets_ratio:12.2f} | {floor_ratio:11.2f}")
        table[key] = {**values, "suite/no-budgets": budgets_ratio, "suite/floor": floor_ratio}
    one = table["1-step tasks/s"]
    p50 = table["1-step latency p50 ms"]
    print()
    goals = (
        (f"suite >= {BUDGETS_RATIO_GOAL}x no-budgets (1-step tasks/s)", one["suite/no-budgets"] >= BUDGETS_RATIO_GOAL),
        (f"suite >= {FLOOR_RATIO_GOAL}x the floor (1-step tasks/s)", one["suite/floor"] >= FLOOR_RATIO_GOAL),
        (f"1-step p50 with budgets <= {P50_BUDGETS_GOAL}x without", p50["suite/no-budgets"] <= P50_BUDGETS_GOAL),
    )
    for text, met in goals:
        print(f"goal: {text}: {'MET' if met else 'NOT MET'}")
    return table


GUARDRAILS = ("no-secrets", "privacy", "size-limits")
"""The shipped policies the benchmark's agents name: every input, tool call and answer is checked."""


def _guarded_agents(folder: Path) -> Path:
    """The sample agents, each naming `GUARDRAILS` (on top of any it names itself), beside a copy of the
    memory stores they name; returns the agents folder."""
    agents = folder / "agents"
    agents.mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "memory", folder / "memory")
    for spec in sorted((REPO_ROOT / "agents").glob("*.yaml")):
        data = yaml.safe_load(spec.read_text())
        data["guardrails"] = list(dict.fromkeys([*data.get("guardrails", []), *GUARDRAILS]))
        (agents / spec.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return agents


BENCH_TENANT_LIMITS = {"requests_per_minute": 100_000_000, "tokens_per_minute": 10**13, "concurrent_tasks": 1_000_000}
"""The benchmark tenant's own limits: checked on every call like any tenant's, never reached, so the figures
are the cost of deciding limits, not of waiting for them (the shipped defaults allow 100 calls a second)."""


def _bench_config(folder: Path) -> Path:
    """A copy of config/ whose limits.yaml gives the benchmark tenant its own limits (see above)."""
    config = folder / "config"
    shutil.copytree(REPO_ROOT / "config", config)
    limits = yaml.safe_load((config / "limits.yaml").read_text())
    limits.setdefault("tenants", {})[TENANT] = {"tenant": BENCH_TENANT_LIMITS}
    (config / "limits.yaml").write_text(yaml.safe_dump(limits, sort_keys=False))
    return config


def _suite(state_dir: Path, only: frozenset[Service] | None, environment: dict[str, str]) -> Suite:
    state_dir.mkdir(parents=True)
    (state_dir / "identities.yaml").write_text(IDENTITIES_YAML)
    specs = state_dir.with_name(f"{state_dir.name}-specs")
    return Suite(
        state_dir,
        _guarded_agents(specs),
        echo=sys.stderr,
        enforce_identities=True,
        config_dir=_bench_config(specs),
        tools_dir=REPO_ROOT / "tools",
        only=only,
        environment=environment,
    )


def _system(name: str, suite: Suite) -> System:
    assert suite.server is not None
    assert suite.server.pid is not None
    pids = {s.spec.name: s.process.pid for s in suite.services}
    running = {Service(s.spec.name) for s in suite.services}
    consumers = tuple(
        (c.stream, c.durable)
        for c in registry.consumers(suite.models)
        if c.service in running and c.durable != registry.RUNNER_DEAD_LETTERS.durable
    )
    submitter = suite.credential(submitter_user(SUBMITTER))
    operator = suite.credential(ADMIN_USER)
    assert submitter is not None
    assert operator is not None
    return System(
        name,
        suite.nats_url,
        registry.TASK_SUBMIT.format(tenant=TENANT, submitter=SUBMITTER),
        registry.TASK_EVENT.pattern.format(tenant=TENANT, task_id="*"),
        consumers,
        {**pids, "nats-server": suite.server.pid, "driver": os.getpid()},
        (submitter.user, submitter.password),
        (operator.user, operator.password),
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The whole suite vs. a raw nats-py floor: tasks/s and latency.")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per throughput run (default 1000)")
    parser.add_argument("--latency-tasks", type=int, default=300, help="tasks per latency run (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="tasks per warm-up run (default 200)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="messages in flight per consumer, every system (default 64)"
    )
    parser.add_argument("--batch", type=int, default=64, help="messages per fetch, every system (default 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write every trial's figures here")
    args = parser.parse_args(argv)
    if min(args.tasks, args.latency_tasks, args.repeat, args.warmup, args.concurrency, args.batch) < 1:
        parser.error("every count must be at least 1")

    tuning = {
        "AGENTBUS_RUNNER_CONSUMER_CONCURRENCY": str(args.concurrency),
        "AGENTBUS_RUNNER_FETCH_BATCH": str(args.batch),
        "AGENTBUS_WORKER_MAX_CONCURRENCY": str(args.concurrency),
        "AGENTBUS_WORKER_FETCH_BATCH": str(args.batch),
    }
    for service in ("RUNNER", "WORKER", "EXECUTOR", "ACCOUNTANT", "RETRIEVER", "TRACES"):
        tuning[f"AGENTBUS_{service}_LOG_LEVEL"] = "WARNING"
    # SIGTERM (a timeout, a CI job cancelled) unwinds like Ctrl-C, so the suites' services are stopped too:
    # each runs in a session of its own and would otherwise outlive the benchmark.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    run_id = f"b{int(time.time())}"
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentbus-bench-") as temporary, contextlib.ExitStack() as stack:
        root = Path(temporary)
        suites = {
            "suite": _suite(root / "suite", None, tuning),
            "no-budgets": _suite(root / "no-budgets", None, {**tuning, "AGENTBUS_RUNNER_BUDGETS_ENABLED": "false"}),
            "runner-worker": _suite(
                root / "runner-worker", frozenset({Service.AGENT_RUNNER, Service.INFERENCE_WORKER}), tuning
            ),
        }
        for suite in suites.values():
            stack.callback(suite.stop)
            suite.start(ready_timeout=120)
        systems = [_system(name, suite) for name, suite in suites.items()]
        first = systems[0]
        operator_user, operator_password = first.operator
        credentials = {"BENCHFLOOR_NATS_USER": operator_user or "", "BENCHFLOOR_NATS_PASSWORD": operator_password or ""}
        floor_pids = stack.enter_context(floor_processes(first.url, args.concurrency, args.batch, credentials))
        floor = System(
            "floor",
            first.url,
            f"{FLOOR_PREFIX}.tasks.submit.{TENANT}",
            f"{FLOOR_PREFIX}.tasks.events.{TENANT}.>",
            FLOOR_CONSUMERS,
            {**floor_pids, "nats-server": first.pids["nats-server"], "driver": os.getpid()},
            first.operator,
            first.operator,
        )
        asyncio.run(measure([*systems, floor], args, results, run_id))
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
