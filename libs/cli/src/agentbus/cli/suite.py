"""`agentbus up`: nats-server from the wheel, the topology, and each service as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agentbus.cli.config import NATS_MONITOR_URL_VARIABLE, NATS_URL_VARIABLE, write_env_file
from agentbus.contracts.registry import DEFAULT_MODELS, Service
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess, free_port, port_is_free

PREFERRED_NATS_PORT = 4222
PREFERRED_MONITOR_PORT = 8222


@dataclass(frozen=True)
class ServiceProcessSpec:
    """How to run one service as a child process."""

    name: str
    module: str
    env_prefix: str
    extra_env: dict[str, str] = field(default_factory=dict)


def implemented_services(agents_dir: Path, models: tuple[str, ...]) -> list[ServiceProcessSpec]:
    """Every service that exists today, with the settings `up` gives it."""
    return [
        ServiceProcessSpec(
            Service.AGENT_RUNNER, "agentbus.agent_runner", "AGENTBUS_RUNNER_", {"AGENTS_DIR": str(agents_dir)}
        ),
        ServiceProcessSpec(
            Service.INFERENCE_WORKER,
            "agentbus.inference_worker",
            "AGENTBUS_WORKER_",
            {"MODELS": "[" + ",".join(f'"{m}"' for m in models) + "]"},
        ),
    ]


@dataclass
class RunningService:
    spec: ServiceProcessSpec
    process: subprocess.Popen[bytes]
    http_port: int
    log_path: Path


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Suite:
    """The embedded suite: owns the nats-server (unless attached to one) and the service processes."""

    def __init__(
        self,
        state_dir: Path,
        agents_dir: Path,
        nats_url: str | None = None,
        models: tuple[str, ...] = DEFAULT_MODELS,
        echo: IO[str] = sys.stderr,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.agents_dir = agents_dir.resolve()
        self.models = models
        self._attached_url = nats_url
        self._echo = echo
        self.server: NatsServerProcess | None = None
        self.services: list[RunningService] = []

    @property
    def nats_url(self) -> str:
        if self._attached_url:
            return self._attached_url
        assert self.server is not None
        return self.server.url

    def _say(self, text: str) -> None:
        print(f"agentbus up: {text}", file=self._echo, flush=True)

    def start(self, ready_timeout: float = 30.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        env_values = {}
        if self._attached_url is None:
            port = PREFERRED_NATS_PORT if port_is_free(PREFERRED_NATS_PORT) else free_port()
            monitor = PREFERRED_MONITOR_PORT if port_is_free(PREFERRED_MONITOR_PORT) else free_port()
            self.server = NatsServerProcess(
                store_dir=self.state_dir / "nats",
                port=port,
                monitor_port=monitor,
                log_file=self.state_dir / "logs" / "nats-server.log",
            )
            self.server.start()
            env_values[NATS_MONITOR_URL_VARIABLE] = self.server.monitor_url
            self._say(f"nats-server (JetStream, store {self.server.store_dir}) on {self.server.url}")
        env_values = {NATS_URL_VARIABLE: self.nats_url, **env_values}
        env_path = write_env_file(env_values, self.state_dir)
        self._say(f"wrote {env_path}")
        changes = asyncio.run(self._apply())
        self._say(f"streams applied ({len(changes)} streams, consumers and buckets)")
        for spec in implemented_services(self.agents_dir, self.models):
            self.services.append(self._spawn(spec))
        deadline = time.monotonic() + ready_timeout
        for service in self.services:
            while not _ready(service.http_port):
                if service.process.poll() is not None:
                    raise RuntimeError(
                        f"{service.spec.name} exited with {service.process.returncode}; see {service.log_path}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service.spec.name} not ready after {ready_timeout}s; see {service.log_path}")
                time.sleep(0.1)
            self._say(f"{service.spec.name} ready (pid {service.process.pid}, http :{service.http_port})")

    async def _apply(self) -> list[object]:
        nc = await connect_nats(self.nats_url, "agentbus-up")
        try:
            return list(await apply_topology(nc.jetstream(), self.models))
        finally:
            await nc.close()

    def _spawn(self, spec: ServiceProcessSpec) -> RunningService:
        http_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                f"{spec.env_prefix}NATS_URL": self.nats_url,
                f"{spec.env_prefix}HTTP_PORT": str(http_port),
                **{f"{spec.env_prefix}{k}": v for k, v in spec.extra_env.items()},
            }
        )
        log_path = self.state_dir / "logs" / f"{spec.name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", spec.module], env=env, stdout=log, stderr=log, start_new_session=True
            )
        return RunningService(spec, process, http_port, log_path)

    def exited(self) -> RunningService | None:
        """A service process that ended on its own, if any."""
        return next((s for s in self.services if s.process.poll() is not None), None)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every service (they drain), wait, kill stragglers, then stop nats-server."""
        for service in self.services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in self.services:
            try:
                service.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()
            self._say(f"{service.spec.name} stopped ({service.process.returncode})")
        if self.server is not None:
            self.server.stop()
            self._say("nats-server stopped")
