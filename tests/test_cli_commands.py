"""The `agentbus` command line, run as a real process against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from agentbus.cli.config import NATS_URL_VARIABLE, read_env_file
from agentbus.cli.cost import format_report
from agentbus.cli.identities import ADMIN_USER, CredentialStore
from agentbus.cli.main import DEBUG_KEY, AgentbusGroup
from agentbus.cli.suite import SUITE_SERVICES, is_runnable
from agentbus.contracts.budget import CostReportReply, CostReportRow
from agentbus.contracts.registry import RUNNER_CANCELLATIONS
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import running_nats_server
from cli_support import (
    AGENTBUS,
    TRACEBACK,
    Suite,
    agentbus,
    agentbus_at_once,
    assert_one_line_error,
    prepare_folder,
    running_suite,
)
from click.testing import CliRunner
from helpers import AGENTS_DIR, new_task_id

UNREACHABLE = "nats://127.0.0.1:1"
SAMPLE_AGENTS = ("echo", "assistant", "ops", "support")


async def _agentbus(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # An empty folder by default: no ./.agentbus/env left by some `agentbus up` may change what a test runs.
    with tempfile.TemporaryDirectory() as empty:
        return await asyncio.to_thread(agentbus, *args, cwd=cwd or Path(empty), timeout=timeout)


def _runnable_services() -> list[str]:
    return [service for service, module, _ in SUITE_SERVICES if is_runnable(module)]


# --- against the in-process suite, on the session's server (no identities) --------------------------------


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
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{task_id}\n"
    assert "duplicate: this id was submitted before" in again.stderr
    # Waiting on a resubmitted id shows the events of the run that id started.
    rewait = await _agentbus(
        "submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "assistant",
        "--task-id", task_id, "--wait", text,
    )  # fmt: skip
    assert rewait.returncode == 0, rewait.stderr
    assert rewait.stdout == done.stdout


@pytest.mark.usefixtures("suite")
async def test_submit_without_wait_prints_the_task_id_once_and_nothing_else(
    bootstrapped_nats: NatsServerProcess,
) -> None:
    done = await _agentbus("submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "echo", "hi")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    assert re.fullmatch(r"task-[0-9a-f]{16}", task_id), done.stdout
    assert done.stdout == f"{task_id}\n"
    assert task_id not in done.stderr


@pytest.mark.usefixtures("suite")
async def test_submit_wait_exits_non_zero_on_rejected(bootstrapped_nats: NatsServerProcess) -> None:
    done = await _agentbus(
        "submit", "--nats-url", bootstrapped_nats.url, "--tenant", "acme", "--agent", "ghost", "--wait", "hi"
    )
    assert done.returncode == 1
    assert "unknown_agent" in done.stdout


async def test_events_of_an_unknown_task_fails_clearly(bootstrapped_nats: NatsServerProcess) -> None:
    done = await _agentbus("events", "--nats-url", bootstrapped_nats.url, "no-such-task")
    assert_one_line_error(done, 1, "no events for task no-such-task")


async def test_streams_apply_says_unchanged_when_nothing_changed_and_status_lists_every_durable(
    bootstrapped_nats: NatsServerProcess,
) -> None:
    url = bootstrapped_nats.url
    await _agentbus("streams", "apply", "--nats-url", url)
    nc = await connect_nats(url, "test")
    try:
        await nc.jetstream().delete_consumer(RUNNER_CANCELLATIONS.stream, RUNNER_CANCELLATIONS.durable)
    finally:
        await nc.close()
    repaired = await _agentbus("streams", "apply", "--nats-url", url)
    again = await _agentbus("streams", "apply", "--nats-url", url)
    assert repaired.returncode == again.returncode == 0, repaired.stderr + again.stderr
    actions = {" ".join(line.split()[:2]): line.split()[2] for line in repaired.stdout.splitlines()}
    assert actions[f"consumer {RUNNER_CANCELLATIONS.durable}"] == "created"
    assert actions["consumer agent-runner-submissions"] == "unchanged"
    assert {line.split()[2] for line in again.stdout.splitlines()} <= {"unchanged", "exists"}, again.stdout
    status = await _agentbus("status", "--nats-url", url)
    assert status.returncode == 0
    durables = {line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert {
        "agent-runner-submissions",
        "agent-runner-cancellations",
        "agent-runner-llm-results",
        "inference-worker-scripted",
    } <= durables


# --- what a newcomer types wrong ----------------------------------------------------------------------------


def test_help_and_version_answer_to_their_usual_spellings(tmp_path: Path) -> None:
    helps = [["-h"], ["--help"], ["submit", "-h"], ["approvals", "approve", "-h"], ["doctor", "-h"]]
    *answers, version = agentbus_at_once([*helps, ["--version"]], cwd=tmp_path)
    for done in answers:
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Usage: agentbus"), done.stdout
    assert "cancel" in answers[0].stdout
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"agentbus, version \d+\.\d+\.\d+\n", version.stdout), version.stdout


BAD_INPUT = [
    (["submit", "--tenant", "acme", "--agent", "echo", "--task-id", "bad id!", "hi"], "--task-id: use 1 to 64"),
    (["submit", "--tenant", "acme", "--agent", "echo", ""], "TASK_INPUT: must not be empty"),
    (["submit", "--tenant", "ac me", "--agent", "echo", "hi"], "--tenant: use 1 to 64"),
    (["submit", "--tenant", "acme", "--agent", "echo", "--budget-usd", "-1", "hi"], "--budget-usd"),
    (["cancel", "task 1", "--tenant", "acme"], "--task-id: use 1 to 64"),
    (["events", "no/such", "--tenant", "acme"], "TASK_ID: use 1 to 64"),
    (["approvals", "show", "a b"], "APPROVAL_ID: use 1 to 64"),
    (["approvals", "list", "--tenant", "a.b"], "--tenant: use 1 to 64"),
    (["approvals", "approve", "ap-1", "--as", "al ice"], "--as: use 1 to 64"),
    (["search", "acme", ""], "QUERY: must not be empty"),
    (["search", "a*", "refunds"], "TENANT: use 1 to 64"),
    (["search", "acme", "refunds", "--filter", "product name=x"], "FIELD is a letter or '_'"),
    (["ingest", "acme", "Makefile"], "only .md and .txt files are ingested"),
    (["cost", "report", "--since", "last week"], "neither an ISO date/time nor a span"),
]


def test_bad_input_is_one_usage_line_naming_the_option(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n")
    answers = agentbus_at_once([[*args, "--nats-url", UNREACHABLE] for args, _ in BAD_INPUT], cwd=tmp_path)
    for (args, expected), done in zip(BAD_INPUT, answers, strict=True):
        with _case(args):
            assert_one_line_error(done, 2, expected)


NEEDS_A_SERVER = [
    ["status"],
    ["streams", "apply"],
    ["submit", "--tenant", "acme", "--agent", "echo", "hi"],
    ["submit", "--tenant", "acme", "--agent", "echo", "--wait", "hi"],
    ["cancel", "task-1", "--tenant", "acme"],
    ["events", "task-1"],
    ["events", "task-1", "--tenant", "acme"],
    ["approvals", "list"],
    ["approvals", "show", "ap-1"],
    ["approvals", "approve", "ap-1", "--as", "alice"],
    ["approvals", "watch"],
    ["ingest", "acme", "notes.md"],
    ["search", "acme", "how do refunds work"],
    ["cost", "report", "--by", "model"],
]


def test_every_command_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# Notes\nSomething to index.\n")
    answers = agentbus_at_once([[*args, "--nats-url", UNREACHABLE] for args in NEEDS_A_SERVER], cwd=tmp_path)
    for args, done in zip(NEEDS_A_SERVER, answers, strict=True):
        with _case(args):
            assert_one_line_error(done, 1, f"cannot reach NATS at {UNREACHABLE}")


@contextlib.contextmanager
def _case(args: list[str]) -> Iterator[None]:
    """Name the command whose check failed (the commands of one test run together, each in its own process)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"agentbus {' '.join(args)}: {exc}") from exc


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback() -> None:
    @click.group(cls=AgentbusGroup)
    @click.option("--debug", is_flag=True)
    @click.pass_context
    def group(ctx: click.Context, debug: bool) -> None:
        ctx.meta[DEBUG_KEY] = debug

    @group.command()
    def boom() -> None:
        raise RuntimeError("the disk\nis full")

    quiet = CliRunner().invoke(group, ["boom"])
    assert quiet.exit_code == 1
    assert quiet.output.splitlines() == [
        "Error: RuntimeError: the disk is full (an unexpected error: `agentbus --debug boom ...` shows where)"
    ]
    loud = CliRunner().invoke(group, ["--debug", "boom"])
    assert isinstance(loud.exception, RuntimeError)


