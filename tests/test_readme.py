"""Every command README.md and examples/README.md tell a person to paste, run as written against a real
`agentbus up` with identities: each must succeed where success is documented, and none may print a
traceback. `TASK_ID` and `APPROVAL_ID` stand for the task the lines before submitted and its approval."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from agentbus.cli.demo import SAMPLE_TASKS
from cli_support import AGENTBUS, TRACEBACK, Suite, prepare_folder, running_suite
from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
EXAMPLES_README = REPO_ROOT / "examples" / "README.md"
PLAIN_CLIENT = REPO_ROOT / "examples" / "plain_nats_client.py"
LONG_RUNNING = ("approvals", "watch")
WAIT_SECONDS = 30.0


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same level or above."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    following = re.compile(rf"^#{{1,{len(level)}}} ", flags=re.MULTILINE)
    found = following.search(text, start + len(heading) + 2)
    return text[start : found.start() if found else len(text)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def pasted_commands(text: str) -> list[str]:
    """The `uv run ...` lines of the bash blocks of `text`, in order."""
    return [line for block in code_blocks(text, "bash") for line in block.splitlines() if line.startswith("uv run ")]


def argv(line: str) -> list[str]:
    """A pasted line as this environment runs it: `uv run agentbus` is the installed command, `uv run
    python` this interpreter (`uv run` itself would resolve the project from the test's folder)."""
    words = shlex.split(line, comments=True)
    assert words[:2] == ["uv", "run"], line
    program, *rest = words[2:]
    return [{"agentbus": AGENTBUS, "python": sys.executable}[program], *rest]


@dataclass
class Session:
    """What a person pasting the lines in order would have on screen: the last task and its approval."""

    suite: Suite
    task_id: str | None = None
    outputs: list[str] = field(default_factory=list)

    def approval_id(self) -> str:
        assert self.task_id is not None, "APPROVAL_ID before any task was submitted"
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            # As the operator, who reads every tenant's approvals.
            listed = self.suite.run("approvals", "list", "--json")
            for line in listed.stdout.splitlines():
                request = json.loads(line)
                if request["task_id"] == self.task_id:
                    return str(request["approval_id"])
            time.sleep(0.5)
        raise AssertionError(f"no approval of {self.task_id} within {WAIT_SECONDS}s")

    def paste(self, line: str) -> subprocess.CompletedProcess[str]:
        if "TASK_ID" in line:
            assert self.task_id is not None, f"{line}: no task submitted before it"
            line = line.replace("TASK_ID", self.task_id)
        if "APPROVAL_ID" in line:
            line = line.replace("APPROVAL_ID", self.approval_id())
        command = argv(line)
        if tuple(command[1:3]) == LONG_RUNNING:
            done = self._until_interrupted(command)
        else:
            done = subprocess.run(command, cwd=self.suite.cwd, capture_output=True, text=True, timeout=180, check=False)
        output = done.stdout + done.stderr
        self.outputs.append(f"$ {line}\n{output}")
        assert done.returncode == 0, f"$ {line}\nexit {done.returncode}\n{output}"
        assert TRACEBACK not in output, f"$ {line}\n{output}"
        if command[1:2] == ["submit"]:
            self.task_id = self._submitted(command, done)
        return done

    def _until_interrupted(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        process = subprocess.Popen(
            command, cwd=self.suite.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stderr is not None
        first = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        return subprocess.CompletedProcess(command, process.returncode, out, first + err)

    @staticmethod
    def _submitted(command: list[str], done: subprocess.CompletedProcess[str]) -> str:
        if "--wait" in command:
            found = re.search(r"^submitted (\S+) as ", done.stderr, flags=re.MULTILINE)
            assert found, done.stderr
            return found.group(1)
        return done.stdout.strip()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The README's own `agentbus up` line, run in a folder laid out as a clone is."""
    up_line = pasted_commands(section(README.read_text(), "## The CLI"))[0]
    assert argv(up_line)[1:] == ["up"], up_line
    cwd = tmp_path_factory.mktemp("readme")
    prepare_folder(cwd)
    with running_suite(cwd, command=argv(up_line)) as suite:
        yield Session(suite)


@pytest.mark.timeout(600)
def test_the_quick_start_submit_works_as_pasted(session: Session) -> None:
    lines = pasted_commands(section(README.read_text(), "## Two commands on a fresh machine"))
    assert len(lines) == 1, lines
    done = session.paste(lines[0])
    assert re.search(r"completed .* = 42", done.stdout), done.stdout


@pytest.mark.timeout(600)
def test_every_command_of_the_cli_section_works_as_pasted(session: Session) -> None:
    lines = pasted_commands(section(README.read_text(), "## The CLI"))
    assert len(lines) >= 15, lines
    documented = {" ".join(argv(line)[1:3]) for line in lines}
    for command in ("submit --tenant", "events TASK_ID", "cancel TASK_ID", "doctor"):
        assert any(d.startswith(command) for d in documented), f"the README shows no `agentbus {command}`"
    results = {line: session.paste(line) for line in lines[1:]}
    ingested = next(done for line, done in results.items() if " ingest " in line)
    assert ingested.stdout.startswith("indexed 8 documents"), ingested.stdout
    doctor = next(done for line, done in results.items() if line.split()[3:4] == ["doctor"])
    assert doctor.stdout.splitlines()[-1] == "all checks passed", doctor.stdout


@pytest.mark.timeout(600)
def test_every_example_works_as_pasted(session: Session) -> None:
    lines = [line for line in pasted_commands(EXAMPLES_README.read_text()) if argv(line)[1:] != ["up"]]
    for line in lines:
        session.paste(line)
    # The last task submitted there is the deploy assistant's: approved, it renders and validates its
    # manifests, written as a person would (no YAML anchors or aliases).
    deploy = session.task_id
    assert deploy is not None
    deadline = time.monotonic() + WAIT_SECONDS
    events = ""
    while "completed" not in events and time.monotonic() < deadline:
        events = session.suite.run("events", deploy, "--tenant", "acme", "--json").stdout
        time.sleep(0.5)
    completed = json.loads(events.splitlines()[-1])
    assert completed["kind"] == "completed", events
    assert "kind: Deployment" in completed["output"], completed["output"]
    assert "Validated offline, NOT applied" in completed["output"], completed["output"]
    assert not re.search(r"[&*]id\d+", completed["output"]), completed["output"]


def test_every_sample_agent_has_an_example_and_the_demo_runs_the_same_ones() -> None:
    examples = EXAMPLES_README.read_text()
    submitted = {argv(line)[argv(line).index("--agent") + 1] for line in pasted_commands(examples) if "--agent" in line}
    agents = {path.stem for path in (REPO_ROOT / "agents").glob("*.yaml")}
    assert submitted == agents
    for agent, text in SAMPLE_TASKS:
        assert any(
            "--agent" in line and argv(line)[argv(line).index("--agent") + 1] == agent and text in argv(line)
            for line in pasted_commands(examples)
        ), f"make demo's {agent} task is not the one examples/README.md shows"


def test_the_readme_shows_the_example_client_as_it_is() -> None:
    shown = section(README.read_text(), "### Submitting from plain nats-py (no agentbus import)")
    assert code_blocks(shown, "python") == [PLAIN_CLIENT.read_text()]


def test_the_readme_names_only_files_that_exist() -> None:
    for document in (README, EXAMPLES_README):
        for target in re.findall(r"\]\(([^)#]+)\)", document.read_text()):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.name} links to a missing {target}"
        for line in pasted_commands(document.read_text()):
            for word in argv(line)[1:]:
                if word.startswith(("examples/", "config/", "agents/", "tools/")):
                    assert (REPO_ROOT / word).exists(), f"{document.name}: `{line}` names a missing {word}"
