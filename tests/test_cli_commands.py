"""The `agentbus` command line, run as a real process against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentbus.cli.suite import SUITE_SERVICES, is_runnable
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import running_nats_server
from helpers import AGENTS_DIR, REPO_ROOT, new_task_id

AGENTBUS = str(Path(sys.executable).parent / "agentbus")
CONFIG_DIR = REPO_ROOT / "config"
TOOLS_DIR = REPO_ROOT / "tools"


async def _agentbus(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # An empty folder by default: no ./.agentbus/env left by some `agentbus up` may change what a test runs.
    with tempfile.TemporaryDirectory() as empty:
        return await asyncio.to_thread(
            subprocess.run,
            [AGENTBUS, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or empty,
            check=False,
        )


@dataclass
class UpRun:
    """A running `agentbus up`; once stopped, `stderr` holds everything it said."""

    process: subprocess.Popen[str]
    stderr: str = ""

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


@contextlib.contextmanager
def _up(cwd: Path, *args: str) -> Iterator[UpRun]:
    """`agentbus up` with the two agents of built-in tools, yielded once it says it is ready; SIGTERM on exit."""
    agents = cwd / "agents"
    agents.mkdir(exist_ok=True)
    for name in ("echo.yaml", "assistant.yaml"):
        shutil.copy(AGENTS_DIR / name, agents / name)
    up = subprocess.Popen(
        [
            AGENTBUS,
            "up",
            "--agents-dir",
            str(agents),
            "--config-dir",
            str(CONFIG_DIR),
            "--tools-dir",
            str(TOOLS_DIR),
            *args,
        ],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run = UpRun(up)
    said: list[str] = []
    try:
        assert up.stderr is not None
        while "ready; NATS at" not in (line := up.stderr.readline()):
            assert line, "agentbus up ended before it was ready:\n" + "".join(said)
            said.append(line)
        yield run
    finally:
        up.send_signal(signal.SIGTERM)
        _, rest = up.communicate(timeout=60)
        run.stderr = "".join(said) + rest


def _runnable_services() -> list[str]:
    return [service for service, module, _ in SUITE_SERVICES if is_runnable(module)]


@pytest.mark.usefixtures("suite")
async def test_submit_wait_prints_events_and_exits_zero_on_completed(bootstrapped_nats: NatsServerProcess) -> None:
    task_id = new_task_id("cli")
    text = "calculator(2**10)"
    done = await _agentbus(
        "submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "assistant",
        "--task-id", task_id, "--wait", text,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["1", "accepted"]
    assert "calculator(expression='2**10') = 1024" in done.stdout

    replay = await _agentbus("events", "--nats-url", bootstrapped_nats.url, task_id)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == done.stdout

    again = await _agentbus(
        "submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "assistant",
        "--task-id", task_id, text,
    )  # fmt: skip
    assert "duplicate" in again.stderr


@pytest.mark.usefixtures("suite")
async def test_submit_wait_exits_non_zero_on_rejected(bootstrapped_nats: NatsServerProcess) -> None:
    done = await _agentbus(
        "submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "ghost", "--wait", "hi"
    )
    assert done.returncode == 1
    assert "unknown_agent" in done.stdout


async def test_events_of_an_unknown_task_fails_clearly(bootstrapped_nats: NatsServerProcess) -> None:
    done = await _agentbus("events", "--nats-url", bootstrapped_nats.url, "no-such-task")
    assert done.returncode != 0
    assert "no events for task no-such-task" in done.stderr


async def test_streams_apply_is_idempotent_and_status_lists_every_durable(bootstrapped_nats: NatsServerProcess) -> None:
    first = await _agentbus("streams", "apply", "--nats-url", bootstrapped_nats.url)
    second = await _agentbus("streams", "apply", "--nats-url", bootstrapped_nats.url)
    assert first.returncode == second.returncode == 0
    assert "consumer agent-runner-submissions" in " ".join(second.stdout.split())
    status = await _agentbus("status", "--nats-url", bootstrapped_nats.url)
    assert status.returncode == 0
    durables = {line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert {
        "agent-runner-submissions",
        "agent-runner-cancellations",
        "agent-runner-llm-results",
        "inference-worker-scripted",
    } <= durables


async def test_a_cli_without_a_reachable_server_says_so(tmp_path: Path) -> None:
    done = await _agentbus("status", "--nats-url", "nats://127.0.0.1:1", cwd=tmp_path)
    assert done.returncode != 0
    assert "cannot reach NATS" in done.stderr


def test_up_enforces_identities_runs_the_suite_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / ".agentbus"
    with _up(tmp_path) as up:
        env_file = (state / "env").read_text()
        assert env_file.startswith("AGENTBUS_NATS_URL=nats://127.0.0.1:")
        assert f"AGENTBUS_CREDENTIALS_DIR={state / 'credentials'}" in env_file
        credentials = sorted(p.name for p in (state / "credentials").iterdir())
        assert {"admin.json", "approver-alice.json", "submitter-acme-app.json", "service-agent-runner.json"} <= set(
            credentials
        )
        assert all(stat.S_IMODE((state / "credentials" / c).stat().st_mode) == 0o600 for c in credentials)
        assert stat.S_IMODE((state / "nats" / "nats-server.conf").stat().st_mode) == 0o600
        # Another command in the same folder finds the server and its credentials through ./.agentbus/env:
        # the demo tenant's submitter submits, the operator lists approvals.
        done = subprocess.run(
            [AGENTBUS, "submit", "--tenant", "acme", "--agent", "echo", "--wait", "hi"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "completed" in done.stdout
        listed = subprocess.run(
            [AGENTBUS, "approvals", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert listed.returncode == 0, listed.stderr
        # A tenant with no submitter in identities.yaml cannot submit.
        stranger = subprocess.run(
            [AGENTBUS, "submit", "--tenant", "globex", "--agent", "echo", "hi"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert stranger.returncode == 2
        assert "tenant 'globex' has no submitter" in stranger.stderr
    stderr = up.stderr
    assert up.returncode == 0, stderr
    assert "users and permissions enforced" in stderr
    for service in _runnable_services():
        assert f"{service} stopped (0)" in stderr
    assert "nats-server stopped" in stderr


def test_up_attached_to_a_server_without_auth_runs_the_suite_anonymously(tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "bare") as bare, _up(tmp_path, "--nats-url", bare.url) as up:
        assert "AGENTBUS_CREDENTIALS_DIR" not in (tmp_path / ".agentbus" / "env").read_text()
        done = subprocess.run(
            [AGENTBUS, "submit", "--tenant", "t1", "--agent", "echo", "--wait", "hi"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    assert up.returncode == 0, up.stderr
    assert not (tmp_path / ".agentbus" / "credentials").exists()


def test_a_service_started_before_the_bootstrap_exits_with_a_clear_message(tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "bare") as bare:
        env = {**os.environ, "AGENTBUS_RUNNER_NATS_URL": bare.url, "AGENTBUS_RUNNER_AGENTS_DIR": str(AGENTS_DIR)}
        done = subprocess.run(
            [sys.executable, "-m", "agentbus.agent_runner"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert "run `agentbus streams apply` first" in done.stderr


def test_a_bad_agent_spec_stops_the_runner_naming_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\nmodel: scripted\nsystem_prompt: x\nmax_steps: -3\n")
    env = {**os.environ, "AGENTBUS_RUNNER_AGENTS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "agentbus.agent_runner"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "bad.yaml: field 'max_steps'" in done.stderr
