"""The server enforces identity: each service, submitter and approver is a NATS user held to its permissions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import nats.errors
import pytest
import pytest_asyncio
from agentbus.agent_runner.app import create_app as create_runner
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.cli.identities import (
    ADMIN_USER,
    DEFAULT_IDENTITIES_YAML,
    CredentialStore,
    Identities,
    IdentityError,
    TenantMembers,
    approver_user,
    load_identities,
    load_or_create_identities,
    service_user,
    submitter_user,
)
from agentbus.cli.permissions import SERVICE_ACCESS, access_of, nats_users
from agentbus.cli.replay import replay
from agentbus.cli.tasks import submit_task
from agentbus.contracts import registry
from agentbus.contracts.approvals import ApprovalDecision, ApprovalRequested
from agentbus.contracts.common import utc_now
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_DECISIONS,
    APPROVAL_PENDING,
    APPROVAL_VERDICT,
    APPROVALS,
    APPROVALS_LIST,
    DEAD_LETTER,
    LLM_REQUEST,
    SESSION_DELETE,
    SESSION_SHOW,
    SESSIONS,
    SESSIONS_LIST,
    TASK_EVENT,
    TASK_REPLAY,
    TASK_SUBMIT,
    Service,
)
from agentbus.contracts.tasks import TaskSubmitted
from agentbus.inference_worker.app import create_app as create_worker
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.bootstrap import apply_topology
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.testing import nats_server_or_skip
from helpers import AGENTS_DIR, User, Violations, new_task_id
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

IDENTITIES = Identities(
    tenants={
        "acme": TenantMembers(submitters=("acme-app",), approvers=("alice", "bob")),
        "globex": TenantMembers(submitters=("globex-app",), approvers=("carol",)),
    }
)


Connect = Callable[[str], Awaitable[User]]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> CredentialStore:
    return CredentialStore(tmp_path_factory.mktemp("credentials") / "credentials")


@contextlib.contextmanager
def _secured_server(store: Path, credentials: CredentialStore) -> Iterator[NatsServerProcess]:
    with nats_server_or_skip(store, users=nats_users(IDENTITIES, credentials)) as server:
        yield server


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, credentials: CredentialStore) -> Iterator[NatsServerProcess]:
    """A server that enforces the identities above, bootstrapped by the admin user."""
    with _secured_server(tmp_path_factory.mktemp("secured"), credentials) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def bootstrapped(secured: NatsServerProcess, credentials: CredentialStore) -> NatsServerProcess:
    admin = credentials.ensure(ADMIN_USER)
    nc = await connect_nats(secured.url, "bootstrap", user=admin.user, password=admin.password)
    try:
        await apply_topology(nc.jetstream())
    finally:
        await nc.close()
    return secured


@pytest_asyncio.fixture
async def connect(bootstrapped: NatsServerProcess, credentials: CredentialStore) -> AsyncIterator[Connect]:
    """`await connect(user)` opens a connection as `user`; all are closed after the test."""
    opened: list[NatsClient] = []

    async def as_user(user: str) -> User:
        violations = Violations()
        credential = credentials.ensure(user)
        nc = await connect_nats(
            bootstrapped.url,
            user,
            user=credential.user,
            password=credential.password,
            reconnect_forever=False,
            error_cb=violations.record,
        )
        opened.append(nc)
        return User(nc, violations)

    yield as_user
    for nc in opened:
        await nc.close()


def _request(approval_id: str, tenant: str = "acme", tool: str = "deploy") -> ApprovalRequested:
    arguments = {"image": "shop:1.2", "replicas": 3}
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return ApprovalRequested(
        approval_id=approval_id,
        task_id=new_task_id("task"),
        tenant=tenant,
        agent="deployer",
        tool=tool,
        arguments=arguments,
        arguments_sha256=digest,
        risk="high",
        reason="policy: always",
        expires_at=utc_now() + timedelta(hours=1),
    )


async def _stored_on(admin: User, stream: str, subject: str) -> int:
    """How many messages `stream` holds on exactly `subject`."""
    try:
        await admin.nc.jetstream().get_last_msg(stream, subject)
    except NotFoundError:
        return 0
    info = await admin.nc.jetstream().stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


# --- the permission table ------------------------------------------------------------------------


def test_every_static_consumer_belongs_to_exactly_its_own_service() -> None:
    listed = [(access.service, c) for access in SERVICE_ACCESS for c in access.consumes]
    assert sorted(c.durable for _, c in listed) == sorted(c.durable for c in registry.STATIC_CONSUMERS)
    for service, consumer in listed:
        assert consumer.service == service, consumer.durable
    assert {access.service for access in SERVICE_ACCESS} == set(Service)
    # Inference consumers are per model: the worker's row covers whatever models a deployment serves.
    models = ("scripted", "llama-3")
    assert access_of(Service.INFERENCE_WORKER).consumers(models) == tuple(
        registry.inference_consumer(m) for m in models
    )


def test_credentials_are_private_and_kept_across_runs(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    first = {u.name: u.password for u in nats_users(IDENTITIES, store)}
    second = {u.name: u.password for u in nats_users(IDENTITIES, CredentialStore(tmp_path / "credentials"))}
    assert first == second
    assert len(set(first.values())) == len(first), "every user has its own password"
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    for user in first:
        assert stat.S_IMODE(os.stat(store.path_of(user)).st_mode) == 0o600
    expected = {ADMIN_USER, submitter_user("acme-app"), submitter_user("globex-app")}
    expected |= {approver_user(a) for a in ("alice", "bob", "carol")} | {service_user(s) for s in Service}
    assert set(first) == expected


def test_the_demo_identities_are_written_once_and_a_bad_file_names_its_field(tmp_path: Path) -> None:
    path = tmp_path / "identities.yaml"
    identities = load_or_create_identities(path)
    assert path.read_text() == DEFAULT_IDENTITIES_YAML
    assert identities.approvers() == {"alice": ("acme",), "bob": ("acme",)}
    path.write_text("tenants:\n  acme:\n    approvers: [alice]\n")
    assert load_or_create_identities(path).approvers() == {"alice": ("acme",)}
    path.write_text("tenants:\n  acme:\n    approvers: ['not a name']\n")
    with pytest.raises(IdentityError, match=r"identities.yaml: field 'tenants.acme.approvers.0'"):
        load_identities(path)


# --- enforcement by the server -------------------------------------------------------------------


async def test_a_forged_decision_is_refused_by_the_server_and_never_reaches_the_stream(connect: Connect) -> None:
    bob: User = await connect(approver_user("bob"))
    admin: User = await connect(ADMIN_USER)
    forged_subject = APPROVAL_DECISION.format(tenant="acme", approver="alice")
    forged = ApprovalDecision(approval_id="ap-forged", decision="approve", approver="alice", arguments_sha256="0" * 64)
    with pytest.raises(nats.errors.TimeoutError):
        await bob.nc.jetstream().publish(forged_subject, forged.model_dump_json().encode(), timeout=1)
    assert any(f'publish to "{forged_subject}"' in v for v in await bob.settle())
    assert await _stored_on(admin, APPROVAL_DECISIONS.name, forged_subject) == 0


async def test_a_client_without_credentials_is_not_let_in(bootstrapped: NatsServerProcess) -> None:
    async def quiet(_: Exception) -> None:
        return None

    with pytest.raises(nats.errors.NoServersError):
        await connect_nats(bootstrapped.url, "anonymous", reconnect_forever=False, error_cb=quiet)
    with pytest.raises(nats.errors.NoServersError):
        await connect_nats(
            bootstrapped.url, "guess", user="admin", password="guess", reconnect_forever=False, error_cb=quiet
        )


async def test_an_approver_follows_its_tenants_approvals_and_decides_only_as_itself(connect: Connect) -> None:
    executor: User = await connect(service_user(Service.TOOL_EXECUTOR))
    alice: User = await connect(approver_user("alice"))
    admin: User = await connect(ADMIN_USER)
    pending = await alice.nc.subscribe(APPROVAL_PENDING.format(tenant="acme"))
    await alice.nc.flush()  # the server knows the subscription before another connection publishes
    acme_request, globex_request = _request(new_task_id("ap")), _request(new_task_id("ap"), tenant="globex")
    for request in (acme_request, globex_request):
        await executor.nc.jetstream().publish(
            APPROVAL_PENDING.format(tenant=request.tenant), request.model_dump_json().encode()
        )
    seen = ApprovalRequested.model_validate_json((await pending.next_msg(timeout=5)).data)
    assert seen == acme_request

    own = APPROVAL_DECISION.format(tenant="acme", approver="alice")
    decision = ApprovalDecision(
        approval_id=acme_request.approval_id,
        decision="approve",
        approver="alice",
        arguments_sha256=acme_request.arguments_sha256,
    )
    ack = await alice.nc.jetstream().publish(own, decision.model_dump_json().encode())
    assert ack.stream == APPROVAL_DECISIONS.name
    await alice.nc.subscribe(APPROVAL_VERDICT.format(tenant="acme", approver="alice"))
    with pytest.raises(nats.errors.NoRespondersError):  # allowed to ask; nobody answers on this server
        await alice.nc.request(APPROVALS_LIST.format(tenant="acme"), b"{}", timeout=2)
    assert await alice.settle() == []

    other_tenant = APPROVAL_DECISION.format(tenant="globex", approver="alice")
    await alice.nc.publish(other_tenant, decision.model_dump_json().encode())
    await alice.nc.publish(TASK_SUBMIT.format(tenant="acme", submitter="alice"), b"{}")
    await alice.nc.publish(APPROVALS_LIST.format(tenant="globex"), b"{}")
    await alice.nc.subscribe(APPROVAL_PENDING.format(tenant="globex"))
    await alice.nc.subscribe(APPROVAL_VERDICT.format(tenant="acme", approver="bob"))
    with pytest.raises(nats.errors.TimeoutError):  # no JetStream API at all: no consumer, no replay
        await replay(alice.nc, APPROVALS.name, APPROVAL_PENDING.format(tenant="acme"), timeout=1)
    violations = await alice.settle()
    for subject in (other_tenant, TASK_SUBMIT.format(tenant="acme", submitter="alice")):
        assert any(f'publish to "{subject}"' in v for v in violations), subject
    assert any(f'publish to "{APPROVALS_LIST.format(tenant="globex")}"' in v for v in violations)
    for subject in (APPROVAL_PENDING.format(tenant="globex"), APPROVAL_VERDICT.format(tenant="acme", approver="bob")):
        assert any(f'subscription to "{subject}"' in v for v in violations), subject
    assert any("$js.api.consumer.create" in v.lower() for v in violations)
    assert await _stored_on(admin, APPROVAL_DECISIONS.name, other_tenant) == 0


async def test_a_submitter_acts_only_as_itself_for_its_own_tenant(connect: Connect) -> None:
    acme: User = await connect(submitter_user("acme-app"))
    admin: User = await connect(ADMIN_USER)
    js = acme.nc.jetstream()
    task = TaskSubmitted(task_id=new_task_id("sub"), tenant="acme", agent="echo", input="hi")
    # Nothing consumes submissions on this server: the work queue keeps them for the test to count.
    ack = await js.publish(TASK_SUBMIT.format(tenant="acme", submitter="acme-app"), task.model_dump_json().encode())
    assert ack.stream == registry.TASKS.name
    await acme.nc.subscribe(TASK_EVENT.format(tenant="acme", task_id=task.task_id))
    await acme.nc.subscribe(TASK_EVENT.pattern.format(tenant="acme", task_id="*"))
    with pytest.raises(nats.errors.NoRespondersError):  # allowed to ask; no runner on this server
        await acme.nc.request(TASK_REPLAY.format(tenant="acme", task_id=task.task_id), b"{}", timeout=2)
    assert await acme.settle() == []

    foreign = TASK_SUBMIT.format(tenant="globex", submitter="acme-app")
    impersonated = TASK_SUBMIT.format(tenant="acme", submitter="other-app")
    for subject in (foreign, impersonated):
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(subject, task.model_dump_json().encode(), timeout=1)
    await acme.nc.publish(TASK_REPLAY.format(tenant="globex", task_id="any"), b"{}")
    # Nor by listening to what the server delivers to others, nor through any consumer of a stream.
    for subject in ("_INBOX.>", TASK_EVENT.wildcard, LLM_REQUEST.wildcard, "agentbus.tasks.events.globex.*"):
        await acme.nc.subscribe(subject)
    with pytest.raises(nats.errors.TimeoutError):
        await js.subscribe(TASK_EVENT.format(tenant="acme", task_id=task.task_id), ordered_consumer=True)
    violations = await acme.settle()
    for subject in (foreign, impersonated, TASK_REPLAY.format(tenant="globex", task_id="any")):
        assert any(f'publish to "{subject}"' in v for v in violations), subject
    for subject in ("_INBOX.>", TASK_EVENT.wildcard, LLM_REQUEST.wildcard, "agentbus.tasks.events.globex.*"):
        assert any(f'subscription to "{subject.lower()}"' in v.lower() for v in violations), subject
    assert any("$js.api" in v.lower() for v in violations), "no JetStream API for a submitter"
    assert await _stored_on(admin, registry.TASKS.name, foreign) == 0
    assert await _stored_on(admin, registry.TASKS.name, impersonated) == 0


async def test_a_submitter_reaches_only_its_own_sessions(connect: Connect) -> None:
    """Sessions requests name the tenant and the submitter: the server lets a submitter ask only about its own
    (no runner serves this server, hence no responders), and no one reads the sessions bucket directly."""
    acme: User = await connect(submitter_user("acme-app"))
    for spec in (SESSIONS_LIST, SESSION_SHOW, SESSION_DELETE):
        with pytest.raises(nats.errors.NoRespondersError):
            await acme.nc.request(spec.format(tenant="acme", submitter="acme-app"), b"{}", timeout=2)
    assert await acme.settle() == []
    refused = [
        *(spec.format(tenant="acme", submitter="other-app") for spec in (SESSIONS_LIST, SESSION_SHOW, SESSION_DELETE)),
        *(spec.format(tenant="globex", submitter="acme-app") for spec in (SESSIONS_LIST, SESSION_SHOW, SESSION_DELETE)),
        f"$KV.{SESSIONS.bucket}.conversations.acme.acme-app.s1",
    ]
    for subject in refused:
        await acme.nc.publish(subject, b"{}")
    violations = await acme.settle()
    for subject in refused:
        assert any(f'publish to "{subject.lower()}"' in v.lower() for v in violations), subject


async def test_each_service_user_can_do_what_its_service_needs(tmp_path: Path, credentials: CredentialStore) -> None:
    """Every right in the table, exercised as the service's own user on a server of its own."""
    with _secured_server(tmp_path / "nats", credentials) as server:
        admin = credentials.ensure(ADMIN_USER)
        bootstrap = await connect_nats(server.url, "bootstrap", user=admin.user, password=admin.password)
        await apply_topology(bootstrap.jetstream())
        await bootstrap.close()
        for access in SERVICE_ACCESS:
            credential = credentials.ensure(service_user(access.service))
            violations = Violations()
            nc = await connect_nats(
                server.url,
                access.service,
                user=credential.user,
                password=credential.password,
                error_cb=violations.record,
            )
            js = nc.jetstream()
            try:
                for consumer in access.consumers(registry.DEFAULT_MODELS):
                    await js.consumer_info(consumer.stream, consumer.durable)
                    pull = await js.pull_subscribe_bind(durable=consumer.durable, stream=consumer.stream)
                    with contextlib.suppress(nats.errors.TimeoutError):
                        await pull.fetch(1, timeout=0.2)
                    await pull.unsubscribe()
                    await js.publish(DEAD_LETTER.format(stream=consumer.stream, consumer=consumer.durable), b"{}")
                for spec in (*access.publishes, *access.requests):
                    subject = spec.format(**dict.fromkeys(spec.tokens, "permcheck"))
                    if spec.stream is None:
                        await nc.publish(subject, b"{}")
                    else:
                        assert (await js.publish(subject, b"{}")).stream == spec.stream
                for spec in (*access.answers, *access.listens):
                    await nc.subscribe(spec.wildcard)
                for bucket in access.buckets:
                    kv = await js.key_value(bucket.bucket)
                    await kv.put("permcheck", b"1")
                    assert (await kv.get("permcheck")).value == b"1"
                for stream in access.reads:
                    reader = await js.subscribe(
                        stream.subjects[0].replace("*", "permcheck"), stream=stream.name, ordered_consumer=True
                    )
                    await reader.unsubscribe()
                assert await violations.settle(nc) == [], access.service
                # ...and nothing beyond: no service decides approvals, and none submits tasks but the
                # orchestrator, which submits each workflow step as the run's submitter.
                await nc.publish(TASK_SUBMIT.format(tenant="permcheck", submitter="permcheck"), b"{}")
                await nc.publish(APPROVAL_DECISION.format(tenant="permcheck", approver="alice"), b"{}")
                submits = access.service is Service.WORKFLOW_ORCHESTRATOR
                assert len(await violations.settle(nc)) == (1 if submits else 2), access.service
            finally:
                await nc.close()


