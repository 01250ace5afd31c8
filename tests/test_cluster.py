"""The production shape, run: a 3-node nats-server cluster with R3 streams, two runners and two workers
competing on the same work queues, and a node killed or partitioned away mid-run.

Every task must still end exactly once, completed, with its events numbered 1..n; the clients (services and
this driver) fail over to another node by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
from agentbus.contracts import registry
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerError
from agentbus.testing import NatsCluster, running_nats_cluster, skip_outside_ci
from cli_support import agentbus
from helpers import AGENTS_DIR, SUBMITTER, TERMINAL, new_task_id, submission
from nats.aio.client import Client as NatsClient
from nats.js.errors import NoStreamResponseError

TASKS = 40
REPLICAS = 3


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    try:
        with running_nats_cluster(tmp_path / "cluster") as running:
            yield running
    except NatsServerError as exc:
        skip_outside_ci(f"nats-server cluster unavailable: {exc}")


@pytest_asyncio.fixture
async def cluster_client(cluster: NatsCluster) -> AsyncIterator[NatsClient]:
    await cluster.wait_for_meta_leader()
    nc = await connect_nats(cluster.url, "cluster-test")
    await apply_topology(nc.jetstream(), replicas=REPLICAS)
    yield nc
    await nc.close()


def _start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env}, stdout=out, stderr=out)


@pytest.fixture
def services(cluster: NatsCluster, cluster_client: NatsClient, tmp_path: Path) -> Iterator[None]:
    """Two runners and two scripted workers (the offline engine), each connected to every node."""
    with ExitStack() as stack:
        for index in (1, 2):
            runner_env = {
                "AGENTBUS_RUNNER_NATS_URL": cluster.url,
                "AGENTBUS_RUNNER_AGENTS_DIR": str(AGENTS_DIR),
                "AGENTBUS_RUNNER_BUDGETS_ENABLED": "false",
            }
            worker_env = {"AGENTBUS_WORKER_NATS_URL": cluster.url, "AGENTBUS_WORKER_MODELS": '["scripted"]'}
            for module, env, name in (
                ("agentbus.agent_runner", runner_env, f"runner-{index}"),
                ("agentbus.inference_worker", worker_env, f"worker-{index}"),
            ):
                process = _start(module, env, tmp_path / f"{name}.log")
                stack.callback(_stop, process)
        yield


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Terminals:
    """Every task's terminal events as they arrive on a core subscription, with when each came."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.arrivals: list[float] = []

    async def on_event(self, msg: Any) -> None:
        event = json.loads(msg.data)
        if event.get("kind") in TERMINAL:
            self.events.setdefault(event["task_id"], []).append(event)
            self.arrivals.append(time.monotonic())

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.events)} of {count} tasks ended within {timeout}s")
            await asyncio.sleep(0.1)


async def _submit(nc: NatsClient, task_id: str) -> None:
    """Publish until JetStream acknowledges, as a client must while a node (or the stream leader) is down."""
    subject = registry.TASK_SUBMIT.format(tenant="acme", submitter=SUBMITTER)
    for _ in range(120):
        try:
            await nc.jetstream().publish(subject, submission(task_id), headers={"Nats-Msg-Id": task_id}, timeout=2)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError):
            await asyncio.sleep(0.25)
    raise AssertionError(f"{task_id}: no node acknowledged the submission")


async def _replayed(nc: NatsClient, task_id: str) -> list[dict[str, Any]]:
    subject = registry.TASK_REPLAY.format(tenant="acme", task_id=task_id)
    for _ in range(40):
        try:
            reply = await nc.request(subject, b"{}", timeout=2)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.25)
            continue
        events: list[dict[str, Any]] = json.loads(reply.data)["events"]
        return events
    raise AssertionError(f"{task_id}: no replay answered")


async def _stream_leader(nc: NatsClient, stream: str) -> str:
    info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None, f"{stream} is not replicated"
    assert info.cluster.leader, f"no leader reported for {stream}"
    return info.cluster.leader


async def _run_with_fault(cluster: NatsCluster, nc: NatsClient, fault: str, victim: str) -> tuple[Terminals, float]:
    """Submit TASKS tasks; a third of the way in, apply the fault to `victim`. A killed node comes back 3 s
    later; a paused (partitioned) one only once every task has ended, so the services connected to it must
    notice it is gone and fail over. The seconds from the fault until the next task ended are returned
    beside the terminals."""
    terminals = Terminals()
    sub = await nc.subscribe(registry.TASK_EVENT.pattern.format(tenant="acme", task_id="*"), cb=terminals.on_event)
    task_ids = [new_task_id("cl") for _ in range(TASKS)]
    for task_id in task_ids[: TASKS // 3]:
        await _submit(nc, task_id)
    await terminals.wait_for(TASKS // 6, timeout=60)
    faulted_at = time.monotonic()
    if fault == "pause-follower":
        cluster.pause(victim)
    else:
        cluster.kill(victim)
    for task_id in task_ids[TASKS // 3 :]:
        await _submit(nc, task_id)
    if fault == "kill-leader":
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - faulted_at)))
        cluster.restart(victim)
    await terminals.wait_for(TASKS, timeout=300)
    await asyncio.sleep(1)  # a duplicate terminal event would arrive now
    cluster.resume(victim)
    await sub.unsubscribe()
    after = [arrival - faulted_at for arrival in terminals.arrivals if arrival > faulted_at]
    assert set(terminals.events) == set(task_ids)
    return terminals, min(after) if after else float("nan")


