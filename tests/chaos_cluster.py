"""The chaos suite on the production shape: a 3-node NATS cluster and two replicas of every service.

Three nats-server nodes (routes on loopback, `sync_interval: always`) carry every stream and bucket with
three replicas. Two replicas of each service compete on the same work queues, each connected to every
node: agent-runner, inference-worker (the offline `scripted` engine), tool-executor, cost-accountant,
trace-exporter and workflow-orchestrator. The executors, the accountants and the trace exporters share
their state as in production: each service has a fresh PostgreSQL database for the run (dropped after it);
each trace exporter appends to its own JSONL file, and the invariants read them together.

The driver of `tests/chaos.py` submits the same planned mix of tasks (approvals, denials, cancellations,
resubmissions, malformed submissions) while the faults come:

- the node leading `AGENTBUS_TASKS` is SIGKILLed, and started again on its store a few seconds later;
- a node that does not lead it is SIGKILLed and started again;
- one node is SIGSTOPped (partitioned away: it neither answers nor closes its connections) for ~12 s;
- random service replicas are SIGKILLed (started again a second later, as a supervisor would) or
  SIGSTOPped for a few seconds.

Before each node fault the cluster is whole again (every node up, the task stream's replicas current).
The driver's own connections stay off the node it pauses (nats-py, leaving a node that stopped reading,
can wait minutes for its unsent bytes); the services connect to every node and fail over by themselves.
Identities are not enforced on this cluster: `make chaos` tests them on `agentbus up`.

When every task has ended, the invariants of `tests/chaos.py` must all be 0. For each node fault the run
prints the failover figures: the seconds until the task stream reports a leader other than the faulted
node (when it led), until the next task ended, and tasks ended per second in the windows before the fault,
while the node was away, and after it came back.

    uv run python tests/chaos_cluster.py                      # one run of 100 tasks
    uv run python tests/chaos_cluster.py --runs 3 --tasks 100 # what `make chaos-cluster` runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from agentbus.cli.suite import SuitePaths, implemented_services
from agentbus.contracts.registry import DEFAULT_MODELS, TASK_EVENT, TASKS, Service
from agentbus.contracts.tasks import TERMINAL_EVENT_KINDS
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import configure_logging
from agentbus.runtime.server import free_port
from agentbus.testing import NatsCluster, running_nats_cluster
from chaos import (
    APPROVERS,
    INVARIANTS,
    LEDGER_SQL,
    OPEN_RESERVATIONS_SQL,
    REPO_ROOT,
    SUITE_ENVIRONMENT,
    TENANT,
    TICKETS_SQL,
    Driver,
    PlannedTask,
    Stores,
    Verdict,
    _quiesce,
    _settle,
    check,
    dead_letters,
    exported_span_ids,
    plan,
)
from nats.aio.client import Client as NatsClient
from nats.js.api import ClusterInfo, DeliverPolicy
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

REPLICAS = 2
CLUSTER_SERVICES = frozenset(
    {
        Service.AGENT_RUNNER,
        Service.INFERENCE_WORKER,
        Service.TOOL_EXECUTOR,
        Service.COST_ACCOUNTANT,
        Service.TRACE_EXPORTER,
        Service.WORKFLOW_ORCHESTRATOR,
    }
)
DATABASES = {Service.TOOL_EXECUTOR: "executor", Service.COST_ACCOUNTANT: "accountant", Service.TRACE_EXPORTER: "traces"}
"""The services whose replicas share a PostgreSQL database, and the suffix of its name."""
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
WINDOW_SECONDS = 8.0
"""The throughput windows before a node fault and after the node is back."""
RESTART_DELAY_SECONDS = 1.0


def log_line(line: str) -> None:
    """A line on stderr, stamped with the wall clock of the services' logs and the nodes' logs."""
    print(f"{datetime.now(UTC).strftime('%H:%M:%S.%f')[:-3]} {line}", file=sys.stderr, flush=True)


# --- PostgreSQL: a fresh database per shared store, per run ------------------------------------


@contextlib.asynccontextmanager
async def fresh_databases(server_url: str, run: str) -> AsyncIterator[dict[Service, str]]:
    """A new database on the server of `server_url` for each service of DATABASES, named after the run;
    yields their SQLAlchemy URLs and drops them afterwards (and before, should a crashed run have left one)."""
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    names = {service: f"agentbus_chaos_{run}_{suffix}" for service, suffix in DATABASES.items()}
    base = make_url(server_url)

    async def drop() -> None:
        async with engine.connect() as connection:
            for name in names.values():
                await connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    try:
        try:
            await drop()
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            safe = base.render_as_string(hide_password=True)
            raise SystemExit(f"chaos-cluster: no PostgreSQL to create databases in at {safe}: {exc}") from None
        async with engine.connect() as connection:
            for name in names.values():
                await connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield {
            service: base.set(database=name).render_as_string(hide_password=False) for service, name in names.items()
        }
    finally:
        with contextlib.suppress(Exception):
            await drop()
        await engine.dispose()


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in (await connection.execute(sa.text(sql))).all()]
    finally:
        await engine.dispose()


async def postgres_stores(urls: dict[Service, str], traces: list[Path]) -> Stores:
    executor, accountant = urls[Service.TOOL_EXECUTOR], urls[Service.COST_ACCOUNTANT]
    return Stores(
        tickets=[(str(task_id), str(title)) for task_id, title in await _rows(executor, TICKETS_SQL)],
        ledger={str(task_id): int(total or 0) for task_id, total in await _rows(accountant, LEDGER_SQL)},
        open_reservations=[str(reservation_id) for (reservation_id,) in await _rows(accountant, OPEN_RESERVATIONS_SQL)],
        exported_spans=exported_span_ids(traces),
    )


# --- the service replicas, supervised ----------------------------------------------------------


@dataclass
class Replica:
    """One service process; started again by `Replicas.supervise` whenever it dies."""

    name: str
    module: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    died_at: float | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=REPO_ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.died_at = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: signal.Signals) -> bool:
        if self.process is None or not self.alive:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signum)
            return True
        return False


@dataclass
class Replicas:
    replicas: list[Replica]
    stopping: bool = False

    async def supervise(self) -> None:
        """Start a dead replica again a second after it died, until `stop`."""
        while not self.stopping:
            now = time.monotonic()
            for replica in self.replicas:
                if replica.alive:
                    continue
                if replica.died_at is None:
                    replica.died_at = now
                elif now - replica.died_at >= RESTART_DELAY_SECONDS:
                    replica.restarts += 1
                    replica.start()
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        """SIGCONT whatever is paused, SIGTERM every replica (they drain), wait, and kill stragglers."""
        self.stopping = True
        for replica in self.replicas:
            replica.signal(signal.SIGCONT)
            replica.signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        for replica in self.replicas:
            if replica.process is None:
                continue
            try:
                replica.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()


def replica_specs(state_dir: Path, nats_url: str, databases: dict[Service, str]) -> list[Replica]:
    """REPLICAS of every service of CLUSTER_SERVICES, configured as `agentbus up` configures its one, except:
    every node's URL, the shared databases, a JSONL file per trace exporter."""
    paths = SuitePaths.resolve(
        state_dir, REPO_ROOT / "agents", REPO_ROOT / "config", REPO_ROOT / "tools", REPO_ROOT / "workflows"
    )
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    replicas = []
    for spec in implemented_services(paths, DEFAULT_MODELS, CLUSTER_SERVICES):
        service = Service(spec.name)
        for index in range(1, REPLICAS + 1):
            settings = {**spec.extra_env, "NATS_URL": nats_url, "HTTP_PORT": str(free_port())}
            if service in databases:
                settings["DATABASE_URL"] = databases[service]
            if service == Service.TRACE_EXPORTER:
                settings["JSONL_PATH"] = str(state_dir / f"traces-{index}.jsonl")
            env = {**SUITE_ENVIRONMENT, **{f"{spec.env_prefix}{key}": value for key, value in settings.items()}}
            name = f"{service.value}-{index}"
            replicas.append(Replica(name, spec.module, env, logs / f"{name}.log"))
    return replicas


