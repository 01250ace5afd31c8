"""The recovery drill: tasks run (one finished, one waiting for an approval), `agentbus backup`, everything
destroyed, `agentbus restore` into a new folder, `agentbus up` there, the waiting call approved: it runs once,
the finished task's history, ledger and budget are intact."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_support import Suite, agentbus, assert_one_line_error, prepare_folder, running_suite
from helpers import new_task_id

TICKET = 'create_ticket(title="{title}", priority="high")'


def _pending_approval(up: Suite, task_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = up.run("approvals", "list", "--as", "alice", "--json")
        assert listed.returncode == 0, listed.stderr
        for line in listed.stdout.splitlines():
            request: dict[str, Any] = json.loads(line)
            if request["task_id"] == task_id:
                return request
        time.sleep(0.5)
    raise AssertionError(f"no approval of {task_id} within {timeout}s")


def _ended(up: Suite, task_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = up.run("events", task_id, "--tenant", "acme")
        if re.search(r"^\s*\d+ (completed|failed|cancelled|budget_exceeded)", shown.stdout, flags=re.MULTILINE):
            return shown.stdout
        time.sleep(0.5)
    raise AssertionError(f"{task_id} did not end within {timeout}s")


def _rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


@dataclass(frozen=True)
class TakenBackup:
    """A backup of a suite that ran one task to its end and left one waiting for an approval, then was
    destroyed: what the drill restores, and what the suite looked like when it was taken."""

    folder: Path
    finished: str
    waiting: str
    title: str
    approval_id: str
    history_before: str
    ledger_before: list[tuple[Any, ...]]


@pytest.fixture(scope="module")
def taken(tmp_path_factory: pytest.TempPathFactory) -> TakenBackup:
    root = tmp_path_factory.mktemp("backup")
    first, backup = root / "first", root / "backup"
    prepare_folder(first, agents=("echo", "ops"))
    finished, waiting = new_task_id("done"), new_task_id("waiting")
    title = f"restored {waiting}"
    with running_suite(first) as up:
        done = up.run("submit", "--tenant", "acme", "--agent", "echo", "--task-id", finished, "--wait", "hello")
        assert done.returncode == 0, done.stderr
        submitted = up.run(
            "submit", "--tenant", "acme", "--agent", "ops", "--task-id", waiting, TICKET.format(title=title)
        )
        assert submitted.returncode == 0, submitted.stderr
        approval = _pending_approval(up, waiting)
        history_before = up.run("events", finished, "--tenant", "acme").stdout
        made = up.run("backup", str(backup))
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith("backed up "), made.stdout
        # Taken while the suite runs: a second backup into the same folder is refused in one line.
        again = up.run("backup", str(backup))
        assert_one_line_error(again, 1, "exists and is not empty")
    ledger_before = _rows(first / ".agentbus" / "cost-accountant.db", "SELECT usage_id, cost_nanousd FROM ledger")
    assert ledger_before, "the finished task was priced"
    shutil.rmtree(first)  # everything: streams, databases, identities, credentials
    return TakenBackup(backup, finished, waiting, title, approval["approval_id"], history_before, ledger_before)


def test_a_restored_suite_finishes_the_waiting_task_once_with_its_history_and_ledger_intact(
    taken: TakenBackup, tmp_path: Path
) -> None:
    backup, second = taken.folder, tmp_path / "second"
    prepare_folder(second, agents=("echo", "ops"))
    manifest = json.loads((backup / "manifest.json").read_text())
    assert {"AGENTBUS_TASKS", "AGENTBUS_TASK_EVENTS", "KV_AGENTBUS_RUNS"} <= {s["name"] for s in manifest["streams"]}
    assert {"sql/tool-executor.db", "sql/cost-accountant.db"} <= {f["path"] for f in manifest["files"]}

    restored = agentbus("restore", str(backup), cwd=second, timeout=120)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith("restored "), restored.stdout
    # Restoring twice into the same folder would mix two histories: refused in one line.
    assert_one_line_error(agentbus("restore", str(backup), cwd=second, timeout=60), 1, "already holds")

    with running_suite(second) as up:
        assert up.run("events", taken.finished, "--tenant", "acme").stdout == taken.history_before
        decided = up.run("approvals", "approve", taken.approval_id, "--as", "alice", "--tenant", "acme")
        assert decided.returncode == 0, decided.stderr
        history = _ended(up, taken.waiting)
        assert re.search(r"^\s*\d+ completed", history, flags=re.MULTILINE), history
        state = second / ".agentbus"
        tickets = _rows(state / "tool-executor.db", f"SELECT count(*) FROM tickets WHERE title = '{taken.title}'")
        assert tickets == [(1,)]
        ledger_after = _rows(state / "cost-accountant.db", "SELECT usage_id, cost_nanousd FROM ledger")
        assert set(taken.ledger_before) <= set(ledger_after)
        usage_ids = [usage_id for usage_id, _ in ledger_after]
        assert len(usage_ids) == len(set(usage_ids)), "no usage record counted twice"


def test_a_damaged_backup_is_refused_before_anything_is_restored(taken: TakenBackup, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(taken.folder, backup)  # the drill's own copy stays whole
    snapshot = backup / "jetstream" / "AGENTBUS_TASK_EVENTS.snapshot"
    damaged = bytearray(snapshot.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(damaged))
    target = tmp_path / "elsewhere"
    target.mkdir()
    refused = agentbus("restore", str(backup), cwd=target, timeout=60)
    assert_one_line_error(refused, 1, "AGENTBUS_TASK_EVENTS.snapshot: checksum differs from the manifest")
    assert not (target / ".agentbus").exists()
