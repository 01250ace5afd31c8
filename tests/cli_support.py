"""Running the `agentbus` command as a person does: a real process, in a folder of its own, against a real
`agentbus up`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO_ROOT

AGENTBUS = str(Path(sys.executable).parent / "agentbus")
READY = "ready; NATS at"
TRACEBACK = "Traceback (most recent call last)"


def agentbus(
    *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`agentbus ARGS` in `cwd`, its output captured."""
    return subprocess.run(
        [AGENTBUS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def agentbus_at_once(
    commands: Sequence[Sequence[str]], cwd: Path, timeout: float = 60
) -> list[subprocess.CompletedProcess[str]]:
    """Each `agentbus ARGS` of `commands` in `cwd`, all started together (each is a process of its own, as
    when run one by one), their outputs captured in order."""
    started = [
        (
            list(args),
            subprocess.Popen([AGENTBUS, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
        for args in commands
    ]
    done = []
    for args, process in started:
        out, err = process.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([AGENTBUS, *args], process.returncode, out, err))
    return done


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, *expected: str) -> None:
    """The command failed with `code`, said so in one `Error:` line (after click's usage lines for a usage
    error) containing each of `expected`, and printed no traceback or pydantic text."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert TRACEBACK not in output, output
    assert "errors.pydantic.dev" not in output, output
    assert "validation error for" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    if code != 2:
        assert done.stderr.strip() == errors[0], done.stderr
    for text in expected:
        assert text in errors[0], errors[0]


@dataclass
class Suite:
    """A running `agentbus up` in `cwd`; once stopped, `stderr` holds everything it said."""

    cwd: Path
    process: subprocess.Popen[str]
    said: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def state(self) -> Path:
        return self.cwd / ".agentbus"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return agentbus(*args, cwd=self.cwd, timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=90)
        self.stderr = "".join(self.said) + rest
        return self.process.returncode


def prepare_folder(cwd: Path, agents: Sequence[str] | None = None, identities: str | None = None) -> None:
    """A folder laid out as the repository is for `agentbus up`: `agents/` (only `agents` when named; then no
    `workflows/`, whose steps name the others), `config/`, `tools/`, `examples/` and `memory/`, and
    `.agentbus/identities.yaml` when given."""
    cwd.mkdir(parents=True, exist_ok=True)
    if agents is None:
        (cwd / "agents").symlink_to(REPO_ROOT / "agents")
        (cwd / "workflows").symlink_to(REPO_ROOT / "workflows")
    else:
        (cwd / "agents").mkdir()
        for name in agents:
            (cwd / "agents" / f"{name}.yaml").symlink_to(REPO_ROOT / "agents" / f"{name}.yaml")
    for folder in ("config", "tools", "examples", "memory"):
        (cwd / folder).symlink_to(REPO_ROOT / folder)
    if identities is not None:
        (cwd / ".agentbus").mkdir()
        (cwd / ".agentbus" / "identities.yaml").write_text(identities)


@contextlib.contextmanager
def running_suite(cwd: Path, *args: str, command: Sequence[str] | None = None) -> Iterator[Suite]:
    """`agentbus up ARGS` (or `command`) in `cwd`, yielded once it says it is ready; stopped with SIGTERM."""
    process = subprocess.Popen(
        list(command) if command is not None else [AGENTBUS, "up", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "AGENTBUS_RUNNER_LOG_LEVEL": "WARNING", "AGENTBUS_WORKER_LOG_LEVEL": "WARNING"},
    )
    suite = Suite(cwd, process)
    try:
        assert process.stderr is not None
        while READY not in (line := process.stderr.readline()):
            assert line, "agentbus up ended before it was ready:\n" + "".join(suite.said)
            suite.said.append(line)
        yield suite
    finally:
        suite.stop()
