"""A suite starting beside another: a port found free and taken before the service bound it is not fatal.

`agentbus up` prefers the gateway's well-known port when it is free. Another process (another suite
starting at the same moment) can bind it between that check and the gateway's own bind: the gateway then
exits, and the suite starts it again on another port instead of giving up.
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
