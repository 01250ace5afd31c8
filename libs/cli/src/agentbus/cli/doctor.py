"""`agentbus doctor`: is the suite of a state directory healthy, and what to do about each problem.

It checks, in order, and goes as far as it can: the state directory; whether an `agentbus up` holds it and
every process it started is alive; the credentials and identities (readable, private, one per identity);
NATS (reachable, accepting the operator's credential); every stream, durable consumer and KV bucket against
the registry; and each service at work: someone pulls its consumers, and the services that own a store
answer a request that reads it (the runner its task events, the tool-executor its approvals database, the
retriever its Milvus collection, the cost-accountant its ledger). Exit 0 when all is well, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import nats.errors
from agentbus.cli.config import (
    CREDENTIALS_DIR_VARIABLE,
    ENV_FILE_NAME,
    IDENTITIES_FILE_VARIABLE,
    NATS_URL_VARIABLE,
    STATE_DIR,
    read_env_file,
)
from agentbus.cli.identities import (
    ADMIN_USER,
    Credential,
    CredentialStore,
    IdentityError,
    approver_user,
    load_identities,
    service_user,
    submitter_user,
)
from agentbus.cli.suite import LOCK_FILE_NAME, PIDS_FILE_NAME, SUITE_SERVICES
from agentbus.contracts import registry
from agentbus.contracts.approvals import ApprovalsListReply, ApprovalsListRequest
from agentbus.contracts.budget import CostReportReply, CostReportRequest
from agentbus.contracts.common import ErrorInfo
from agentbus.contracts.rag import SearchReply, SearchRequest
from agentbus.contracts.registry import (
    APPROVALS_LIST,
    COST_REPORT,
    DEFAULT_MODELS,
    RAG_SEARCH,
    TASK_REPLAY,
    ConsumerSpec,
    Service,
    StreamSpec,
)
from agentbus.contracts.tasks import TaskReplayReply, TaskReplayRequest
from agentbus.runtime.bootstrap import consumer_config, stream_config
from agentbus.runtime.connection import connect_nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ValidationError

PROBE_TENANT = "agentbus-doctor"
"""The tenant of doctor's probes: it owns nothing, so every probe reads a store and changes none."""
PROBE_TIMEOUT_SECONDS = 5.0
PULL_CHECKS = 3
PULL_CHECK_INTERVAL_SECONDS = 0.5
STREAM_FIELDS = ("subjects", "retention", "storage", "max_age", "max_bytes", "max_msg_size", "duplicate_window")
CONSUMER_FIELDS = ("filter_subject", "ack_policy", "ack_wait", "max_deliver", "max_ack_pending", "backoff")
APPLY = "run `agentbus streams apply` (`agentbus up` applies them when it starts)"


@dataclass(frozen=True)
class Finding:
    """One check: what was checked, and when it failed, what is wrong and what to do."""

    subject: str
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.fix is None


def passed(subject: str, detail: str) -> Finding:
    return Finding(subject, detail)


def failed(subject: str, detail: str, fix: str) -> Finding:
    return Finding(subject, detail, fix)


class Report:
    """Findings printed as they are made: `ok` or `FAIL`, then what to do."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, *findings: Finding) -> None:
        for finding in findings:
            self.findings.append(finding)
            mark = "ok  " if finding.ok else "FAIL"
            click.echo(f"{mark}  {finding.subject}: {finding.detail}")
            if finding.fix is not None:
                click.echo(f"      fix: {finding.fix}")


# --- the supervisor ------------------------------------------------------------------------------------


def supervisor_pid(state_dir: Path) -> int | None:
    """The pid of the `agentbus up` holding the state directory's lock, or None when none holds it."""
    path = state_dir / LOCK_FILE_NAME
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text(encoding="utf-8"):
            return False
    return True