def test_a_cost_report_names_the_row_of_usage_without_a_model() -> None:
    reply = CostReportReply(
        by="model",
        rows=[CostReportRow(key="-", calls=2, cost_usd=0.002), CostReportRow(key="scripted", calls=3)],
        total_usd=0.002,
    )
    lines = format_report(reply).splitlines()
    assert [line.split()[0] for line in lines] == ["MODEL", "(no", "scripted", "TOTAL", "(no"]
    assert lines[1].startswith("(no model) ")
    assert lines[-1] == "(no model): tool calls, priced per call rather than by a model's tokens"
    plain = CostReportReply(by="model", rows=[CostReportRow(key="scripted", calls=3)])
    assert "(no model)" not in format_report(plain)


# --- `agentbus up`, with identities ----------------------------------------------------------------------------


def test_up_enforces_identities_runs_the_suite_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    prepare_folder(tmp_path, agents=("echo", "assistant"))
    state = tmp_path / ".agentbus"
    with running_suite(tmp_path) as up:
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
        done = up.run("submit", "--tenant", "acme", "--agent", "echo", "--wait", "hi")
        assert done.returncode == 0, done.stderr
        assert "completed" in done.stdout
        listed = up.run("approvals", "list")
        assert listed.returncode == 0, listed.stderr
        # A tenant with no submitter in identities.yaml cannot submit.
        stranger = up.run("submit", "--tenant", "globex", "--agent", "echo", "hi")
        assert_one_line_error(stranger, 2, "tenant 'globex' has no submitter")
        # A second `up` on the same state directory is refused, in one line.
        second = agentbus("up", cwd=tmp_path, timeout=60)
        assert_one_line_error(second, 1, "agentbus up is already running on")
    assert up.stop() == 0, up.stderr
    assert "users and permissions enforced" in up.stderr
    for service in _runnable_services():
        assert f"{service} stopped (0)" in up.stderr
    assert "nats-server stopped" in up.stderr


