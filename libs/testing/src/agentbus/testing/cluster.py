"""A nats-server cluster on loopback: the shape production runs (three nodes, R3 streams), for tests.

Every node is the wheel's nats-server with its own store, joined by routes, and fsyncs every write
(`sync_interval: always`): what is tested must be what runs, and NATS's default lazy fsync can lose
acknowledged writes when a node dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentbus.runtime.server import NatsServerError, NatsServerProcess, free_port

CLUSTER_NAME = "agentbus"


@dataclass
class NatsCluster:
    """The nodes of a running cluster, by server name, and what a test does to them."""

    nodes: dict[str, NatsServerProcess]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: clients fail over to another node when theirs dies."""
        return ",".join(node.url for node in self.nodes.values())

    def node(self, name: str) -> NatsServerProcess:
        return self.nodes[name]

    def kill(self, name: str) -> None:
        """SIGKILL a node: no shutdown, no flush."""
        self.nodes[name].kill()

    def pause(self, name: str) -> None:
        """SIGSTOP a node: to the others it is partitioned away until `resume`."""
        self._signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    def _signal(self, name: str, signum: signal.Signals) -> None:
        node = self.nodes[name]
        if node.pid is not None and node.running:
            with contextlib.suppress(ProcessLookupError):  # it died meanwhile
                os.kill(node.pid, signum)

    def restart(self, name: str) -> None:
        """Start a killed or stopped node again on its own store and ports."""
        node = self.nodes[name]
        node.stop()
        node.start()

    def jsz(self, name: str) -> dict[str, object]:
        """A node's JetStream report (`/jsz`), or {} while it does not answer."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - a fixed local http URL
                f"{self.nodes[name].monitor_url}/jsz", timeout=1
            ) as response:
                report = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return report if isinstance(report, dict) else {}

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as the live nodes report it, when they agree on one."""
        for name, node in self.nodes.items():
            if not node.running:
                continue
            meta = self.jsz(name).get("meta_cluster")
            if isinstance(meta, dict) and meta.get("leader") and meta.get("cluster_size", 0) >= len(self.nodes):
                return str(meta["leader"])
        return None

    async def wait_for_meta_leader(self, timeout: float = 60.0) -> str:
        """The meta leader's name once the live nodes agree on one. A loaded machine can take tens of seconds
        to elect; when none is elected in `timeout`, the error ends with each node's last log lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader is not None:
                return leader
            await asyncio.sleep(0.1)
        raise NatsServerError(f"the cluster elected no JetStream meta leader within {timeout}s; {self._log_tails()}")

    def _log_tails(self, lines: int = 8) -> str:
        tails = []
        for name, node in self.nodes.items():
            log = node.log_file
            text = log.read_text(errors="replace").splitlines()[-lines:] if log is not None and log.exists() else []
            tails.append(f"{name} (running: {node.running}): " + " | ".join(text))
        return "; ".join(tails)

    def stop(self) -> None:
        for name in self.nodes:
            self.resume(name)
        for node in self.nodes.values():
            node.stop()


def cluster_nodes(root: Path, size: int = 3) -> dict[str, NatsServerProcess]:
    """`size` nodes under `root` on free ports, each routing to every other."""
    names = [f"n{index + 1}" for index in range(size)]
    route_ports = {name: free_port() for name in names}
    nodes: dict[str, NatsServerProcess] = {}
    for name in names:
        routes = ", ".join(f"nats-route://127.0.0.1:{route_ports[other]}" for other in names if other != name)
        store = root / name
        store.mkdir(parents=True, exist_ok=True)
        nodes[name] = NatsServerProcess(
            store_dir=store,
            port=free_port(),
            monitor_port=free_port(),
            log_file=store / "nats-server.log",
            jetstream_config="  sync_interval: always\n",
            extra_config=(
                f'server_name: "{name}"\n'
                f'cluster {{\n  name: "{CLUSTER_NAME}"\n  listen: "127.0.0.1:{route_ports[name]}"\n'
                f"  routes: [{routes}]\n}}\n"
            ),
        )
    return nodes


@contextlib.contextmanager
def running_nats_cluster(root: Path, size: int = 3) -> Iterator[NatsCluster]:
    """A `size`-node cluster under `root`, every node started (each healthy on its own); stopped on exit.
    Await `wait_for_meta_leader()` before creating streams."""
    cluster = NatsCluster(cluster_nodes(root, size))
    try:
        for node in cluster.nodes.values():
            node.start()
        yield cluster
    finally:
        cluster.stop()
