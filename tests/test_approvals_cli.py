"""`agentbus approvals`, run as a real process against a server that enforces identities."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from agentbus.cli.approvals import human_duration
from agentbus.cli.config import CREDENTIALS_DIR_VARIABLE, IDENTITIES_FILE_VARIABLE, NATS_URL_VARIABLE
from agentbus.cli.identities import ADMIN_USER, CredentialStore, load_identities, service_user
from agentbus.cli.permissions import nats_users
from agentbus.contracts.approvals import ApprovalDecision, ApprovalRequested, ApprovalResolved
from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_DECISIONS,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    Header,
    Service,
)
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import nats_server_or_skip
from helpers import new_task_id
from nats.aio.client import Client as NatsClient

AGENTBUS = str(Path(sys.executable).parent / "agentbus")
Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]
IDENTITIES_YAML = """\
tenants:
  acme: {submitters: [acme-app], approvers: [alice, bob]}
  globex: {submitters: [globex-app], approvers: [carol]}
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `agentbus up` leaves in its state directory: identities and credentials."""
    directory = tmp_path_factory.mktemp("state")
    (directory / "identities.yaml").write_text(IDENTITIES_YAML)
    return directory


@pytest.fixture(scope="module")
def server(state: Path) -> Iterator[NatsServerProcess]:
    users = nats_users(load_identities(state / "identities.yaml"), CredentialStore(state / "credentials"))
    with nats_server_or_skip(state / "nats", users=users) as running:
        yield running


@pytest_asyncio.fixture(scope="module")
async def executor(server: NatsServerProcess, state: Path) -> AsyncIterator[NatsClient]:
    """The topology applied by admin, and a connection as the tool-executor: the one who asks for approval."""
    store = CredentialStore(state / "credentials")
    admin = store.ensure(ADMIN_USER)
    nc = await connect_nats(server.url, "bootstrap", user=admin.user, password=admin.password)
    await apply_topology(nc.jetstream())
    await nc.close()
    user = store.ensure(service_user(Service.TOOL_EXECUTOR))
    nc = await connect_nats(server.url, "tool-executor", user=user.user, password=user.password)
    yield nc
    await nc.close()


@pytest_asyncio.fixture
async def admin(server: NatsServerProcess, state: Path) -> AsyncIterator[NatsClient]:
    credential = CredentialStore(state / "credentials").ensure(ADMIN_USER)
    nc = await connect_nats(server.url, "admin", user=credential.user, password=credential.password)
    yield nc
    await nc.close()


def _environment(server: NatsServerProcess, state: Path) -> dict[str, str]:
    return {
        **os.environ,
        NATS_URL_VARIABLE: server.url,
        CREDENTIALS_DIR_VARIABLE: str(state / "credentials"),
        IDENTITIES_FILE_VARIABLE: str(state / "identities.yaml"),
    }


@pytest.fixture
def agentbus(server: NatsServerProcess, state: Path, tmp_path: Path) -> Run:
    """`await agentbus(*args)` runs the CLI in an empty folder, configured as `agentbus up` would."""

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [AGENTBUS, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=_environment(server, state),
            check=False,
        )

    return run


async def _ask(
    executor: NatsClient, tenant: str = "acme", expires_in: timedelta = timedelta(hours=1), **arguments: object
) -> ApprovalRequested:
    arguments = arguments or {"image": "shop:1.2", "replicas": 3}
    request = ApprovalRequested(
        approval_id=new_task_id("ap"),
        task_id=new_task_id("task"),
        tenant=tenant,
        agent="deployer",
        tool="deploy",
        arguments=arguments,
        arguments_sha256=hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest(),
        risk="high",
        reason="policy: always",
        requested_by="acme-app",
        expires_at=utc_now() + expires_in,
    )
    await executor.jetstream().publish(APPROVAL_PENDING.format(tenant=tenant), request.model_dump_json().encode())
    return request


async def _resolve(executor: NatsClient, request: ApprovalRequested, by: str = "bob") -> None:
    resolved = ApprovalResolved(
        approval_id=request.approval_id, task_id=request.task_id, tenant=request.tenant, outcome="approved", by=by
    )
    await executor.jetstream().publish(
        APPROVAL_RESOLVED.format(tenant=request.tenant), resolved.model_dump_json().encode()
    )


async def test_list_and_show_print_tool_arguments_risk_age_and_expiry(executor: NatsClient, agentbus: Run) -> None:
    run = agentbus
    waiting = await _ask(executor, target="prod")
    done = await _ask(executor)
    await _resolve(executor, done)
    elsewhere = await _ask(executor, tenant="globex")

    as_alice = await run("approvals", "list", "--as", "alice")
    assert as_alice.returncode == 0, as_alice.stderr
    header, *rows = as_alice.stdout.splitlines()
    assert header.split()[:7] == ["ID", "TENANT", "TOOL", "RISK", "AGE", "EXPIRES", "ARGUMENTS"]
    row = next(r for r in rows if r.startswith(waiting.approval_id))
    assert re.search(r"acme\s+deploy\s+high\s+\d+s\s+in (59m|1h)\s+\{\"target\":\"prod\"\}", row), row
    assert done.approval_id not in as_alice.stdout, "resolved approvals are not pending"
    assert elsewhere.approval_id not in as_alice.stdout, "alice approves for acme only"

    as_operator = await run("approvals", "list", "--all")
    assert elsewhere.approval_id in as_operator.stdout
    assert re.search(rf"{done.approval_id}.*approved by bob", as_operator.stdout)

    shown = await run("approvals", "show", waiting.approval_id, "--as", "bob")
    assert shown.returncode == 0, shown.stderr
    assert f"sha256     {waiting.arguments_sha256}" in shown.stdout
    assert "status     pending" in shown.stdout
    assert '"target": "prod"' in shown.stdout


async def test_approve_sends_exactly_the_hash_it_shows_as_the_approver(
    executor: NatsClient, admin: NatsClient, agentbus: Run
) -> None:
    run = agentbus
    request = await _ask(executor, command="rollout restart")
    sent = await run("approvals", "approve", request.approval_id, "--as", "alice", "--reason", "looks fine")
    assert sent.returncode == 0, sent.stderr
    assert f"arguments_sha256 {request.arguments_sha256}" in sent.stdout
    subject = APPROVAL_DECISION.format(tenant="acme", approver="alice")
    stored = await admin.jetstream().get_last_msg(APPROVAL_DECISIONS.name, subject)
    assert ApprovalDecision.model_validate_json(stored.data or b"") == ApprovalDecision(
        approval_id=request.approval_id,
        decision="approve",
        approver="alice",
        arguments_sha256=request.arguments_sha256,
        reason="looks fine",
    )
    assert (stored.headers or {}).get(Header.MSG_ID.value) == f"decision:{request.approval_id}:alice:approve"

    again = await run("approvals", "approve", request.approval_id, "--as", "alice")
    assert again.returncode == 0
    assert "duplicate" in again.stdout
    denied = await run("approvals", "deny", request.approval_id, "--as", "bob")
    assert denied.returncode == 0, denied.stderr
    assert f"on {APPROVAL_DECISION.format(tenant='acme', approver='bob')}" in denied.stdout


async def test_decisions_that_cannot_be_sent_exit_1_and_usage_errors_exit_2(
    executor: NatsClient, agentbus: Run
) -> None:
    run = agentbus
    pending = await _ask(executor)
    resolved = await _ask(executor)
    await _resolve(executor, resolved)
    expired = await _ask(executor, expires_in=timedelta(seconds=-5))

    unknown = await run("approvals", "approve", "ap-nope", "--as", "alice")
    assert (unknown.returncode, "no approval ap-nope of tenant(s) acme" in unknown.stderr) == (1, True)
    late = await run("approvals", "approve", resolved.approval_id, "--as", "alice")
    assert (late.returncode, "is not pending: approved by bob" in late.stderr) == (1, True)
    stale = await run("approvals", "deny", expired.approval_id, "--as", "alice")
    assert (stale.returncode, "expired at" in stale.stderr) == (1, True)
    # carol approves for globex only: the server will not even let her read acme's approvals.
    foreign = await run("approvals", "approve", pending.approval_id, "--as", "carol", "--tenant", "acme")
    assert (foreign.returncode, "refused by NATS: nats: permissions violation" in foreign.stderr) == (1, True)

    nobody = await run("approvals", "approve", pending.approval_id)
    assert nobody.returncode == 2
    stranger = await run("approvals", "approve", pending.approval_id, "--as", "mallory")
    assert (stranger.returncode, "no credentials for NATS user 'approver-mallory'" in stranger.stderr) == (2, True)


async def test_watch_prints_new_and_resolved_approvals_until_interrupted(
    executor: NatsClient, server: NatsServerProcess, state: Path, tmp_path: Path
) -> None:
    watcher = await asyncio.to_thread(
        subprocess.Popen,
        [AGENTBUS, "approvals", "watch", "--as", "bob"],
        cwd=tmp_path,
        env=_environment(server, state),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        assert watcher.stdout is not None
        started = await asyncio.to_thread(watcher.stderr.readline)
        assert started.startswith("watching approvals of acme"), started
        request = await _ask(executor)
        await _ask(executor, tenant="globex")
        await _resolve(executor, request, by="alice")
        first = await asyncio.to_thread(watcher.stdout.readline)
        second = await asyncio.to_thread(watcher.stdout.readline)
        lines = sorted([first, second])
        assert lines[0].startswith(f"pending   {request.approval_id} tenant=acme tool=deploy risk=high"), lines
        assert lines[1].startswith(f"resolved  {request.approval_id} tenant=acme approved by alice"), lines
    finally:
        watcher.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(watcher.communicate, timeout=30)
    assert watcher.returncode == 0, stderr


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
