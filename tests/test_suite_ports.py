"""A suite starting beside another: a port found free and taken before the service bound it is not fatal.

`agentbus up` prefers well-known ports when they are free: the gateway's, and nats-server's client and
monitoring ports. Another process (another suite starting at the same moment) can bind one between that
check and the bind: the service then exits, and the suite starts it again on other ports instead of giving
up, or, worse, taking the other suite's nats-server, whose health endpoint answers on that port, for its own.
"""

from __future__ import annotations

import io
import socket
import urllib.request
from pathlib import Path

import pytest
from agentbus.cli import suite as suite_module
from agentbus.cli.suite import Suite
from agentbus.contracts.registry import Service
from agentbus.runtime.server import port_is_free
from agentbus.testing import running_nats_server
from helpers import AGENTS_DIR, REPO_ROOT


def test_a_gateway_whose_port_is_taken_while_it_starts_moves_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = int(holder.getsockname()[1])
    checked: list[int] = []

    def free_when_first_checked(port: int, host: str = "127.0.0.1") -> bool:
        # The check sees the port free; the other process binds it right after.
        if port == taken and port not in checked:
            checked.append(port)
            return True
        return port_is_free(port, host)

    monkeypatch.setattr(suite_module, "PREFERRED_GATEWAY_PORT", taken)
    monkeypatch.setattr(suite_module, "port_is_free", free_when_first_checked)
    (tmp_path / "identities.yaml").write_text("tenants:\n  acme:\n    submitters: [acme-app]\n    approvers: [alice]\n")
    said = io.StringIO()
    running = Suite(
        tmp_path,
        AGENTS_DIR,
        config_dir=REPO_ROOT / "config",
        tools_dir=REPO_ROOT / "tools",
        echo=said,
        enforce_identities=True,
        only=frozenset({Service.GATEWAY}),
    )
    try:
        running.start(ready_timeout=90)
        url = running.gateway_url
        assert url is not None
        assert not url.endswith(f":{taken}"), url
        assert f"port {taken} was taken meanwhile" in said.getvalue(), said.getvalue()
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        running.stop()
        holder.close()


def test_a_nats_server_whose_ports_another_server_took_while_it_started_moves_instead_of_using_that_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_nats_server(tmp_path / "other-suite") as other:
        checked: list[int] = []

        def free_when_first_checked(port: int, host: str = "127.0.0.1") -> bool:
            # The check sees the other server's ports free: it bound them right after.
            if port in (other.port, other.monitor_port) and port not in checked:
                checked.append(port)
                return True
            return port_is_free(port, host)

        monkeypatch.setattr(suite_module, "PREFERRED_NATS_PORT", other.port)
        monkeypatch.setattr(suite_module, "PREFERRED_MONITOR_PORT", other.monitor_port)
        monkeypatch.setattr(suite_module, "port_is_free", free_when_first_checked)
        said = io.StringIO()
        running = Suite(
            tmp_path / "suite",
            AGENTS_DIR,
            config_dir=REPO_ROOT / "config",
            tools_dir=REPO_ROOT / "tools",
            echo=said,
            only=frozenset({Service.INFERENCE_WORKER}),
        )
        try:
            running.start(ready_timeout=90)
            assert running.server is not None
            assert running.server.port != other.port, said.getvalue()
            assert running.server.running
            assert f"nats-server: port {other.port}, {other.monitor_port} was taken meanwhile" in said.getvalue()
            # The suite's streams are in its own server, not in the other one.
            assert (tmp_path / "suite" / "nats" / "jetstream").is_dir()
            assert not list((tmp_path / "other-suite" / "jetstream").rglob("AGENTBUS_TASKS"))
        finally:
            running.stop()