async def test_services_under_their_own_users_complete_a_task_a_submitter_sent(
    bootstrapped: NatsServerProcess, credentials: CredentialStore, connect: Connect
) -> None:
    runner_user = credentials.ensure(service_user(Service.AGENT_RUNNER))
    worker_user = credentials.ensure(service_user(Service.INFERENCE_WORKER))
    services = [
        create_runner(
            RunnerSettings(
                nats_url=bootstrapped.url,
                nats_user=runner_user.user,
                nats_password=runner_user.password,
                agents_dir=AGENTS_DIR,
                budgets_enabled=False,
                drain_timeout_seconds=2,
            )
        ),
        create_worker(
            WorkerSettings(
                nats_url=bootstrapped.url,
                nats_user=worker_user.user,
                nats_password=worker_user.password,
                drain_timeout_seconds=2,
            )
        ),
    ]
    for service in services:
        await service.start()
    try:
        acme: User = await connect(submitter_user("acme-app"))
        task = TaskSubmitted(
            task_id=new_task_id("id"), tenant="acme", agent="assistant", input="What is calculator(6*7)?"
        )
        kinds: list[str] = []
        outcome = await submit_task(
            acme.nc,
            task,
            "acme-app",
            on_submitted=lambda _: None,
            on_event=lambda e: kinds.append(e.kind),
            wait_seconds=60,
        )
        assert outcome == "completed", kinds
        assert kinds[0] == "accepted"
        assert await acme.settle() == []
    finally:
        for service in services:
            await service.stop()
    await asyncio.sleep(0)