# --- node faults and what they cost ------------------------------------------------------------


@dataclass
class NodeFault:
    action: str
    """kill-leader | kill-follower | pause"""
    victim: str
    led: bool
    """Whether the victim led the task stream when the fault came."""
    at: float
    """Wall-clock time of the fault (the task events' clock)."""
    back: float = 0.0
    """Wall-clock time the node was running (or resumed) again."""
    leader_after: str | None = None
    elected_seconds: float | None = None
    """Fault -> the task stream reports a leader other than the victim (when the victim led)."""
    first_end_seconds: float | None = None
    rates: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Tasks ended per second: the WINDOW_SECONDS before, while the node was away, the WINDOW_SECONDS after."""

    def line(self) -> str:
        if self.led:
            election = (
                f"new leader {self.leader_after} after {self.elected_seconds:.2f}s"
                if self.elected_seconds is not None
                else "no new leader seen"
            )
        else:
            election = f"leader stayed {self.leader_after}" if self.leader_after else "leader not seen"
        first = f"{self.first_end_seconds:.2f}s" if self.first_end_seconds is not None else "-"
        before, during, after = self.rates
        return (
            f"{self.action} {self.victim} (away {self.back - self.at:.1f}s): {election}; next task ended {first} "
            f"after the fault; tasks ended/s before {before:.2f}, away {during:.2f}, after {after:.2f}"
        )


async def stream_cluster(probe: NatsClient) -> ClusterInfo | None:
    """The task stream's cluster as its leader reports it, or None while no leader answers."""
    try:
        info = await probe.jetstream(timeout=1.0).stream_info(TASKS.name)
    except Exception:
        return None
    if info.cluster is None or not info.cluster.leader:
        return None
    return info.cluster


