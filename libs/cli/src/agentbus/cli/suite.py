"""`agentbus up`: nats-server from the wheel, the topology, and each service as its own process, supervised.

A service that dies is started again, with backoff (1 s doubling to 30 s, back to 1 s once it has run for a
minute), and so is nats-server (same ports, same store). Only a configuration error ends the suite: a
service that exits with status 2 (a bad agent, tool or config file) stops everything, and its one-line
reason is shown. One suite runs per state directory: `up.lock` there is held for the suite's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from agentbus.cli.config import (
    CREDENTIALS_DIR_VARIABLE,
    IDENTITIES_FILE_VARIABLE,
    NATS_MONITOR_URL_VARIABLE,
    NATS_URL_VARIABLE,
    write_env_file,
)
from agentbus.cli.identities import (
    ADMIN_USER,
    CREDENTIALS_DIR_NAME,
    IDENTITIES_FILE_NAME,
    Credential,
    CredentialStore,
    Identities,
    load_or_create_identities,
    service_user,
)
from agentbus.cli.permissions import nats_users
from agentbus.contracts.registry import DEFAULT_MODELS, Service
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import (
    NatsServerError,
    NatsServerProcess,
    NatsUser,
    free_port,
    port_is_free,
    write_private_file,
)

PREFERRED_NATS_PORT = 4222
PREFERRED_MONITOR_PORT = 8222
PREFERRED_GATEWAY_PORT = 8089
GATEWAY_SECRET_FILE_NAME = "gateway-session-secret"  # noqa: S105 - a file name, not a secret
"""In the credentials folder: signs the gateway's session cookies and API tokens (kept across restarts)."""
DEFAULT_CONFIG_DIR = Path("config")
DEFAULT_TOOLS_DIR = Path("tools")
DEFAULT_WORKFLOWS_DIR = Path("workflows")
PORT_MOVES = 3
"""How often a service whose HTTP port another process took while it started is started on another port."""
LOCK_FILE_NAME = "up.lock"
PIDS_FILE_NAME = "pids.json"
CONFIGURATION_ERROR_STATUS = 2
"""A service exits with this when its configuration is bad: restarting it cannot help."""
RESTART_FIRST_DELAY_SECONDS = 1.0
RESTART_MAX_DELAY_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0
"""A service that ran this long starts its next restart from the first delay again."""


class SuiteLockedError(RuntimeError):
    """Another `agentbus up` runs on this state directory."""


class StartupError(RuntimeError):
    """A service cannot start with its configuration; the message is its own one-line reason."""


