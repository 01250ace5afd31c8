"""The chaos suite: mixed tasks through the real suite while its processes are killed and paused.

`agentbus up` runs in a state directory of its own (identities enforced, every service its own process,
supervised). A driver submits N tasks as a submitter — one-step and multi-step tasks, tickets that need an
approval (approved or denied by an approver), tickets that need none, cancellations (of a running task
and of one waiting for approval), resubmissions of a task id (with the same and with a different input)
and malformed submissions — while a fault injector SIGKILLs and SIGSTOPs random services and nats-server,
takes the cost-accountant and the tool-executor away for a long outage each, and kills nats-server twice.
When the faults stop and every task has ended, it checks and prints the invariants:

- lost: a valid submission with no terminal event (or none at all), or a valid submission dead-lettered;
- stuck: an accepted task with no terminal event, or with more than one;
- gaps: event seq not 1..n;
- dup_effects: more than one ticket for a task; wrong_input: a resubmitted id that ran its second input;
- unapproved: a ticket that needed approval without an approved approval in the task's events, or any
  ticket of a task whose approval was denied or never given;
- cost_mismatch: a completed task whose `cost_usd` differs from its ledger total;
- leaked_reservations: a reservation still open after every task ended;
- missing_traces: a task that ended without its root span exported.

    uv run python tests/chaos.py                       # one run of 200 tasks and at least 30 faults
    uv run python tests/chaos.py --runs 10 --tasks 200 # what `make chaos` runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
from agentbus.cli.config import read_env_file
from agentbus.cli.identities import ADMIN_USER, CredentialStore, approver_user, submitter_user
from agentbus.cli.suite import PIDS_FILE_NAME
from agentbus.contracts import registry
from agentbus.contracts.approvals import ApprovalDecision, ApprovalsListReply, ApprovalsListRequest
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVALS_LIST,
    DEAD_LETTERS,
    TASK_CANCEL,
    TASK_EVENT,
    TASK_EVENTS,
    TASK_SUBMIT,
    TASKS,
    Service,
)
from agentbus.contracts.tasks import TERMINAL_EVENT_KINDS, TaskSubmitted
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import configure_logging
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
TENANT = "acme"
SUBMITTER = "acme-app"
APPROVERS = ("alice", "bob")
SERVICES = tuple(service.value for service in Service)
NATS_SERVER = "nats-server"

# Short timings, so that a run re-drives and recovers within its settle time.
SUITE_ENVIRONMENT = {
    "AGENTBUS_RUNNER_REDRIVE_SECONDS": "5",
    "AGENTBUS_RUNNER_DEFAULT_DEADLINE_SECONDS": "900",
    "AGENTBUS_EXECUTOR_EXPIRY_SWEEP_SECONDS": "2",
    "AGENTBUS_RUNNER_LOG_LEVEL": "WARNING",
    "AGENTBUS_WORKER_LOG_LEVEL": "WARNING",
    "AGENTBUS_EXECUTOR_LOG_LEVEL": "WARNING",
    "AGENTBUS_ACCOUNTANT_LOG_LEVEL": "WARNING",
    "AGENTBUS_RETRIEVER_LOG_LEVEL": "WARNING",
    "AGENTBUS_TRACES_LOG_LEVEL": "WARNING",
    "AGENTBUS_TRACES_FLUSH_INTERVAL_SECONDS": "0.5",
}


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class PlannedTask:
    """One task of a run and what the driver does with it."""

    task_id: str
    kind: str
    agent: str
    text: str
    valid: bool = True
    approve: bool | None = None
    """Tickets that need approval: approve (True) or deny (False)."""
    cancel: str | None = None
    """"soon": cancel right after submitting; "pending": cancel while it waits for approval."""
    resubmit: str | None = None
    """"same": submit the same task again; "other": the same id with another input (which must not run)."""
    ticket_expected: bool = False
    raw: bytes | None = None
    """Malformed submissions: the exact bytes."""


def plan(count: int, rng: random.Random, run: str) -> list[PlannedTask]:
    kinds = [
        ("one_step", 20),
        ("multi_step", 20),
        ("ticket_approved", 14),
        ("ticket_denied", 8),
        ("ticket_low", 10),
        ("cancel_pending", 6),
        ("cancel_soon", 6),
        ("resubmit_same", 5),
        ("resubmit_other", 5),
        ("malformed", 6),
    ]
    tasks = []
    for index in range(count):
        kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        task_id = f"chaos-{run}-{index:04d}"
        marker = f"{task_id}-first"
        if kind in ("one_step", "resubmit_same", "resubmit_other"):
            task = PlannedTask(task_id, kind, "echo", f"Restate {marker}")
            task.resubmit = {"resubmit_same": "same", "resubmit_other": "other"}.get(kind)
        elif kind in ("multi_step", "cancel_soon"):
            text = f"{marker}: calculator({index}*7) and word_count(one two three)"
            task = PlannedTask(task_id, kind, "assistant", text, cancel="soon" if kind == "cancel_soon" else None)
        elif kind == "ticket_low":
            text = f'create_ticket(title="{marker}", priority="low")'
            task = PlannedTask(task_id, kind, "ops", text, ticket_expected=True)
        elif kind == "malformed":
            # Not JSON at all (the task id only in Nats-Msg-Id), or JSON without an input: both are rejected.
            raw = b"not json {" if index % 2 else json.dumps({"task_id": task_id, "tenant": TENANT}).encode()
            task = PlannedTask(task_id, kind, "echo", "", valid=False, raw=raw)
        else:
            text = f'create_ticket(title="{marker}", priority="high")'
            task = PlannedTask(task_id, kind, "ops", text)
            if kind == "ticket_approved":
                task.approve, task.ticket_expected = True, True
            elif kind == "ticket_denied":
                task.approve = False
            else:
                task.cancel = "pending"
        tasks.append(task)
    return tasks


# --- the suite under test -----------------------------------------------------------------------


class SuiteProcess:
    """`agentbus up` in its own state directory, as a person runs it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "up.log"

    def start(self, timeout: float = 120.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **SUITE_ENVIRONMENT}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentbus.cli.main", "up", "--state-dir", str(self.state_dir)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agentbus up exited with {self.process.returncode}; see {self.log}")
            if b"agentbus up: ready" in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"agentbus up not ready after {timeout}s; see {self.log}")

    def pids(self) -> dict[str, int]:
        try:
            pids: dict[str, int] = json.loads((self.state_dir / PIDS_FILE_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return pids

    @property
    def nats_url(self) -> str:
        return read_env_file(self.state_dir)["AGENTBUS_NATS_URL"]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for pid in self.pids().values():  # nothing may stay paused, or it would never drain
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# --- faults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float
    action: str  # kill | pause
    target: str
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.action} {self.target}" + (f" for {self.seconds:g}s" if self.seconds else "")


def fault_schedule(count: int, duration: float, outage_seconds: float, rng: random.Random) -> list[Fault]:
    """`count` faults spread over `duration`: two nats-server kills, a long outage of the accountant and of
    the executor, and random kills and pauses of every process."""
    slots = sorted(rng.uniform(2.0, duration) for _ in range(count))
    faults = [
        Fault(slots[count // 4], "kill", NATS_SERVER),
        Fault(slots[(3 * count) // 4], "kill", NATS_SERVER),
        Fault(slots[count // 3], "pause", Service.COST_ACCOUNTANT.value, outage_seconds),
        Fault(slots[(2 * count) // 3], "pause", Service.TOOL_EXECUTOR.value, outage_seconds),
    ]
    taken = {count // 4, (3 * count) // 4, count // 3, (2 * count) // 3}
    for index, at in enumerate(slots):
        if index in taken:
            continue
        target = rng.choice((*SERVICES, NATS_SERVER))
        if rng.random() < 0.55:
            faults.append(Fault(at, "kill", target))
        else:
            faults.append(Fault(at, "pause", target, rng.uniform(1.0, 5.0)))
    return sorted(faults, key=lambda f: f.at)


async def inject(suite: SuiteProcess, faults: list[Fault], started: float, log: Callable[[str], None]) -> int:
    done = 0
    paused: list[asyncio.Task[None]] = []
    for fault in faults:
        await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
        target = fault.target
        pid = suite.pids().get(target)
        for _ in range(4):  # the target may be between a death and its restart: wait for it a moment
            if pid is not None and _alive(pid):
                break
            await asyncio.sleep(0.5)
            pid = suite.pids().get(target)
        else:
            # Still down (its restarts are backing off): the fault goes to another process instead.
            alive = [(name, p) for name, p in suite.pids().items() if _alive(p)]
            if not alive:
                continue
            target, pid = random.choice(alive)
            fault = Fault(fault.at, fault.action, target, fault.seconds)
        try:
            if fault.action == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGSTOP)
                paused.append(asyncio.create_task(_resume(pid, fault.seconds)))
        except ProcessLookupError:
            continue
        done += 1
        log(f"fault {done}: {fault}")
    await asyncio.gather(*paused)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _resume(pid: int, seconds: float) -> None:
    await asyncio.sleep(seconds)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class Driver:
    """Submits, cancels and resubmits as the submitter; decides approvals as the approvers."""

    submitter: NatsClient
    approvers: dict[str, NatsClient]
    tasks: dict[str, PlannedTask]
    rng: random.Random
    decided: dict[str, float] = field(default_factory=dict)
    approvals: dict[str, str] = field(default_factory=dict)
    """approval id -> task id, as the approvals were seen."""

    async def _publish(self, subject: str, payload: bytes, msg_id: str | None) -> None:
        # NATS may be down this very moment: a client retries, and the task id makes a retry harmless.
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        for attempt in range(120):
            try:
                await self.submitter.jetstream().publish(subject, payload, headers=headers, timeout=2)
                return
            except Exception:
                await asyncio.sleep(min(0.25 * (attempt + 1), 2.0))
        raise RuntimeError(f"could not publish on {subject} for a minute")

    async def submit(self, task: PlannedTask) -> None:
        subject = TASK_SUBMIT.format(tenant=TENANT, submitter=SUBMITTER)
        if task.raw is not None:
            await self._publish(subject, task.raw, task.task_id)
            return
        body = TaskSubmitted(task_id=task.task_id, tenant=TENANT, agent=task.agent, input=task.text)
        await self._publish(subject, body.model_dump_json().encode(), task.task_id)
        if task.resubmit is not None:
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))
            text = task.text if task.resubmit == "same" else task.text.replace("-first", "-second")
            again = body.model_copy(update={"input": text})
            await self._publish(subject, again.model_dump_json().encode(), task.task_id)
        if task.cancel == "soon":
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            await self.cancel(task)

    async def cancel(self, task: PlannedTask) -> None:
        cancel = json.dumps({"task_id": task.task_id, "tenant": TENANT, "reason": "chaos"}).encode()
        await self._publish(TASK_CANCEL.format(tenant=TENANT, submitter=SUBMITTER), cancel, None)

    async def decide_pending(self) -> None:
        """Answer what waits, as the plan says: listed through the executor, decided by a random approver."""
        name = self.rng.choice(APPROVERS)
        nc = self.approvers[name]
        request = ApprovalsListRequest(include_resolved=False)
        try:
            msg = await nc.request(APPROVALS_LIST.format(tenant=TENANT), request.model_dump_json().encode(), timeout=3)
            reply = ApprovalsListReply.model_validate_json(msg.data)
        except Exception:
            return  # the executor (or NATS) is away: ask again later
        for entry in reply.approvals:
            approval = entry.request
            task = self.tasks.get(approval.task_id)
            if task is None:
                continue
            self.approvals[approval.approval_id] = approval.task_id
            if task.cancel == "pending":
                if time.monotonic() - self.decided.get(approval.approval_id, 0.0) > 10:
                    self.decided[approval.approval_id] = time.monotonic()
                    await self.cancel(task)
                continue
            if task.approve is None or time.monotonic() - self.decided.get(approval.approval_id, 0.0) < 10:
                continue
            decision = ApprovalDecision(
                approval_id=approval.approval_id,
                decision="approve" if task.approve else "deny",
                approver=name,
                arguments_sha256=approval.arguments_sha256,
                reason="chaos drill",
            )
            subject = APPROVAL_DECISION.format(tenant=TENANT, approver=name)
            with contextlib.suppress(Exception):
                await nc.jetstream().publish(subject, decision.model_dump_json().encode(), timeout=2)
                self.decided[approval.approval_id] = time.monotonic()


# --- the invariants -----------------------------------------------------------------------------


def task_span_id(task_id: str) -> str:
    return hashlib.sha256(f"{TENANT}.{task_id}:task".encode()).hexdigest()[:16]


_T = TypeVar("_T")
_ADMIN_READ_ATTEMPTS = 5


async def _read_again_on_timeout(read: Callable[[], Awaitable[_T]]) -> _T:
    """One of the driver's own reads of the server. A machine loaded by the suite (and whatever else shares
    it) can make a request time out: ask again rather than end the run, and say so if it never answers."""
    for attempt in range(_ADMIN_READ_ATTEMPTS):
        try:
            return await read()
        except (nats.errors.TimeoutError, TimeoutError):
            if attempt == _ADMIN_READ_ATTEMPTS - 1:
                raise
            await asyncio.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


async def _read_stream(admin: NatsClient, stream: str, subject: str) -> list[bytes]:
    """Every message stored in `stream` under `subject`, in order. Waits out a slow delivery (a loaded
    machine) instead of returning a short read, which would count stored events as lost."""
    js = admin.jetstream()
    info = await _read_again_on_timeout(lambda: js.stream_info(stream, subjects_filter=subject))
    if not sum((info.state.subjects or {}).values()):
        return []
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    payloads: list[bytes] = []
    try:
        while True:
            msg = await _read_again_on_timeout(lambda: sub.next_msg(timeout=3))
            payloads.append(msg.data)
            if msg.metadata.num_pending == 0:
                return payloads
    finally:
        await sub.unsubscribe()


async def stored_events(admin: NatsClient) -> dict[str, list[dict[str, Any]]]:
    """Every task event in the stream, by task id, in order (read as the operator)."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    subject = TASK_EVENT.pattern.format(tenant=TENANT, task_id="*")
    for payload in await _read_stream(admin, TASK_EVENTS.name, subject):
        event = json.loads(payload)
        events[event["task_id"]].append(event)
    return events


async def dead_letters(admin: NatsClient) -> list[DeadLetter]:
    payloads = await _read_stream(admin, DEAD_LETTERS.name, "agentbus.deadletter.>")
    return [DeadLetter.model_validate_json(payload) for payload in payloads]


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql).fetchall()


TICKETS_SQL = "SELECT task_id, title FROM tickets"
LEDGER_SQL = "SELECT task_id, SUM(cost_nanousd) FROM ledger GROUP BY task_id"
OPEN_RESERVATIONS_SQL = "SELECT reservation_id FROM reservations WHERE status = 'open'"


@dataclass
class Stores:
    """What the invariants read besides the streams: the executor's tickets, the accountant's ledger and open
    reservations, and the span ids the trace exporters wrote."""

    tickets: list[tuple[str, str]]
    """(task id, title) of every ticket made."""
    ledger: dict[str, int]
    """Task id -> its ledger total in nano-USD."""
    open_reservations: list[str]
    exported_spans: set[str]


def exported_span_ids(files: list[Path]) -> set[str]:
    """The span ids in the trace exporters' JSONL files."""
    exported: set[str] = set()
    for path in files:
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    exported.add(json.loads(line).get("span_id", ""))
    return exported


def sqlite_stores(state_dir: Path) -> Stores:
    """The stores of `agentbus up` in `state_dir`: SQLite files and one JSONL file."""
    executor, accountant = state_dir / "tool-executor.db", state_dir / "cost-accountant.db"
    return Stores(
        tickets=[(task_id, title) for task_id, title in _query(executor, TICKETS_SQL)],
        ledger={task_id: int(total or 0) for task_id, total in _query(accountant, LEDGER_SQL)},
        open_reservations=[reservation_id for (reservation_id,) in _query(accountant, OPEN_RESERVATIONS_SQL)],
        exported_spans=exported_span_ids([state_dir / "traces.jsonl"]),
    )


@dataclass
class Verdict:
    counts: Counter[str]
    details: list[str]


def check(
    tasks: dict[str, PlannedTask],
    events: dict[str, list[dict[str, Any]]],
    letters: list[DeadLetter],
    stores: Stores,
) -> Verdict:
    counts: Counter[str] = Counter()
    details: list[str] = []

    def count(name: str, detail: str) -> None:
        counts[name] += 1
        if len(details) < 40:
            details.append(f"{name}: {detail}")

    tickets: Counter[str] = Counter(task_id for task_id, _ in stores.tickets)
    ledger = stores.ledger
    exported = stores.exported_spans

    for letter in letters:
        if letter.stream != TASKS.name:
            continue
        with contextlib.suppress(ValueError):
            TaskSubmitted.model_validate_json(letter.payload)
            count("lost", f"a valid submission was dead-lettered: {letter.error.code}: {letter.error.message}")

    for task_id, task in tasks.items():
        stream = [e for e in events.get(task_id, []) if e["kind"] != "token"]
        kinds = [e["kind"] for e in stream]
        terminal = [k for k in kinds if k in TERMINAL_EVENT_KINDS]
        if not task.valid:
            if terminal != ["rejected"]:
                count("lost", f"{task_id} (malformed) was not rejected once: {terminal}")
            continue
        if not stream:
            count("lost", f"{task_id} ({task.kind}) has no event at all")
            continue
        if len(terminal) != 1:
            count("stuck", f"{task_id} ({task.kind}) terminal events {terminal}; events {kinds}")
            continue
        seqs = [e["seq"] for e in stream]
        if seqs != list(range(1, len(seqs) + 1)):
            count("gaps", f"{task_id} seq {seqs}")
        outcome = terminal[0]
        resolutions = [e.get("outcome") for e in stream if e["kind"] == "approval_resolved"]
        made = tickets.get(task_id, 0)
        if made > 1:
            count("dup_effects", f"{task_id} has {made} tickets")
        if made and task.kind != "ticket_low" and "approved" not in resolutions:
            count("unapproved", f"{task_id} ({task.kind}) has a ticket; approvals {resolutions}")
        if task.kind == "ticket_denied" and made:
            count("unapproved", f"{task_id} was denied and still has a ticket")
        if task.resubmit == "other" and outcome == "completed":
            output = stream[-1].get("output", "")
            if "-second" in output:
                count("wrong_input", f"{task_id} ran its resubmitted input")
        if outcome == "completed":
            if task.ticket_expected and made != 1:
                count("lost", f"{task_id} completed with {made} tickets")
            cost = round(stream[-1].get("cost_usd", 0.0) * 1_000_000_000)
            if cost != int(ledger.get(task_id, 0) or 0):
                count("cost_mismatch", f"{task_id} cost_usd {cost} nano != ledger {ledger.get(task_id)}")
        elif task.kind in ("one_step", "multi_step", "ticket_low", "ticket_approved", "resubmit_same"):
            count("lost", f"{task_id} ({task.kind}) ended {outcome}: {stream[-1].get('error')}")
        if "accepted" in kinds and task_span_id(task_id) not in exported:
            # Every run that started has its trace; a task cancelled before it started never ran.
            count("missing_traces", f"{task_id} ({outcome})")
    for reservation_id in stores.open_reservations:
        count("leaked_reservations", reservation_id)
    return Verdict(counts, details)


INVARIANTS = (
    "lost",
    "stuck",
    "gaps",
    "dup_effects",
    "wrong_input",
    "unapproved",
    "cost_mismatch",
    "leaked_reservations",
    "missing_traces",
)


# --- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    tasks: int
    faults: int
    verdict: Verdict
    seconds: float

    @property
    def clean(self) -> bool:
        return not any(self.verdict.counts[name] for name in INVARIANTS)

    def line(self) -> str:
        figures = " ".join(f"{name}={self.verdict.counts[name]}" for name in INVARIANTS)
        return f"chaos: {self.tasks} tasks, {self.faults} faults, {figures}"


async def _connect(url: str, credentials: CredentialStore, user: str) -> NatsClient:
    credential = credentials.ensure(user)
    return await connect_nats(url, f"chaos-{user}", user=credential.user, password=credential.password)


async def _quiesce(admin: NatsClient, timeout: float) -> None:
    """Wait until no durable consumer of the suite has work pending or unacknowledged."""
    js = admin.jetstream()
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        busy = []
        for consumer in registry.consumers():
            with contextlib.suppress(Exception):
                info = await js.consumer_info(consumer.stream, consumer.durable)
                if (info.num_pending or 0) + (info.num_ack_pending or 0):
                    busy.append(consumer.durable)
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 3:
            return
        await asyncio.sleep(1)


async def _settle(
    admin: NatsClient, tasks: dict[str, PlannedTask], timeout: float, driver: Driver
) -> dict[str, list[dict[str, Any]]]:
    """Wait until every valid task has a terminal event (answering approvals meanwhile), or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        await driver.decide_pending()
        events = await stored_events(admin)
        waiting = [
            t for t in tasks if tasks[t].valid and not any(e["kind"] in TERMINAL_EVENT_KINDS for e in events.get(t, []))
        ]
        if not waiting or time.monotonic() > deadline:
            return events
        await asyncio.sleep(2)


async def run_once(
    tasks_count: int,
    faults_count: int,
    seed: int,
    *,
    outage_seconds: float = 12.0,
    settle_timeout: float = 300.0,
    keep: Path | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> RunResult:
    rng = random.Random(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentbus-chaos-") as temporary:
        state_dir = (keep or Path(temporary)) / f"run-{seed}"
        suite = SuiteProcess(state_dir)
        suite.start()
        credentials = CredentialStore(state_dir / "credentials")
        url = suite.nats_url
        admin = await _connect(url, credentials, ADMIN_USER)
        submitter = await _connect(url, credentials, submitter_user(SUBMITTER))
        approvers = {name: await _connect(url, credentials, approver_user(name)) for name in APPROVERS}
        planned = plan(tasks_count, rng, str(seed))
        tasks = {task.task_id: task for task in planned}
        driver = Driver(submitter, approvers, tasks, rng)
        duration = max(20.0, faults_count * 2.5)
        faults = fault_schedule(faults_count, duration, outage_seconds, rng)
        try:
            log(f"run {seed}: {tasks_count} tasks over ~{duration:.0f}s with {len(faults)} faults ({state_dir})")
            injector = asyncio.create_task(inject(suite, faults, time.monotonic(), log))

            async def approve_meanwhile() -> None:
                while not injector.done():
                    await driver.decide_pending()
                    await asyncio.sleep(1.0)

            approving = asyncio.create_task(approve_meanwhile())
            gap = duration / max(tasks_count, 1)
            submissions: list[Awaitable[None]] = []
            for task in planned:
                submissions.append(asyncio.create_task(driver.submit(task)))
                await asyncio.sleep(rng.uniform(0, 2 * gap))
            await asyncio.gather(*submissions)
            injected = await injector
            await approving
            log(f"run {seed}: faults over ({injected}); waiting for every task to end")
            events = await _settle(admin, tasks, settle_timeout, driver)
            # Closing budgets, pricing usage and exporting spans finish after the last event (a service the
            # faults restarted several times may still be in its restart backoff): wait for the queues.
            await _quiesce(admin, settle_timeout)
            letters = await dead_letters(admin)
        finally:
            for nc in (admin, submitter, *approvers.values()):
                with contextlib.suppress(Exception):
                    await nc.close()
            suite.stop()
        verdict = check(tasks, events, letters, sqlite_stores(state_dir))
    return RunResult(tasks_count, injected, verdict, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--outage-seconds", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=None, help="First run's seed (each run adds one).")
    parser.add_argument("--keep", type=Path, default=None, help="Keep each run's state directory under here.")
    args = parser.parse_args()
    configure_logging("ERROR", "chaos")  # the driver's own reconnects are expected: its faults cause them
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    clean = True
    for run in range(args.runs):
        result = asyncio.run(
            run_once(args.tasks, args.faults, first + run, outage_seconds=args.outage_seconds, keep=args.keep)
        )
        for detail in result.verdict.details:
            print(f"  {detail}", file=sys.stderr)
        print(f"{result.line()} ({result.seconds:.0f}s, seed {first + run})", flush=True)
        clean = clean and result.clean
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