async def stream_leader(probe: NatsClient) -> str | None:
    cluster = await stream_cluster(probe)
    return cluster.leader if cluster is not None else None


async def whole(cluster: NatsCluster, probe: NatsClient, timeout: float = 90.0) -> None:
    """Wait until every node runs and every replica of the task stream is current."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await probe.jetstream(timeout=1.0).stream_info(TASKS.name)
            peers = info.cluster.replicas if info.cluster is not None else None
            if (
                all(node.running for node in cluster.nodes.values())
                and info.cluster is not None
                and info.cluster.leader
                and peers is not None
                and len(peers) == len(cluster.nodes) - 1
                and all(peer.current for peer in peers)
            ):
                return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"the cluster was not whole again within {timeout}s")


async def node_fault(
    cluster: NatsCluster, probes: dict[str, NatsClient], action: str, victim: str, away: float
) -> NodeFault:
    """Apply one node fault, bring the node back after `away` seconds, and time the task stream's leader."""
    probe = next(nc for name, nc in probes.items() if name != victim)
    leader = await stream_leader(probe)
    fault = NodeFault(action, victim, leader == victim, time.time())
    started = time.monotonic()
    if action == "pause":
        cluster.pause(victim)
    else:
        cluster.kill(victim)

    async def watch() -> None:
        while time.monotonic() - started < 120:
            seen = await stream_cluster(probe)
            if seen is not None and seen.leader != victim:
                fault.leader_after = seen.leader
                if fault.led:
                    # The new leader says since when it leads (the same clock as the fault's); a probe's
                    # answer comes later, by its own request timeouts.
                    since = seen.leader_since.timestamp() if seen.leader_since is not None else None
                    fault.elected_seconds = since - fault.at if since else time.monotonic() - started
                return
            await asyncio.sleep(0.05)

    watching = asyncio.create_task(watch())
    await asyncio.sleep(away)
    if action == "pause":
        cluster.resume(victim)
    else:
        node = cluster.node(victim)
        await asyncio.to_thread(node.start, 60.0)
    fault.back = time.time()
    await watching
    return fault


