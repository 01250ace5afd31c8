"""`agentbus approvals`, run as a real process against `agentbus up` with identities enforced.

Approvals come from real tasks (the `ops` agent's high-priority tickets); approvers list them through the
tool-executor and hear its verdict on their decisions, as people do.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agentbus.cli.approvals import human_duration
from agentbus.contracts.approvals import arguments_sha256
from cli_support import AGENTBUS, TRACEBACK, Suite, assert_one_line_error, prepare_folder, running_suite
from helpers import new_task_id

IDENTITIES_YAML = """\
tenants:
  acme: {submitters: [acme-app], approvers: [alice, bob]}
  globex: {submitters: [globex-app], approvers: [carol]}
"""
TICKET = 'create_ticket(title="{title}", priority="high")'


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    cwd = tmp_path_factory.mktemp("approvals")
    prepare_folder(cwd, agents=("ops",), identities=IDENTITIES_YAML)
    with running_suite(cwd) as suite:
        yield suite


def _ticket(up: Suite, title: str, tenant: str = "acme") -> str:
    """Submit a high-priority ticket (it waits for an approver); its task id."""
    task_id = new_task_id("ticket")
    done = up.run(
        "submit", "--tenant", tenant, "--agent", "ops", "--task-id", task_id, TICKET.format(title=title)
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return task_id


def _approval_of(up: Suite, task_id: str, approver: str = "alice", timeout: float = 30) -> dict[str, Any]:
    """The pending approval of `task_id`, as `approver` lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = up.run("approvals", "list", "--as", approver, "--json")
        assert listed.returncode == 0, listed.stderr
        for line in listed.stdout.splitlines():
            request: dict[str, Any] = json.loads(line)
            if request["task_id"] == task_id:
                return request
        time.sleep(0.5)
    raise AssertionError(f"no approval of {task_id} listed for {approver} within {timeout}s")