def startup_reason(log_path: Path, service: str) -> str:
    """The one-line reason a service gave for not starting (`<service>: cannot start: ...`), from its log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"{service} could not start; see {log_path}"
    for line in reversed(lines):
        if "cannot start:" in line:
            return line.strip()
    return f"{service} could not start; see {log_path}"


class SuiteLock:
    """An exclusive lock on a state directory, held while the file stays open (released if the process dies)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open to hold the lock
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SuiteLockedError(
                f"agentbus up is already running on {self.path.parent} (pid {holder}); stop it first, "
                "or give this one its own --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class ServiceProcessSpec:
    """How to run one service as a child process."""

    name: str
    module: str
    env_prefix: str
    extra_env: dict[str, str] = field(default_factory=dict)


SUITE_SERVICES: tuple[tuple[Service, str, str], ...] = (
    (Service.AGENT_RUNNER, "agentbus.agent_runner", "AGENTBUS_RUNNER_"),
    (Service.INFERENCE_WORKER, "agentbus.inference_worker", "AGENTBUS_WORKER_"),
    (Service.TOOL_EXECUTOR, "agentbus.tool_executor", "AGENTBUS_EXECUTOR_"),
    (Service.RETRIEVER, "agentbus.retriever", "AGENTBUS_RETRIEVER_"),
    (Service.COST_ACCOUNTANT, "agentbus.cost_accountant", "AGENTBUS_ACCOUNTANT_"),
    (Service.TRACE_EXPORTER, "agentbus.trace_exporter", "AGENTBUS_TRACES_"),
    (Service.WORKFLOW_ORCHESTRATOR, "agentbus.workflow_orchestrator", "AGENTBUS_ORCHESTRATOR_"),
    (Service.GATEWAY, "agentbus.gateway", "AGENTBUS_GATEWAY_"),
)
"""Every service of the suite: its name, its module (run as `python -m`) and its settings' env prefix."""


def is_runnable(module: str) -> bool:
    """Whether `python -m module` can run: the package is installed and has a `__main__`."""
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class SuitePaths:
    """Where the suite's inputs and stores are: every path absolute, so no service depends on its cwd."""

    state_dir: Path
    agents_dir: Path
    config_dir: Path
    tools_dir: Path
    workflows_dir: Path = DEFAULT_WORKFLOWS_DIR

    @classmethod
    def resolve(
        cls,
        state_dir: Path,
        agents_dir: Path,
        config_dir: Path,
        tools_dir: Path,
        workflows_dir: Path = DEFAULT_WORKFLOWS_DIR,
    ) -> SuitePaths:
        return cls(
            state_dir.resolve(),
            agents_dir.resolve(),
            config_dir.resolve(),
            tools_dir.resolve(),
            workflows_dir.resolve(),
        )

    def sqlite_url(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.state_dir / name}"


def implemented_services(
    paths: SuitePaths, models: tuple[str, ...], only: frozenset[Service] | None = None
) -> list[ServiceProcessSpec]:
    """Every service of `SUITE_SERVICES` that can run here (of `only`, when given), with the settings `up`
    gives it: inputs from the agents, config and tools folders, every store under the state directory."""
    runnable = {
        service for service, module, _ in SUITE_SERVICES if is_runnable(module) and (only is None or service in only)
    }
    config, state = paths.config_dir, paths.state_dir
    extra_env: dict[Service, dict[str, str]] = {
        Service.AGENT_RUNNER: {
            "AGENTS_DIR": str(paths.agents_dir),
            "TOOLS_DIR": str(paths.tools_dir),
            "ROUTING_FILE": str(config / "models.yaml"),
            "GUARDRAILS_FILE": str(config / "guardrails.yaml"),
            # Memory stores sit beside the agents that name them (memory/*.yaml; absent: none).
            "MEMORY_DIR": str(paths.agents_dir.parent / "memory"),
        },
        Service.INFERENCE_WORKER: {"MODELS": "[" + ",".join(f'"{m}"' for m in models) + "]"},
        Service.TOOL_EXECUTOR: {
            "TOOLS_DIR": str(paths.tools_dir),
            "APPROVERS_FILE": str(config / "approvers.yaml"),
            "DATABASE_URL": paths.sqlite_url("tool-executor.db"),
        },
        Service.RETRIEVER: {"MILVUS_URI": str(state / "milvus.db")},
        Service.COST_ACCOUNTANT: {
            "PRICES_FILE": str(config / "prices.yaml"),
            "BUDGETS_FILE": str(config / "budgets.yaml"),
            "DATABASE_URL": paths.sqlite_url("cost-accountant.db"),
        },
        Service.TRACE_EXPORTER: {
            "JSONL_PATH": str(state / "traces.jsonl"),
            "LEDGER_PATH": str(state / "trace-exporter-ledger.sqlite3"),
        },
        Service.WORKFLOW_ORCHESTRATOR: {
            "WORKFLOWS_DIR": str(paths.workflows_dir),
            "AGENTS_DIR": str(paths.agents_dir),
        },
        Service.GATEWAY: {
            "IDENTITIES_FILE": str(state / IDENTITIES_FILE_NAME),
            "CREDENTIALS_DIR": str(state / CREDENTIALS_DIR_NAME),
            "SESSION_SECRET_FILE": str(state / CREDENTIALS_DIR_NAME / GATEWAY_SECRET_FILE_NAME),
            "BUDGETS_FILE": str(config / "budgets.yaml"),
            "MODELS": json.dumps(list(models)),
        },
    }
    if (config / "limits.yaml").is_file():
        extra_env[Service.COST_ACCOUNTANT]["LIMITS_FILE"] = str(config / "limits.yaml")
    if Service.COST_ACCOUNTANT not in runnable:
        # Nobody would answer the runner's budget reservations.
        extra_env[Service.AGENT_RUNNER]["BUDGETS_ENABLED"] = "false"
    return [
        ServiceProcessSpec(service, module, prefix, extra_env[service])
        for service, module, prefix in SUITE_SERVICES
        if service in runnable
    ]


@dataclass
class RunningService:
    spec: ServiceProcessSpec
    process: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None
    """While it is down: when it is started again."""


def _describe(identities: Identities) -> str:
    return (
        "; ".join(
            f"tenant {tenant}: submitters {', '.join(m.submitters) or '-'}, approvers {', '.join(m.approvers) or '-'}"
            for tenant, m in identities.tenants.items()
        )
        or "no tenants"
    )


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Suite:
    """The embedded suite: owns the nats-server (unless attached to one) and the service processes.

    With `enforce_identities`, the server it starts requires a user and password from every client and
    holds each user to its permissions (see `agentbus.cli.permissions`): identities come from
    `<state_dir>/identities.yaml` (a demo one is written when absent), passwords from
    `<state_dir>/credentials/`. Attached to an existing server (`nats_url`), it connects anonymously.
    """

    def __init__(
        self,
        state_dir: Path,
        agents_dir: Path,
        nats_url: str | None = None,
        models: tuple[str, ...] = DEFAULT_MODELS,
        echo: IO[str] = sys.stderr,
        enforce_identities: bool = False,
        config_dir: Path = DEFAULT_CONFIG_DIR,
        tools_dir: Path = DEFAULT_TOOLS_DIR,
        *,
        only: frozenset[Service] | None = None,
        environment: dict[str, str] | None = None,
        workflows_dir: Path = DEFAULT_WORKFLOWS_DIR,
    ) -> None:
        self.paths = SuitePaths.resolve(state_dir, agents_dir, config_dir, tools_dir, workflows_dir)
        self._only = only
        self._environment = environment or {}
        self.state_dir = self.paths.state_dir
        self.agents_dir = self.paths.agents_dir
        self.models = models
        self._attached_url = nats_url
        self._echo = echo
        self.enforce_identities = enforce_identities and nats_url is None
        self.identities_path = self.state_dir / IDENTITIES_FILE_NAME
        self.credentials = CredentialStore(self.state_dir / CREDENTIALS_DIR_NAME)
        self.server: NatsServerProcess | None = None
        self.services: list[RunningService] = []
        self._lock = SuiteLock(self.state_dir)
        self._server_restart_at: float | None = None
        self._server_restarts = 0

    def credential(self, user: str) -> Credential | None:
        """The credential `user` connects with: None while identities are not enforced."""
        return self.credentials.ensure(user) if self.enforce_identities else None

    @property
    def nats_url(self) -> str:
        if self._attached_url:
            return self._attached_url
        assert self.server is not None
        return self.server.url

    def _say(self, text: str) -> None:
        print(f"agentbus up: {text}", file=self._echo, flush=True)

    def start(self, ready_timeout: float = 120.0) -> None:
        """Start nats-server (unless attached), apply the topology, start every service and wait until each
        is ready. Raises SuiteLockedError, or StartupError with a service's own reason."""
        self._lock.acquire()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        env_values = {}
        if self._attached_url is None:
            users: tuple[NatsUser, ...] = ()
            if self.enforce_identities:
                identities = load_or_create_identities(self.identities_path)
                users = nats_users(identities, self.credentials, self.models)
                env_values[CREDENTIALS_DIR_VARIABLE] = str(self.credentials.directory)
                env_values[IDENTITIES_FILE_VARIABLE] = str(self.identities_path)
                self._say(f"identities from {self.identities_path}: {_describe(identities)}")
                self._say(f"credentials (mode 0600) in {self.credentials.directory}")
            port = PREFERRED_NATS_PORT if port_is_free(PREFERRED_NATS_PORT) else free_port()
            monitor = PREFERRED_MONITOR_PORT if port_is_free(PREFERRED_MONITOR_PORT) else free_port()
            for moves in range(PORT_MOVES + 1):
                server = self.server = NatsServerProcess(
                    store_dir=self.state_dir / "nats",
                    port=port,
                    monitor_port=monitor,
                    log_file=self.state_dir / "logs" / "nats-server.log",
                    users=users,
                )
                try:
                    server.start()
                    break
                except NatsServerError:
                    taken = [p for p in (port, monitor) if not port_is_free(p)]
                    if moves == PORT_MOVES or not taken:
                        raise
                    # Another process bound a port between the check and the server's bind (another suite
                    # starting beside this one): the server starts again on other ports.
                    self._say(f"nats-server: port {', '.join(map(str, taken))} was taken meanwhile; moving")
                    port, monitor = free_port(), free_port()
            env_values[NATS_MONITOR_URL_VARIABLE] = server.monitor_url
            auth = "users and permissions enforced" if users else "no authentication"
            self._say(f"nats-server (JetStream, store {server.store_dir}, {auth}) on {server.url}")
        env_values = {NATS_URL_VARIABLE: self.nats_url, **env_values}
        env_path = write_env_file(env_values, self.state_dir)
        self._say(f"wrote {env_path}")
        changes = asyncio.run(self._apply())
        self._say(f"streams applied ({len(changes)} streams, consumers and buckets)")
        specs = implemented_services(self.paths, self.models, self._only)
        # The gateway last: it is told the URL of every service started before it.
        for spec in sorted(specs, key=lambda s: s.name == Service.GATEWAY):
            if spec.name == Service.GATEWAY:
                if not self.enforce_identities:
                    self._say("gateway not started: people log in as identities, and none are enforced")
                    continue
                spec = self._gateway_spec(spec)
                gateway_port = PREFERRED_GATEWAY_PORT if port_is_free(PREFERRED_GATEWAY_PORT) else None
                self.services.append(self._spawn(spec, gateway_port))
                continue
            self.services.append(self._spawn(spec))
        self._write_pids()
        deadline = time.monotonic() + ready_timeout
        for index, service in enumerate(self.services):
            moves = 0
            while not _ready(service.http_port):
                if service.process.poll() is not None:
                    if service.process.returncode == CONFIGURATION_ERROR_STATUS:
                        raise StartupError(startup_reason(service.log_path, service.spec.name))
                    if moves < PORT_MOVES and not port_is_free(service.http_port):
                        # Another process bound its HTTP port between the check and the bind (another suite
                        # starting beside this one): it starts again on another port.
                        moves += 1
                        self._say(f"{service.spec.name}: port {service.http_port} was taken meanwhile; moving")
                        service = self.services[index] = self._spawn(service.spec)
                        self._write_pids()
                        continue
                    raise StartupError(
                        f"{service.spec.name} exited with {service.process.returncode} while starting; "
                        f"see {service.log_path}"
                    )
                if time.monotonic() > deadline:
                    raise StartupError(f"{service.spec.name} not ready after {ready_timeout}s; see {service.log_path}")
                time.sleep(0.1)
            self._say(f"{service.spec.name} ready (pid {service.process.pid}, http :{service.http_port})")
        if self.gateway_url is not None:
            self._say(f"console and HTTP API at {self.gateway_url} (approvals inbox: {self.gateway_url}/inbox)")

    @property
    def gateway_url(self) -> str | None:
        """Where the gateway serves the console and the HTTP API, once started."""
        found = [s for s in self.services if s.spec.name == Service.GATEWAY]
        return f"http://127.0.0.1:{found[0].http_port}" if found else None

    def _gateway_spec(self, spec: ServiceProcessSpec) -> ServiceProcessSpec:
        """The gateway's settings: every service started before it (for its health page), and its signing
        secret, made once and kept so that sessions and tokens outlive a restart."""
        secret = self.credentials.directory / GATEWAY_SECRET_FILE_NAME
        if not secret.exists():
            self.credentials.directory.mkdir(parents=True, exist_ok=True)
            write_private_file(secret, secrets.token_urlsafe(48) + "\n")
        urls = {s.spec.name: f"http://127.0.0.1:{s.http_port}" for s in self.services}
        return replace(spec, extra_env={**spec.extra_env, "SERVICE_URLS": json.dumps(urls)})

    def supervise(self) -> None:
        """One round of supervision: restart what died (after its backoff). Raises StartupError when a service
        exits with a configuration error, which no restart can mend."""
        now = time.monotonic()
        self._supervise_server(now)
        changed = False
        for index, service in enumerate(self.services):
            code = service.process.poll()
            if code is None:
                continue
            if code == CONFIGURATION_ERROR_STATUS:
                raise StartupError(startup_reason(service.log_path, service.spec.name))
            if service.restart_at is None:
                ran = now - service.started_at
                restarts = 0 if ran >= STABLE_AFTER_SECONDS else service.restarts
                delay = min(RESTART_MAX_DELAY_SECONDS, RESTART_FIRST_DELAY_SECONDS * 2**restarts)
                service.restarts = restarts + 1
                service.restart_at = now + delay
                self._say(
                    f"{service.spec.name} exited ({code}); restarting in {delay:g}s (restart {service.restarts}); "
                    f"see {service.log_path}"
                )
            elif now >= service.restart_at:
                restarted = self._spawn(service.spec, service.http_port)
                restarted.restarts = service.restarts
                self.services[index] = restarted
                changed = True
                self._say(f"{service.spec.name} restarted (pid {restarted.process.pid})")
        if changed:
            self._write_pids()

    def _supervise_server(self, now: float) -> None:
        server = self.server
        if server is None or server.running:
            return
        if self._server_restart_at is None:
            delay = min(RESTART_MAX_DELAY_SECONDS, RESTART_FIRST_DELAY_SECONDS * 2 ** min(self._server_restarts, 5))
            self._server_restarts += 1
            self._server_restart_at = now + delay
            self._say(f"nats-server exited; restarting in {delay:g}s on the same store and port")
            return
        if now < self._server_restart_at:
            return
        try:
            server.start()
        except NatsServerError as exc:
            self._server_restart_at = None
            self._say(f"nats-server did not restart: {exc}")
            return
        self._server_restart_at = None
        self._say(f"nats-server restarted (pid {server.pid}) on {server.url}")
        self._write_pids()

    def _write_pids(self) -> None:
        """`pids.json` in the state directory: each process of the suite, for operators (and fault drills)."""
        pids = {service.spec.name: service.process.pid for service in self.services}
        if self.server is not None and self.server.pid is not None:
            pids["nats-server"] = self.server.pid
        path = self.state_dir / PIDS_FILE_NAME
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(pids, indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)

    async def _apply(self) -> list[object]:
        admin = self.credential(ADMIN_USER)
        nc = await connect_nats(
            self.nats_url,
            "agentbus-up",
            user=admin.user if admin else None,
            password=admin.password if admin else None,
        )
        try:
            return list(await apply_topology(nc.jetstream(), self.models))
        finally:
            await nc.close()

    def _spawn(self, spec: ServiceProcessSpec, http_port: int | None = None) -> RunningService:
        http_port = http_port or free_port()
        env = {**os.environ, **self._environment}
        env.update(
            {
                f"{spec.env_prefix}NATS_URL": self.nats_url,
                f"{spec.env_prefix}HTTP_PORT": str(http_port),
                **{f"{spec.env_prefix}{k}": v for k, v in spec.extra_env.items()},
            }
        )
        credential = self.credential(service_user(spec.name))
        if credential is not None:
            env[f"{spec.env_prefix}NATS_USER"] = credential.user
            env[f"{spec.env_prefix}NATS_PASSWORD"] = credential.password
        log_path = self.state_dir / "logs" / f"{spec.name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", spec.module], env=env, stdout=log, stderr=log, start_new_session=True
            )
        return RunningService(spec, process, http_port, log_path)

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
        self._lock.release()