def measure(fault: NodeFault, ended_at: list[float]) -> None:
    """The next task's end after the fault, and tasks ended per second around it, from the terminal events."""
    after_fault = [at - fault.at for at in ended_at if at > fault.at]
    fault.first_end_seconds = min(after_fault) if after_fault else None

    def rate(start: float, end: float) -> float:
        return sum(1 for at in ended_at if start <= at < end) / max(end - start, 1e-9)

    fault.rates = (
        rate(fault.at - WINDOW_SECONDS, fault.at),
        rate(fault.at, fault.back),
        rate(fault.back, fault.back + WINDOW_SECONDS),
    )


async def terminal_times(admin: NatsClient, tasks: dict[str, PlannedTask]) -> list[float]:
    """When the task stream stored each task's first terminal event (the server's clock, not the event's
    `at`: a runner stamps an event before its publish succeeds, which may be after a failover)."""
    js = admin.jetstream()
    sub = await js.subscribe(
        TASK_EVENT.pattern.format(tenant=TENANT, task_id="*"), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    ended: dict[str, float] = {}
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=3)
            except Exception:
                break
            event = json.loads(msg.data)
            task_id = event.get("task_id")
            if task_id in tasks and task_id not in ended and event.get("kind") in TERMINAL_EVENT_KINDS:
                ended[task_id] = msg.metadata.timestamp.timestamp()
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return sorted(ended.values())


# --- service faults ----------------------------------------------------------------------------


async def replica_faults(
    replicas: list[Replica], count: int, duration: float, rng: random.Random, log: Callable[[str], None]
) -> int:
    """`count` faults on random replicas over `duration`: SIGKILL (the supervisor starts it again) or a
    SIGSTOP of one to five seconds."""
    started = time.monotonic()
    done = 0
    resumes: list[asyncio.Task[None]] = []
    for at in sorted(rng.uniform(2.0, duration) for _ in range(count)):
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        alive = [replica for replica in replicas if replica.alive]
        if not alive:
            continue
        replica = rng.choice(alive)
        if rng.random() < 0.55:
            if replica.signal(signal.SIGKILL):
                done += 1
                log(f"fault: kill {replica.name}")
        else:
            seconds = rng.uniform(1.0, 5.0)
            if replica.signal(signal.SIGSTOP):
                done += 1
                log(f"fault: pause {replica.name} for {seconds:.1f}s")
                resumes.append(asyncio.create_task(_resume(replica, seconds)))
    await asyncio.gather(*resumes)
    return done


async def _resume(replica: Replica, seconds: float) -> None:
    await asyncio.sleep(seconds)
    replica.signal(signal.SIGCONT)


# --- one run -----------------------------------------------------------------------------------


@dataclass
class ClusterRunResult:
    tasks: int
    faults: int
    verdict: Verdict
    seconds: float
    node_faults: list[NodeFault] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not any(self.verdict.counts[name] for name in INVARIANTS)

    def line(self) -> str:
        figures = " ".join(f"{name}={self.verdict.counts[name]}" for name in INVARIANTS)
        return f"chaos-cluster: {self.tasks} tasks, {self.faults} faults, {figures}"