def _events_until_done(up: Suite, task_id: str, tenant: str = "acme", timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = up.run("events", task_id, "--tenant", tenant)
        if re.search(r"^\s*\d+ (completed|failed|cancelled|budget_exceeded)", shown.stdout, flags=re.MULTILINE):
            return shown.stdout
        time.sleep(0.5)
    raise AssertionError(f"{task_id} did not end within {timeout}s")


def test_list_and_show_print_tool_arguments_risk_age_and_expiry(up: Suite) -> None:
    task_id = _ticket(up, "disk full on db-1")
    elsewhere = _ticket(up, "globex outage", tenant="globex")
    waiting = _approval_of(up, task_id)
    foreign = _approval_of(up, elsewhere, approver="carol")

    as_alice = up.run("approvals", "list", "--as", "alice")
    assert as_alice.returncode == 0, as_alice.stderr
    header, *rows = as_alice.stdout.splitlines()
    assert header.split() == ["ID", "TENANT", "TOOL", "RISK", "AGE", "EXPIRES", "ARGUMENTS"]
    row = next(r for r in rows if r.startswith(waiting["approval_id"]))
    assert re.search(
        r"acme\s+create_ticket\s+high\s+\d+s\s+in 23h 59m\s+\{\"title\":\"disk full on db-1\",\"priority\":\"high\"\}",
        row,
    ), row
    assert foreign["approval_id"] not in as_alice.stdout, "alice approves for acme only"

    as_operator = up.run("approvals", "list", "--all")
    assert as_operator.returncode == 0, as_operator.stderr
    assert foreign["approval_id"] in as_operator.stdout
    assert as_operator.stdout.splitlines()[0].split()[-1] == "STATUS"

    shown = up.run("approvals", "show", waiting["approval_id"], "--as", "bob")
    assert shown.returncode == 0, shown.stderr
    assert f"sha256     {arguments_sha256(waiting['arguments'])}" in shown.stdout
    assert "status     pending" in shown.stdout
    assert f"task       {task_id}" in shown.stdout
    assert '"title": "disk full on db-1"' in shown.stdout


def test_approve_sends_the_hash_it_shows_and_the_tool_runs(up: Suite) -> None:
    task_id = _ticket(up, "certificate expires tonight")
    request = _approval_of(up, task_id)
    sent = up.run("approvals", "approve", request["approval_id"], "--as", "alice", "--reason", "renewing now")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"arguments_sha256 {arguments_sha256(request['arguments'])}" in sent.stdout
    assert sent.stdout.splitlines()[-1] == f"approved {request['approval_id']} as alice: accepted"

    events = _events_until_done(up, task_id)
    assert re.search(rf"approval_resolved\s+{request['approval_id']} approved", events), events
    assert re.search(r"\d+ completed .*create_ticket\(title='certificate expires tonight'", events), events

    again = up.run("approvals", "approve", request["approval_id"], "--as", "bob")
    assert_one_line_error(again, 1, f"approval {request['approval_id']} is not pending: approved by alice")
    shown = up.run("approvals", "show", request["approval_id"], "--as", "bob")
    assert re.search(r"^status\s+approved by alice at ", shown.stdout, flags=re.MULTILINE), shown.stdout


def test_deny_tells_the_model_and_the_task_ends(up: Suite) -> None:
    task_id = _ticket(up, "restart everything")
    request = _approval_of(up, task_id, approver="bob")
    denied = up.run("approvals", "deny", request["approval_id"], "--as", "bob", "--reason", "not during peak")
    assert denied.returncode == 0, denied.stdout + denied.stderr
    assert denied.stdout.splitlines()[-1] == f"denied {request['approval_id']} as bob: accepted"
    events = _events_until_done(up, task_id)
    assert re.search(rf"approval_resolved\s+{request['approval_id']} denied", events), events


def test_decisions_that_cannot_be_made_exit_1_and_usage_errors_exit_2(up: Suite) -> None:
    task_id = _ticket(up, "noisy alerts")
    request = _approval_of(up, task_id)

    unknown = up.run("approvals", "approve", "ap-nope", "--as", "alice")
    assert_one_line_error(unknown, 1, "no approval ap-nope of tenant(s) acme")
    # carol approves for globex only: the server will not even let her list acme's approvals.
    foreign = up.run("approvals", "approve", request["approval_id"], "--as", "carol", "--tenant", "acme")
    assert_one_line_error(foreign, 1, "refused by NATS")
    nobody = up.run("approvals", "approve", request["approval_id"])
    assert_one_line_error(nobody, 2, "Missing option '--as'")
    stranger = up.run("approvals", "approve", request["approval_id"], "--as", "mallory")
    assert_one_line_error(stranger, 2, "no credentials for NATS user 'approver-mallory'")
    # None of these decided anything.
    assert "status     pending" in up.run("approvals", "show", request["approval_id"], "--as", "alice").stdout


def test_watch_prints_new_and_resolved_approvals_until_interrupted(up: Suite) -> None:
    watcher = subprocess.Popen(
        [AGENTBUS, "approvals", "watch", "--as", "bob"],
        cwd=up.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        assert watcher.stdout is not None
        started = watcher.stderr.readline()
        assert started.startswith("watching approvals of acme"), started
        _ticket(up, "globex only", tenant="globex")
        task_id = _ticket(up, "watched ticket")
        request = _approval_of(up, task_id, approver="bob")
        approved = up.run("approvals", "approve", request["approval_id"], "--as", "alice")
        assert approved.returncode == 0, approved.stdout + approved.stderr
        lines = [watcher.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"pending   {request['approval_id']} tenant=acme tool=create_ticket risk=high"), (
            lines
        )
        assert lines[1].startswith(f"resolved  {request['approval_id']} tenant=acme approved by alice"), lines
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "globex" not in out
    assert TRACEBACK not in err


def test_durations_read_in_human_units() -> None:
    assert [human_duration(s) for s in (-3, 0, 59, 60, 3599, 3600, 3660, 86399, 90000, 172800)] == [
        "0s",
        "0s",
        "59s",
        "1m",
        "59m",
        "1h",
        "1h 1m",
        "23h 59m",
        "1d 1h",
        "2d",
    ]