def check_processes(state_dir: Path) -> list[Finding]:
    pid = supervisor_pid(state_dir)
    if pid is None:
        return [
            failed(
                "suite",
                f"no `agentbus up` is running on {state_dir}",
                f"start it: `agentbus up` (an earlier run's logs are in {state_dir / 'logs'})",
            )
        ]
    findings = [passed("suite", f"`agentbus up` runs on {state_dir} (pid {pid})")]
    try:
        pids: dict[str, int] = json.loads((state_dir / PIDS_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [
            *findings,
            failed("processes", f"no readable {PIDS_FILE_NAME}", "it is still starting: run doctor again"),
        ]
    dead = sorted(name for name, process in pids.items() if not _alive(int(process)))
    if dead:
        logs = ", ".join(str(state_dir / "logs" / f"{name}.log") for name in dead)
        findings.append(
            failed(
                "processes",
                f"not running: {', '.join(dead)}",
                f"`agentbus up` restarts them with backoff; if they keep dying, read {logs}",
            )
        )
    else:
        findings.append(passed("processes", f"{len(pids)} alive ({', '.join(sorted(pids))})"))
    return findings


# --- credentials ---------------------------------------------------------------------------------------


def _expected_users(identities_file: Path) -> list[str]:
    identities = load_identities(identities_file)
    users = [ADMIN_USER, *(service_user(service) for service, _, _ in SUITE_SERVICES)]
    users += [submitter_user(name) for name in identities.submitters()]
    users += [approver_user(name) for name in identities.approvers()]
    return users


def check_credentials(env: dict[str, str]) -> tuple[list[Finding], Credential | None]:
    """The findings, and the operator's credential when it can be read."""
    directory_text = env.get(CREDENTIALS_DIR_VARIABLE)
    if not directory_text:
        return [passed("credentials", "none: the server enforces no identities (`agentbus up --nats-url`)")], None
    directory = Path(directory_text)
    restart = "restart `agentbus up`: it writes a credential for every identity that lacks one"
    if not directory.is_dir():
        return [failed("credentials", f"no folder {directory}", restart)], None
    findings: list[Finding] = []
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        findings.append(failed("credentials", f"{directory} is mode {mode:o}", f"chmod 700 {directory}"))
    store = CredentialStore(directory)
    exposed, unreadable = [], []
    for path in sorted(directory.glob("*.json")):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            exposed.append(str(path))
        try:
            store.get(path.stem)
        except IdentityError:
            unreadable.append(str(path))
    if exposed:
        findings.append(
            failed("credentials", f"readable by others: {', '.join(exposed)}", f"chmod 600 {' '.join(exposed)}")
        )
    if unreadable:
        findings.append(
            failed(
                "credentials",
                f"unreadable: {', '.join(unreadable)}",
                f"delete {'them' if len(unreadable) > 1 else 'it'}, then {restart}",
            )
        )
    identities_file = Path(env.get(IDENTITIES_FILE_VARIABLE, directory.parent / "identities.yaml"))
    try:
        expected = _expected_users(identities_file)
    except IdentityError as exc:
        findings.append(failed("identities", str(exc), "fix the file, then restart `agentbus up`"))
        expected = [ADMIN_USER]
    else:
        findings.append(passed("identities", f"{identities_file} is valid"))
    missing = [user for user in expected if not store.path_of(user).exists()]
    if missing:
        findings.append(failed("credentials", f"missing for {', '.join(missing)}", restart))
    if not any(not f.ok and f.subject == "credentials" for f in findings):
        findings.append(
            passed("credentials", f"{len(expected)} users, each with a private, readable file in {directory}")
        )
    try:
        admin = store.get(ADMIN_USER)
    except IdentityError:
        admin = None
    return findings, admin


# --- NATS and the topology -----------------------------------------------------------------------------


async def connect(url: str, admin: Credential | None) -> tuple[Finding, NatsClient | None]:
    refused: list[str] = []

    async def record(error: Exception) -> None:
        if "authorization" in str(error).lower():
            refused.append(str(error))

    try:
        nc = await connect_nats(
            url,
            "agentbus-doctor",
            user=admin.user if admin else None,
            password=admin.password if admin else None,
            reconnect_forever=False,
            error_cb=record,
        )
    except (nats.errors.NoServersError, OSError):
        if refused:
            return failed(
                "nats",
                f"{url} refused the operator's credential",
                "the credentials are not the running server's: restart `agentbus up`",
            ), None
        return failed(
            "nats",
            f"cannot reach {url}",
            "start the suite: `agentbus up` (when it runs, read logs/nats-server.log: it restarts the server)",
        ), None
    version = nc.connected_server_version
    return passed("nats", f"{url} answers (nats-server {version.major}.{version.minor}.{version.patch})"), nc


def _normal(value: object) -> object:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        # Subjects are a set to the server: their order is not a difference.
        return sorted(value) if all(isinstance(v, str) for v in value) else [_normal(v) for v in value]
    return getattr(value, "value", value)


def differences(current: object, desired: object, fields: Sequence[str]) -> list[str]:
    """`field server X, registry Y` for each field the registry sets and the server has otherwise."""
    found = []
    for name in fields:
        want = getattr(desired, name)
        have = getattr(current, name)
        if want is not None and _normal(have) != _normal(want):
            found.append(f"{name} {_normal(have)!r} on the server, {_normal(want)!r} in the registry")
    return found


async def _stream(js: JetStreamContext, spec: StreamSpec) -> str | None:
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        return f"stream {spec.name} is missing"
    drift = differences(info.config, stream_config(spec, info.config.num_replicas or 1), STREAM_FIELDS)
    return f"stream {spec.name}: {'; '.join(drift)}" if drift else None


async def _consumer(js: JetStreamContext, spec: ConsumerSpec) -> str | None:
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        return f"consumer {spec.durable} on {spec.stream} is missing"
    drift = differences(info.config, consumer_config(spec), CONSUMER_FIELDS)
    return f"consumer {spec.durable}: {'; '.join(drift)}" if drift else None


async def check_topology(js: JetStreamContext, models: tuple[str, ...]) -> list[Finding]:
    consumers = registry.consumers(models)
    problems = [p for spec in registry.STREAMS if (p := await _stream(js, spec)) is not None]
    problems += [p for spec in consumers if (p := await _consumer(js, spec)) is not None]
    for bucket in registry.KEY_VALUE_BUCKETS:
        try:
            await js.key_value(bucket.bucket)
        except NotFoundError:
            problems.append(f"KV bucket {bucket.bucket} is missing")
    if problems:
        return [failed("topology", p, APPLY) for p in problems]
    counts = ", ".join(
        _count(len(things), name)
        for things, name in (
            (registry.STREAMS, "stream"),
            (consumers, "durable consumer"),
            (registry.KEY_VALUE_BUCKETS, "KV bucket"),
        )
    )
    return [passed("topology", f"{counts}, as the registry declares")]


def _count(number: int, name: str) -> str:
    return f"{number} {name}{'' if number == 1 else 's'}"


# --- the services at work ------------------------------------------------------------------------------


def _log_hint(state_dir: Path, service: str) -> str:
    return f"is it running? read {state_dir / 'logs' / f'{service}.log'}"


async def check_pulling(js: JetStreamContext, models: tuple[str, ...], state_dir: Path) -> list[Finding]:
    """A service is at work when one of its durable consumers has a pull waiting, or messages in flight."""
    by_service: dict[str, list[ConsumerSpec]] = {}
    for spec in registry.consumers(models):
        by_service.setdefault(str(spec.service), []).append(spec)
    idle = set(by_service)
    for attempt in range(PULL_CHECKS):
        for service in sorted(idle):
            for spec in by_service[service]:
                with contextlib.suppress(NotFoundError):
                    info = await js.consumer_info(spec.stream, spec.durable)
                    if (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0:
                        idle.discard(service)
                        break
        if not idle:
            break
        if attempt + 1 < PULL_CHECKS:
            # Between two fetches a puller briefly has no request waiting: look again before judging.
            await asyncio.sleep(PULL_CHECK_INTERVAL_SECONDS)
    findings = [
        failed("consumers", f"nobody pulls the consumers of {service}", _log_hint(state_dir, service))
        for service in sorted(idle)
    ]
    working = sorted(set(by_service) - idle)
    if working:
        findings.append(passed("consumers", f"pulled by {', '.join(working)}"))
    return findings


@dataclass(frozen=True)
class Probe:
    """A request a service answers by reading its store."""

    service: Service
    store: str
    subject: str
    request: BaseModel
    reply: type[BaseModel]
    error: Callable[[Any], ErrorInfo | None]
    harmless: frozenset[str] = frozenset()
    """Error codes that still show the store was read (the probe's tenant owns nothing)."""


PROBES = (
    Probe(
        Service.AGENT_RUNNER,
        "task events (JetStream)",
        TASK_REPLAY.format(tenant=PROBE_TENANT, task_id="doctor-probe"),
        TaskReplayRequest(),
        TaskReplayReply,
        lambda reply: reply.error,
    ),
    Probe(
        Service.TOOL_EXECUTOR,
        "approvals database",
        APPROVALS_LIST.format(tenant=PROBE_TENANT),
        ApprovalsListRequest(limit=1),
        ApprovalsListReply,
        lambda reply: reply.error,
    ),
    Probe(
        Service.RETRIEVER,
        "Milvus collection",
        RAG_SEARCH.format(tenant=PROBE_TENANT),
        SearchRequest(tenant=PROBE_TENANT, query="doctor probe", top_k=1),
        SearchReply,
        lambda reply: reply.error,
        frozenset({"unknown_tenant"}),
    ),
    Probe(
        Service.COST_ACCOUNTANT,
        "ledger database",
        COST_REPORT.format(),
        CostReportRequest(tenant=PROBE_TENANT),
        CostReportReply,
        lambda reply: reply.error,
    ),
)


async def _probe(nc: NatsClient, probe: Probe, state_dir: Path) -> Finding:
    subject = f"{probe.service} ({probe.store})"
    started = time.monotonic()
    try:
        msg = await nc.request(probe.subject, probe.request.model_dump_json().encode(), timeout=PROBE_TIMEOUT_SECONDS)
    except nats.errors.NoRespondersError:
        return failed(subject, f"nobody answers on {probe.subject}", _log_hint(state_dir, probe.service))
    except nats.errors.TimeoutError:
        return failed(
            subject,
            f"no answer on {probe.subject} within {PROBE_TIMEOUT_SECONDS:g}s",
            f"it may be overloaded or its store slow: {_log_hint(state_dir, probe.service)}",
        )
    elapsed = time.monotonic() - started
    try:
        reply = probe.reply.model_validate_json(msg.data)
    except ValidationError as exc:
        return failed(subject, f"an unreadable answer: {exc.errors()[0]['msg']}", "its version may not match the CLI's")
    error = probe.error(reply)
    if error is not None and error.code not in probe.harmless:
        return failed(subject, f"answered {error.code}: {error.message}", _log_hint(state_dir, probe.service))
    return passed(subject, f"answers from its store in {elapsed * 1000:.0f} ms")


async def examine(state_dir: Path, models: tuple[str, ...], report: Report) -> None:
    env = read_env_file(state_dir)
    report.add(*check_processes(state_dir))
    findings, admin = check_credentials(env)
    report.add(*findings)
    url = env.get(NATS_URL_VARIABLE)
    if url is None:
        where = state_dir / ENV_FILE_NAME
        report.add(failed("nats", f"no {NATS_URL_VARIABLE} in {where}", "start the suite: `agentbus up`"))
        return
    finding, nc = await connect(url, admin)
    report.add(finding)
    if nc is None:
        return
    try:
        js = nc.jetstream()
        report.add(*await check_topology(js, models))
        report.add(*await check_pulling(js, models, state_dir))
        report.add(*await asyncio.gather(*(_probe(nc, probe, state_dir) for probe in PROBES)))
    finally:
        await nc.close()


@click.command("doctor")
@click.option("--state-dir", type=click.Path(path_type=Path), default=STATE_DIR, show_default=True)
@click.option("--models", default=",".join(DEFAULT_MODELS), show_default=True, help="Models the suite serves.")
def doctor_command(state_dir: Path, models: str) -> None:
    """Check the suite of a state directory and say what to do about each problem (exit 1 if any).

    Is `agentbus up` running, with every process alive? Are the credentials readable and private? Is
    NATS reachable? Are the streams, consumers and buckets as the registry says? Does each service pull
    its work, and answer from its store?
    """
    state_dir = state_dir.resolve()
    click.echo(f"agentbus doctor: {state_dir}")
    report = Report()
    if not (state_dir / ENV_FILE_NAME).exists():
        report.add(
            failed(
                "state",
                f"no {state_dir / ENV_FILE_NAME}: `agentbus up` has not run here",
                "run `agentbus up` in this folder, or point --state-dir at the one it uses",
            )
        )
    else:
        asyncio.run(examine(state_dir, tuple(m.strip() for m in models.split(",") if m.strip()), report))
    problems = sum(not f.ok for f in report.findings)
    click.echo("all checks passed" if problems == 0 else f"{problems} problem{'s' if problems > 1 else ''} found")
    if problems:
        raise SystemExit(1)