async def run_once(
    tasks_count: int,
    faults_count: int,
    seed: int,
    *,
    postgres_url: str = DEFAULT_POSTGRES_URL,
    node_away_seconds: float = 5.0,
    pause_seconds: float = 12.0,
    settle_timeout: float = 420.0,
    keep: Path | None = None,
    log: Callable[[str], None] = log_line,
) -> ClusterRunResult:
    rng = random.Random(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentbus-chaos-cluster-") as temporary:
        state_dir = (keep or Path(temporary)) / f"cluster-run-{seed}"
        async with fresh_databases(postgres_url, str(seed)) as databases:
            with running_nats_cluster(state_dir / "cluster") as cluster:
                result = await _run(
                    cluster,
                    databases,
                    state_dir,
                    tasks_count,
                    faults_count,
                    seed,
                    rng,
                    node_away_seconds,
                    pause_seconds,
                    settle_timeout,
                    log,
                )
    result.seconds = time.monotonic() - started
    return result


async def _run(
    cluster: NatsCluster,
    databases: dict[Service, str],
    state_dir: Path,
    tasks_count: int,
    faults_count: int,
    seed: int,
    rng: random.Random,
    node_away_seconds: float,
    pause_seconds: float,
    settle_timeout: float,
    log: Callable[[str], None],
) -> ClusterRunResult:
    await cluster.wait_for_meta_leader()
    setup = await connect_nats(cluster.url, "chaos-setup")
    try:
        await apply_topology(setup.jetstream(), replicas=len(cluster.nodes))
        leader = None
        while leader is None:
            leader = await stream_leader(setup)
    finally:
        await setup.close()
    # The node to partition away: one that does not lead the task stream now. The driver stays off it.
    paused = rng.choice([name for name in cluster.nodes if name != leader])
    reachable = ",".join(node.url for name, node in cluster.nodes.items() if name != paused)
    probes = {
        name: await connect_nats(node.url, f"chaos-probe-{name}")
        for name, node in cluster.nodes.items()
        if name != paused
    }
    admin = await connect_nats(reachable, "chaos-admin")
    submitter = await connect_nats(reachable, "chaos-submitter")
    approvers = {name: await connect_nats(reachable, f"chaos-{name}") for name in APPROVERS}
    replicas = Replicas(replica_specs(state_dir, cluster.url, databases))
    for replica in replicas.replicas:
        replica.start()
    supervising = asyncio.create_task(replicas.supervise())
    planned = plan(tasks_count, rng, str(seed))
    tasks: dict[str, PlannedTask] = {task.task_id: task for task in planned}
    driver = Driver(submitter, approvers, tasks, rng)
    duration = max(80.0, tasks_count * 0.8)
    node_faults: list[NodeFault] = []
    injected = 0
    try:
        await _wait_ready(replicas, timeout=180)
        log(
            f"run {seed}: {tasks_count} tasks over ~{duration:.0f}s, {len(replicas.replicas)} replicas on "
            f"{len(cluster.nodes)} nodes, {faults_count} replica faults and 3 node faults ({state_dir})"
        )
        begun = time.monotonic()

        async def nodes() -> None:
            schedule = (("kill-leader", 0.2), ("kill-follower", 0.45), ("pause", 0.7))
            for action, share in schedule:
                await asyncio.sleep(max(0.0, begun + share * duration - time.monotonic()))
                probe = next(iter(probes.values()))
                await whole(cluster, probe)
                leader = await stream_leader(probe)
                if action == "kill-leader":
                    victim = leader or ""
                elif action == "kill-follower":
                    victim = next(name for name in cluster.nodes if name not in (leader, paused))
                else:
                    victim = paused
                away = pause_seconds if action == "pause" else node_away_seconds
                log(f"fault: {action} {victim} for {away:g}s")
                node_faults.append(await node_fault(cluster, probes, action, victim, away))

        node_faulting = asyncio.create_task(nodes())
        service_faulting = asyncio.create_task(replica_faults(replicas.replicas, faults_count, duration, rng, log))

        async def approve_meanwhile() -> None:
            while not (node_faulting.done() and service_faulting.done()):
                await driver.decide_pending()
                await asyncio.sleep(1.0)

        approving = asyncio.create_task(approve_meanwhile())
        gap = duration / max(tasks_count, 1)
        submissions: list[Awaitable[None]] = []
        for task in planned:
            submissions.append(asyncio.create_task(driver.submit(task)))
            await asyncio.sleep(rng.uniform(0, 2 * gap))
        await asyncio.gather(*submissions)
        await node_faulting
        injected = await service_faulting + len(node_faults)
        await approving
        log(f"run {seed}: faults over ({injected}); waiting for every task to end")
        events = await _settle(admin, tasks, settle_timeout, driver)
        await _quiesce(admin, settle_timeout)
        letters = await dead_letters(admin)
        ended = await terminal_times(admin, tasks)
    finally:
        for nc in (admin, submitter, *approvers.values(), *probes.values()):
            with contextlib.suppress(Exception):
                await nc.close()
        replicas.stop()
        supervising.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervising
    traces = [state_dir / f"traces-{index}.jsonl" for index in range(1, REPLICAS + 1)]
    verdict = check(tasks, events, letters, await postgres_stores(databases, traces))
    for fault in node_faults:
        measure(fault, ended)
    restarts = sum(replica.restarts for replica in replicas.replicas)
    log(f"run {seed}: {restarts} replica restarts")
    return ClusterRunResult(tasks_count, injected, verdict, 0.0, node_faults)


async def _wait_ready(replicas: Replicas, timeout: float) -> None:
    """Until every replica answers /readyz (the services are up and bound to their consumers)."""

    def ready(replica: Replica) -> bool:
        port = next(value for key, value in replica.env.items() if key.endswith("_HTTP_PORT"))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    deadline = time.monotonic() + timeout
    waiting = list(replicas.replicas)
    while waiting:
        waiting = [replica for replica in waiting if not await asyncio.to_thread(ready, replica)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{replica.name} ({replica.log})" for replica in waiting)
            raise RuntimeError(f"not ready after {timeout}s: {names}")
        await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--faults", type=int, default=12, help="Faults of service replicas (kills and pauses).")
    parser.add_argument("--node-away-seconds", type=float, default=5.0, help="How long a killed node stays down.")
    parser.add_argument("--pause-seconds", type=float, default=12.0, help="How long the paused node stays stopped.")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AGENTBUS_CHAOS_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="A PostgreSQL server (SQLAlchemy async URL) where each run creates and drops its databases.",
    )
    parser.add_argument("--seed", type=int, default=None, help="First run's seed (each run adds one).")
    parser.add_argument("--keep", type=Path, default=None, help="Keep each run's state directory under here.")
    args = parser.parse_args()
    configure_logging("ERROR", "chaos")  # the driver's own reconnects are expected: its faults cause them
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    clean = True
    figures: dict[str, list[float]] = {"elected": [], "first_end": []}
    for run in range(args.runs):
        result = asyncio.run(
            run_once(
                args.tasks,
                args.faults,
                first + run,
                postgres_url=args.postgres_url,
                node_away_seconds=args.node_away_seconds,
                pause_seconds=args.pause_seconds,
                keep=args.keep,
            )
        )
        for detail in result.verdict.details:
            print(f"  {detail}", file=sys.stderr)
        print(f"{result.line()} ({result.seconds:.0f}s, seed {first + run})", flush=True)
        for fault in result.node_faults:
            print(f"  {fault.line()}", flush=True)
            if fault.elected_seconds is not None:
                figures["elected"].append(fault.elected_seconds)
            if fault.first_end_seconds is not None and fault.action == "kill-leader":
                figures["first_end"].append(fault.first_end_seconds)
        clean = clean and result.clean
    for name, values in (
        ("failover: a fault of the task-stream leader's node -> a new leader", figures["elected"]),
        ("failover: the leader's node killed -> the next task ended", figures["first_end"]),
    ):
        if values:
            median, longest = statistics.median(values), max(values)
            print(f"{name}: median {median:.2f}s, max {longest:.2f}s ({len(values)} faults)", flush=True)
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