@pytest.mark.asyncio
async def test_the_bootstrap_keeps_three_copies_of_every_stream_and_a_later_apply_never_scales_them_down(
    cluster_client: NatsClient,
) -> None:
    js = cluster_client.jetstream()
    names = [stream.name for stream in registry.STREAMS] + [f"KV_{b.bucket}" for b in registry.KEY_VALUE_BUCKETS]
    assert {name: (await js.stream_info(name)).config.num_replicas for name in names} == dict.fromkeys(names, 3)
    # A service or `agentbus up --nats-url` applying the topology without a replica count keeps them.
    await apply_topology(js)
    assert {name: (await js.stream_info(name)).config.num_replicas for name in names} == dict.fromkeys(names, 3)


@pytest.mark.asyncio
@pytest.mark.usefixtures("services")
@pytest.mark.parametrize("fault", ["kill-leader", "pause-follower"])
# Every raft group the faulted node led elects a new leader, and clients connected to a paused node wait for
# their pings to go unanswered (about 15 s): on a loaded 2-core machine that takes well over a minute.
@pytest.mark.timeout(360)
async def test_every_task_ends_exactly_once_when_a_node_dies_or_is_partitioned_mid_run(
    cluster: NatsCluster, cluster_client: NatsClient, fault: str
) -> None:
    leader = await _stream_leader(cluster_client, registry.TASKS.name)
    victim = leader if fault == "kill-leader" else next(name for name in cluster.nodes if name != leader)
    # The driver (this test, a client of the suite) stays off the node it faults: nats-py, reconnecting away
    # from a node that stopped reading, can wait minutes for its unsent bytes to drain. The services
    # connect to every node and must fail over by themselves.
    others = ",".join(node.url for name, node in cluster.nodes.items() if name != victim)
    driver = await connect_nats(others, "cluster-driver")
    try:
        terminals, first_end_after_fault = await _run_with_fault(cluster, driver, fault, victim)
        await _check_exactly_once(driver, terminals, fault, first_end_after_fault)
    finally:
        await driver.close()


async def _check_exactly_once(nc: NatsClient, terminals: Terminals, fault: str, first_end_after_fault: float) -> None:
    repeated = sum(len(events) - 1 for events in terminals.events.values())
    print(f"{fault}: first task ended {first_end_after_fault:.2f}s after the fault; {repeated} live repeats")
    # A live subscriber may get an event twice (same seq) when the runner re-published it after a failover;
    # clients skip seqs already seen. Distinct terminal events must be exactly one per task.
    not_once_completed = {
        task_id: sorted({(e["seq"], e["kind"]) for e in events})
        for task_id, events in terminals.events.items()
        if {(e["seq"], e["kind"]) for e in events} != {(events[0]["seq"], "completed")}
    }
    assert not not_once_completed, f"tasks not completed exactly once: {not_once_completed}"
    for task_id, events in terminals.events.items():
        stored = await _replayed(nc, task_id)
        seqs = [int(event["seq"]) for event in stored]
        assert seqs == list(range(1, len(seqs) + 1)), f"{task_id}: stored events {seqs}"
        assert [event["kind"] for event in stored if event["kind"] in TERMINAL] == ["completed"]
        assert seqs[-1] == events[0]["seq"]


def _runner_queue(cluster: NatsCluster, cwd: Path) -> int | None:
    """The pending count `agentbus status` prints for the runner's submissions, or None while no node answers."""
    done = agentbus("status", "--nats-url", cluster.url, cwd=cwd, timeout=60)
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines():
        columns = line.split()
        if columns[:2] == [registry.TASKS.name, registry.RUNNER_SUBMISSIONS.durable]:
            return int(columns[2])
    return None


@pytest.mark.asyncio
async def test_status_reads_the_queue_keda_scales_on_from_the_consumer_leader_and_again_after_it_fails_over(
    cluster: NatsCluster, cluster_client: NatsClient, tmp_path: Path
) -> None:
    task_ids = [new_task_id("queued") for _ in range(12)]
    for task_id in task_ids:
        await _submit(cluster_client, task_id)
    assert _runner_queue(cluster, tmp_path) == len(task_ids)

    info = await cluster_client.jetstream().consumer_info(registry.TASKS.name, registry.RUNNER_SUBMISSIONS.durable)
    assert info.cluster is not None
    assert info.cluster.leader
    cluster.kill(info.cluster.leader)
    deadline = time.monotonic() + 60
    queue = None
    while queue is None and time.monotonic() < deadline:
        queue = _runner_queue(cluster, tmp_path)
    assert queue == len(task_ids), "the new consumer leader reports the same queue"
    moved = None
    while moved is None and time.monotonic() < deadline:
        # This connection may have been on the killed node: it asks again once it has reconnected.
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            moved = await cluster_client.jetstream().consumer_info(
                registry.TASKS.name, registry.RUNNER_SUBMISSIONS.durable, timeout=5
            )
    assert moved is not None
    assert moved.cluster is not None
    assert moved.cluster.leader not in (None, info.cluster.leader)
    cluster.restart(info.cluster.leader)