def test_up_attached_to_a_server_without_auth_runs_the_suite_anonymously(tmp_path: Path) -> None:
    prepare_folder(tmp_path, agents=("echo",))
    with running_nats_server(tmp_path / "bare") as bare, running_suite(tmp_path, "--nats-url", bare.url) as up:
        assert "AGENTBUS_CREDENTIALS_DIR" not in (tmp_path / ".agentbus" / "env").read_text()
        done = up.run("submit", "--tenant", "t1", "--agent", "echo", "--wait", "hi")
        assert done.returncode == 0, done.stderr
    assert up.process.returncode == 0, up.stderr
    assert not (tmp_path / ".agentbus" / "credentials").exists()


def test_up_stops_with_the_reason_a_service_cannot_start_and_exit_2(tmp_path: Path) -> None:
    prepare_folder(tmp_path, agents=("echo",))
    (tmp_path / "agents" / "bad.yaml").write_text("name: bad\nmodel: scripted\nsystem_prompt: x\nmax_steps: -3\n")
    done = agentbus("up", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert TRACEBACK not in done.stderr
    reason = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert reason == [
        f"agentbus up: agent-runner: cannot start: {tmp_path / 'agents' / 'bad.yaml'}: field 'max_steps': "
        "Input should be greater than or equal to 1"
    ], done.stderr
    assert "nats-server stopped" in done.stderr
    # Nothing is left holding the state directory: fixed, the suite starts.
    (tmp_path / "agents" / "bad.yaml").unlink()
    with running_suite(tmp_path) as up:
        assert up.run("submit", "--tenant", "acme", "--agent", "echo", "--wait", "hi").returncode == 0


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """One `agentbus up` (demo identities, the sample agents) for the tests that only use it."""
    cwd = tmp_path_factory.mktemp("up")
    prepare_folder(cwd, agents=SAMPLE_AGENTS)
    with running_suite(cwd) as suite:
        yield suite


@pytest.mark.timeout(240)
def test_ingest_checks_who_and_what_before_sending_then_indexes_each_file_once(up: Suite) -> None:
    assert_one_line_error(up.run("ingest", "globex", "examples/corpus/support"), 2, "tenant 'globex' has no submitter")
    assert_one_line_error(up.run("ingest", "acme", "config/prices.yaml"), 2, "only .md and .txt files are ingested")
    first = up.run("ingest", "acme", "examples/corpus/support", timeout=180)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "indexed 8 documents in 1 batches for tenant acme\n"
    # Ingesting the same folder again replaces its documents: each is found once, by its own id.
    again = up.run("ingest", "acme", "examples/corpus/support", timeout=180)
    assert again.returncode == 0, again.stderr
    found = up.run("search", "acme", "how do refunds work", "--top-k", "8")
    assert found.returncode == 0, found.stderr
    ids = re.findall(r"^\s*\d+\. (\S+)#\d+", found.stdout, flags=re.MULTILINE)
    assert ids[0] == "billing-refunds.md", found.stdout
    assert len(ids) == len(set(ids)), found.stdout
    assert "README" not in found.stdout


def test_the_support_agent_searches_the_question_it_is_asked(up: Suite) -> None:
    ingested = up.run("ingest", "acme", "examples/corpus/support", timeout=180)
    assert ingested.returncode == 0, ingested.stderr
    done = up.run("submit", "--tenant", "acme", "--agent", "support", "--wait", "How long does a refund take?")
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'search_knowledge_base({"query": "How long does a refund take?"})' in done.stdout
    assert "You asked" not in done.stdout
    assert "billing-refunds.md" in done.stdout


def test_cancel_stops_a_running_task(up: Suite) -> None:
    # A high-priority ticket waits for an approver: the task runs until someone decides, or cancels it.
    task_id = up.run(
        "submit", "--tenant", "acme", "--agent", "ops", 'create_ticket(title="disk full", priority="high")'
    ).stdout.strip()
    cancelled = up.run("cancel", task_id, "--tenant", "acme", "--reason", "fixed by hand")
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancellation of {task_id} sent as acme-app" in cancelled.stdout
    waited = up.run("submit", "--tenant", "acme", "--agent", "ops", "--task-id", task_id, "--wait", "x", timeout=60)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert re.search(r"cancelled\s+by acme-app fixed by hand", waited.stdout), waited.stdout


def test_a_budget_exceeded_says_what_the_call_needed(up: Suite) -> None:
    # create_ticket costs $0.001 a call (config/prices.yaml); the task may spend $0.0005.
    done = up.run(
        "submit", "--tenant", "acme", "--agent", "ops", "--budget-usd", "0.0005", "--wait",
        'create_ticket(title="printer jam", priority="low")',
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "budget_exceeded" in line)
    assert re.search(r"task:\S+: \$0\.000000 spent or held of \$0\.000500; the call needed ~\$0\.001000", line), line


# --- agentbus doctor ---------------------------------------------------------------------------------------


def _doctor(cwd: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    done = agentbus("doctor", cwd=cwd, timeout=60)
    assert TRACEBACK not in done.stdout + done.stderr
    return done, done.stdout.splitlines()


def test_doctor_finds_a_healthy_suite_healthy(up: Suite) -> None:
    done, lines = _doctor(up.cwd)
    assert done.returncode == 0, done.stdout
    assert lines[-1] == "all checks passed"
    subjects = {line.split()[1].rstrip(":") for line in lines[1:-1]}
    assert {"suite", "processes", "credentials", "identities", "nats", "topology", "consumers"} <= subjects
    for service in ("agent-runner", "tool-executor", "retriever", "cost-accountant"):
        assert any(line.startswith(f"ok    {service} (") for line in lines), done.stdout


async def test_doctor_says_what_to_do_about_each_problem(up: Suite) -> None:
    credential = up.state / "credentials" / "approver-bob.json"
    credential.chmod(0o644)
    admin = CredentialStore(up.state / "credentials").ensure(ADMIN_USER)
    nc = await connect_nats(
        read_env_file(up.state)[NATS_URL_VARIABLE], "test", user=admin.user, password=admin.password
    )
    try:
        await nc.jetstream().delete_consumer(RUNNER_CANCELLATIONS.stream, RUNNER_CANCELLATIONS.durable)
    finally:
        await nc.close()
    try:
        done, lines = await asyncio.to_thread(_doctor, up.cwd)
        assert done.returncode == 1, done.stdout
        assert f"FAIL  credentials: readable by others: {credential}" in lines
        assert f"      fix: chmod 600 {credential}" in lines
        assert (
            f"FAIL  topology: consumer {RUNNER_CANCELLATIONS.durable} on {RUNNER_CANCELLATIONS.stream} is missing"
            in lines
        )
        assert "      fix: run `agentbus streams apply` (`agentbus up` applies them when it starts)" in lines
        failures = [line for line in lines if line.startswith("FAIL")]
        assert lines[-1] == f"{len(failures)} problems found"
    finally:
        credential.chmod(0o600)
        await asyncio.to_thread(up.run, "streams", "apply")
    _, after = await asyncio.to_thread(_doctor, up.cwd)
    assert not [line for line in after if line.startswith(("FAIL  credentials", "FAIL  topology"))], after


def test_doctor_without_a_suite_says_how_to_start_one(tmp_path: Path) -> None:
    done, lines = _doctor(tmp_path)
    assert done.returncode == 1
    assert lines[1:] == [
        f"FAIL  state: no {tmp_path.resolve() / '.agentbus' / 'env'}: `agentbus up` has not run here",
        "      fix: run `agentbus up` in this folder, or point --state-dir at the one it uses",
        "1 problem found",
    ]


# --- when the suite goes away under a command -------------------------------------------------------------


def test_commands_waiting_on_a_suite_that_stops_end_in_one_line(tmp_path: Path) -> None:
    prepare_folder(tmp_path, agents=("ops",))
    with running_suite(tmp_path):
        waiting = subprocess.Popen(
            [AGENTBUS, "submit", "--tenant", "acme", "--agent", "ops", "--wait", "--timeout", "300",
             'create_ticket(title="db down", priority="high")'],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        watching = subprocess.Popen(
            [AGENTBUS, "approvals", "watch"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert waiting.stdout is not None
        assert watching.stderr is not None
        started = watching.stderr.readline()
        assert started.startswith("watching approvals of every tenant"), started
        # Once the task runs (it then waits for an approver), stop the suite under both commands.
        accepted = waiting.stdout.readline()
        assert accepted.split()[:2] == ["1", "accepted"], accepted
    for process in (waiting, watching):
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1, out + err
        assert TRACEBACK not in out + err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, err
        assert "lost the connection to NATS" in errors[0], err


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


def test_sigint_stops_approvals_watch_cleanly(up: Suite) -> None:
    watcher = subprocess.Popen(
        [AGENTBUS, "approvals", "watch"], cwd=up.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert watcher.stderr is not None
    assert watcher.stderr.readline().startswith("watching approvals of every tenant")
    watcher.send_signal(signal.SIGINT)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert err.strip() == "stopped", err
