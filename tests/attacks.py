"""The attack suite's cases: what a user of the bus may try beyond its rights, and who must refuse it.

Each case runs over raw NATS against the whole suite as `agentbus up` runs it (identities enforced) and
asserts who refused it: nats-server (a permission violation reported to the attacker, and nothing stored),
the tool-executor (a verdict `refused` with its reason, the refusal audited in its table and counted in
`agentbus_approval_decisions_refused_total`, the approval still pending), or the agent-runner (a `rejected`
event, or nothing run twice). A case that is not refused is a breach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from agentbus.cli.identities import ADMIN_USER, CredentialStore, approver_user, submitter_user
from agentbus.cli.suite import Suite
from agentbus.contracts.approvals import (
    ApprovalDecisionVerdict,
    ApprovalEntry,
    ApprovalRequested,
    ApprovalsListReply,
    ApprovalsListRequest,
    arguments_sha256,
)
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_DECISIONS,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS_LIST,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    COST_REPORT,
    DEAD_LETTER,
    LLM_ABORT,
    LLM_REQUEST,
    LLM_RESULT,
    RAG_DELETE_DOCUMENTS,
    RAG_INGEST_DOCUMENTS,
    RAG_SEARCH,
    RATE_LIMITS,
    RUN_SCHEDULE,
    RUN_TIMER,
    SESSION_DELETE,
    SESSION_SHOW,
    SESSIONS_LIST,
    SPAN,
    TASK_CANCEL,
    TASK_EVENT,
    TASK_REPLAY,
    TASK_SUBMIT,
    TOOL_CALL,
    TOOL_UPDATE,
    TOOL_WITHDRAW,
    USAGE_RECORDED,
    WORKFLOW_CANCEL,
    WORKFLOW_EVENT,
    WORKFLOW_REPLAY,
    WORKFLOW_SUBMIT,
    Service,
    budget_subject,
)
from agentbus.runtime.connection import connect_nats
from helpers import User, Violations

IDENTITIES_YAML = """\
tenants:
  acme:
    submitters: [acme-app, alice]
    approvers: [alice, bob, dave]
  globex:
    submitters: [globex-app]
    approvers: [carol]
"""
"""alice both submits and approves (self-approval); dave approves for acme but is in no approver group of
create_ticket (config/approvers.yaml: ops-leads are alice and bob); carol approves for globex only."""

HIGH_TICKET = 'create_ticket(title="{title}", priority="high")'
SUBMITTER_TOKENS = {"acme-app": "acme-app", "globex-app": "globex-app", "alice-as-submitter": "alice"}
"""The arena's submitter connections and the identity each submits as (the subject's last token)."""


class NotRefusedError(AssertionError):
    """The attack was not refused as it must be."""


@dataclass
class Arena:
    """The suite under attack, a connection per identity, and what the cases need to observe."""

    suite: Suite
    users: dict[str, User]
    verdicts: dict[tuple[str, str], Any] = field(default_factory=dict)
    """Each approver's verdict subscription, opened before any decision so no verdict is missed."""

    def __getitem__(self, name: str) -> User:
        return self.users[name]

    # --- observing -----------------------------------------------------------------------------

    def executor_db(self) -> Path:
        return self.suite.state_dir / "tool-executor.db"

    def query(self, database: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(sql, args).fetchall()

    def refused_total(self, reason: str) -> float:
        executor = next(s for s in self.suite.services if s.spec.name == Service.TOOL_EXECUTOR)
        with urllib.request.urlopen(f"http://127.0.0.1:{executor.http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        pattern = rf'^agentbus_approval_decisions_refused_total\{{reason="{re.escape(reason)}"\}} ([0-9.e+]+)$'
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def approvals(self, tenant: str, lister: str) -> dict[str, ApprovalEntry]:
        request = ApprovalsListRequest(include_resolved=True)
        msg = await self[lister].nc.request(
            APPROVALS_LIST.format(tenant=tenant), request.model_dump_json().encode(), timeout=10
        )
        reply = ApprovalsListReply.model_validate_json(msg.data)
        return {entry.request.approval_id: entry for entry in reply.approvals}

    async def still_pending(self, approval: ApprovalRequested, lister: str = "bob") -> None:
        entry = (await self.approvals(approval.tenant, lister)).get(approval.approval_id)
        if entry is None or entry.resolution is not None:
            raise NotRefusedError(f"approval {approval.approval_id} is no longer pending: {entry}")

    async def events(self, tenant: str, task_id: str, submitter: str = "acme-app") -> list[dict[str, Any]]:
        msg = await self[submitter].nc.request(TASK_REPLAY.format(tenant=tenant, task_id=task_id), b"{}", timeout=10)
        events: list[dict[str, Any]] = json.loads(msg.data)["events"]
        return events

    async def wait_events(
        self, tenant: str, task_id: str, until: Callable[[list[dict[str, Any]]], bool], submitter: str = "acme-app"
    ) -> list[dict[str, Any]]:
        async with asyncio.timeout(60):
            while True:
                events = await self.events(tenant, task_id, submitter)
                if until(events):
                    return events
                await asyncio.sleep(0.2)

    # --- acting ----------------------------------------------------------------------------------

    async def submit(
        self, text: str, *, submitter: str = "acme-app", tenant: str = "acme", task_id: str | None = None, **extra: Any
    ) -> str:
        task_id = task_id or f"atk-{uuid.uuid4().hex[:12]}"
        body = {"task_id": task_id, "tenant": tenant, "agent": "ops", "input": text, **extra}
        subject = TASK_SUBMIT.format(tenant=tenant, submitter=SUBMITTER_TOKENS[submitter])
        ack = (
            await self[submitter]
            .nc.jetstream()
            .publish(subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": task_id})
        )
        if ack.duplicate:
            raise NotRefusedError(f"the server dropped submission {task_id} as a duplicate")
        return task_id

    async def pending_approval(self, submitter: str = "acme-app") -> ApprovalRequested:
        """A fresh high-priority ticket waiting for approval, submitted by `submitter`."""
        task_id = await self.submit(HIGH_TICKET.format(title=f"attack {uuid.uuid4().hex[:6]}"), submitter=submitter)
        events = await self.wait_events(
            "acme", task_id, lambda e: any(x["kind"] == "approval_pending" for x in e), submitter=submitter
        )
        approval_id = next(e["approval_id"] for e in events if e["kind"] == "approval_pending")
        entry = (await self.approvals("acme", "bob"))[approval_id]
        return entry.request

    async def decide(
        self,
        approver: str,
        approval: ApprovalRequested,
        *,
        decision: str = "approve",
        body: dict[str, Any] | None = None,
        raw: bytes | None = None,
        tenant: str | None = None,
        msg_id: str | None = None,
    ) -> int:
        """Publish a decision on `approver`'s own subject; its stream sequence."""
        payload = raw
        if payload is None:
            fields = {
                "approval_id": approval.approval_id,
                "decision": decision,
                "approver": approver,
                "arguments_sha256": approval.arguments_sha256,
            }
            payload = json.dumps({**fields, **(body or {})}).encode()
        headers = {"Nats-Msg-Id": msg_id or f"atk-{uuid.uuid4().hex}"}
        ack = (
            await self[approver]
            .nc.jetstream()
            .publish(
                APPROVAL_DECISION.format(tenant=tenant or approval.tenant, approver=approver), payload, headers=headers
            )
        )
        if ack.duplicate:
            raise NotRefusedError("the decision was dropped as a duplicate")
        return ack.seq

    async def verdict(self, approver: str, tenant: str, decision_seq: int) -> ApprovalDecisionVerdict:
        """The executor's verdict on the decision at `decision_seq` (waits for it; listen before deciding)."""
        sub = self.verdicts[(approver, tenant)]
        async with asyncio.timeout(30):
            while True:
                verdict = ApprovalDecisionVerdict.model_validate_json((await sub.next_msg(timeout=30)).data)
                if verdict.decision_seq == decision_seq:
                    return verdict

    async def refused_by_executor(
        self, approver: str, tenant: str, seq: int, reason: str, approval: ApprovalRequested | None = None
    ) -> None:
        """The executor refused the decision at `seq` for `reason`, audited it, counted it, and (when given)
        left `approval` pending."""
        verdict = await self.verdict(approver, tenant, seq)
        if verdict.outcome != "refused" or verdict.reason_code != reason:
            raise NotRefusedError(f"expected a refusal for {reason}, got {verdict.outcome} ({verdict.reason_code})")
        audited = self.query(
            self.executor_db(),
            "SELECT outcome, reason_code FROM approval_decision_audit WHERE message_seq = ?",
            seq,
        )
        if audited != [("refused", reason)]:
            raise NotRefusedError(f"the refusal was not audited as {reason}: {audited}")
        if self.refused_total(reason) < 1:
            raise NotRefusedError(f"the refusal was not counted under {reason}")
        if approval is not None:
            await self.still_pending(approval)

    async def refused_by_server(self, user: str, *subjects: str) -> None:
        """The server reported a permission violation to `user` for each of `subjects` (publish or subscribe)."""
        violations = await self[user].settle()
        for subject in subjects:
            if not any(subject.lower() in v.lower() for v in violations):
                raise NotRefusedError(f"no permission violation for {subject!r}: {violations}")

    async def stored(self, stream: str, subject: str) -> int:
        info = await self["admin"].nc.jetstream().stream_info(stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())


async def open_arena(suite: Suite) -> Arena:
    credentials = CredentialStore(suite.state_dir / "credentials")
    users: dict[str, User] = {}
    names = {
        "admin": ADMIN_USER,
        "acme-app": submitter_user("acme-app"),
        "globex-app": submitter_user("globex-app"),
        "alice-as-submitter": submitter_user("alice"),
        "alice": approver_user("alice"),
        "bob": approver_user("bob"),
        "carol": approver_user("carol"),
        "dave": approver_user("dave"),
    }
    for name, user in names.items():
        credential = credentials.ensure(user)
        violations = Violations()
        nc = await connect_nats(
            suite.nats_url,
            f"attack-{name}",
            user=credential.user,
            password=credential.password,
            error_cb=violations.record,
        )
        users[name] = User(nc, violations)
    arena = Arena(suite, users)
    for approver, tenant in (("alice", "acme"), ("bob", "acme"), ("dave", "acme"), ("carol", "globex")):
        arena.verdicts[(approver, tenant)] = await users[approver].nc.subscribe(
            APPROVAL_VERDICT.format(tenant=tenant, approver=approver)
        )
    return arena


async def close_arena(arena: Arena) -> None:
    for user in {id(u): u for u in arena.users.values()}.values():
        with contextlib.suppress(Exception):
            await user.nc.close()


@dataclass(frozen=True)
class Attack:
    name: str
    category: str
    refused_by: str
    run: Callable[[Arena], Awaitable[None]]


ATTACKS: list[Attack] = []


def attack(
    category: str, refused_by: str
) -> Callable[[Callable[[Arena], Awaitable[None]]], Callable[[Arena], Awaitable[None]]]:
    def register(run: Callable[[Arena], Awaitable[None]]) -> Callable[[Arena], Awaitable[None]]:
        ATTACKS.append(Attack(run.__name__, category, refused_by, run))
        return run

    return register


# --- subjects a user may not publish to (the server refuses; nothing is stored or acted on) ---------


def _forbidden_publish(name: str, user: str, subject: str, stream: str | None) -> None:
    async def run(arena: Arena) -> None:
        before = await arena.stored(stream, subject) if stream else 0
        await arena[user].nc.publish(subject, b'{"schema_version": 1}')
        await arena.refused_by_server(user, f'publish to "{subject}"')
        if stream and await arena.stored(stream, subject) != before:
            raise NotRefusedError(f"{subject} stored a message the server refused")

    run.__name__ = name
    ATTACKS.append(Attack(name, "subject forgery", "server", run))


_P = budget_subject
for _name, _user, _subject, _stream in (
    (
        "bob_decides_on_alices_subject",
        "bob",
        APPROVAL_DECISION.format(tenant="acme", approver="alice"),
        APPROVAL_DECISIONS.name,
    ),
    (
        "alice_decides_for_another_tenant",
        "alice",
        APPROVAL_DECISION.format(tenant="globex", approver="alice"),
        APPROVAL_DECISIONS.name,
    ),
    ("alice_decides_as_bob", "alice", APPROVAL_DECISION.format(tenant="acme", approver="bob"), APPROVAL_DECISIONS.name),
    (
        "carol_decides_in_acme",
        "carol",
        APPROVAL_DECISION.format(tenant="acme", approver="carol"),
        APPROVAL_DECISIONS.name,
    ),
    (
        "a_submitter_decides",
        "acme-app",
        APPROVAL_DECISION.format(tenant="acme", approver="acme-app"),
        APPROVAL_DECISIONS.name,
    ),
    (
        "submit_for_another_tenant",
        "acme-app",
        TASK_SUBMIT.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_TASKS",
    ),
    (
        "submit_as_another_submitter",
        "acme-app",
        TASK_SUBMIT.format(tenant="acme", submitter="globex-app"),
        "AGENTBUS_TASKS",
    ),
    ("submit_as_alice", "acme-app", TASK_SUBMIT.format(tenant="acme", submitter="alice"), "AGENTBUS_TASKS"),
    ("an_approver_submits", "bob", TASK_SUBMIT.format(tenant="acme", submitter="bob"), "AGENTBUS_TASKS"),
    (
        "globex_submits_to_acme",
        "globex-app",
        TASK_SUBMIT.format(tenant="acme", submitter="globex-app"),
        "AGENTBUS_TASKS",
    ),
    (
        "cancel_in_another_tenant",
        "acme-app",
        TASK_CANCEL.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_TASKS",
    ),
    ("cancel_as_another_submitter", "acme-app", TASK_CANCEL.format(tenant="acme", submitter="alice"), "AGENTBUS_TASKS"),
    ("an_approver_cancels", "bob", TASK_CANCEL.format(tenant="acme", submitter="bob"), "AGENTBUS_TASKS"),
    (
        "ingest_into_another_tenant",
        "acme-app",
        RAG_INGEST_DOCUMENTS.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_RAG_INGEST",
    ),
    (
        "ingest_as_another_submitter",
        "acme-app",
        RAG_INGEST_DOCUMENTS.format(tenant="acme", submitter="alice"),
        "AGENTBUS_RAG_INGEST",
    ),
    (
        "delete_another_tenants_documents",
        "acme-app",
        RAG_DELETE_DOCUMENTS.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_RAG_INGEST",
    ),
    ("forge_a_tool_result", "acme-app", TOOL_UPDATE.format(tenant="acme"), "AGENTBUS_TOOL_UPDATES"),
    ("forge_an_llm_result", "acme-app", LLM_RESULT.format(tenant="acme"), "AGENTBUS_LLM_RESULTS"),
    ("forge_an_llm_request", "acme-app", LLM_REQUEST.format(model="scripted"), "AGENTBUS_LLM_REQUESTS"),
    ("forge_a_tool_call", "acme-app", TOOL_CALL.format(tenant="acme"), "AGENTBUS_TOOL_CALLS"),
    ("forge_a_withdrawal", "acme-app", TOOL_WITHDRAW.format(tenant="acme"), "AGENTBUS_TOOL_CALLS"),
    ("forge_usage", "acme-app", _P(USAGE_RECORDED, "acme"), "AGENTBUS_USAGE"),
    ("forge_a_run_timer", "acme-app", RUN_TIMER.format(tenant="acme"), "AGENTBUS_RUN_TIMERS"),
    ("schedule_a_run_wakeup", "acme-app", RUN_SCHEDULE.format(tenant="acme", task_id="x"), "AGENTBUS_RUN_TIMERS"),
    ("forge_a_pending_approval", "acme-app", APPROVAL_PENDING.format(tenant="acme"), "AGENTBUS_APPROVALS"),
    ("forge_a_resolution_as_submitter", "acme-app", APPROVAL_RESOLVED.format(tenant="acme"), "AGENTBUS_APPROVALS"),
    ("forge_a_resolution_as_approver", "bob", APPROVAL_RESOLVED.format(tenant="acme"), "AGENTBUS_APPROVALS"),
    ("forge_task_events", "acme-app", TASK_EVENT.format(tenant="acme", task_id="x"), "AGENTBUS_TASK_EVENTS"),
    (
        "forge_a_dead_letter",
        "acme-app",
        DEAD_LETTER.format(stream="AGENTBUS_TASKS", consumer="x"),
        "AGENTBUS_DEAD_LETTERS",
    ),
    ("forge_a_span", "acme-app", SPAN.format(service="agent-runner"), "AGENTBUS_SPANS"),
    ("forge_a_verdict", "acme-app", APPROVAL_VERDICT.format(tenant="acme", approver="alice"), None),
    ("reserve_budget_directly", "acme-app", _P(BUDGET_RESERVE, "acme"), None),
    ("close_a_tasks_budget", "bob", _P(BUDGET_RELEASE, "acme"), None),
    ("abort_an_llm_step", "acme-app", LLM_ABORT.format(model="scripted"), None),
    ("replay_another_tenants_task", "acme-app", TASK_REPLAY.format(tenant="globex", task_id="x"), None),
    ("list_another_tenants_approvals", "bob", APPROVALS_LIST.format(tenant="globex"), None),
    ("read_the_cost_report", "acme-app", COST_REPORT.format(), None),
    ("read_another_tenants_rate_limits", "acme-app", _P(RATE_LIMITS, "globex"), None),
    ("an_approver_reads_rate_limits", "bob", _P(RATE_LIMITS, "acme"), None),
    ("search_another_tenants_documents", "acme-app", RAG_SEARCH.format(tenant="globex"), None),
    ("write_run_state", "acme-app", "$KV.AGENTBUS_RUNS.acme.x", "KV_AGENTBUS_RUNS"),
    ("list_another_submitters_sessions", "acme-app", SESSIONS_LIST.format(tenant="acme", submitter="alice"), None),
    ("read_another_tenants_session", "acme-app", SESSION_SHOW.format(tenant="globex", submitter="acme-app"), None),
    (
        "delete_another_tenants_session",
        "acme-app",
        SESSION_DELETE.format(tenant="globex", submitter="globex-app"),
        None,
    ),
    ("an_approver_reads_a_session", "bob", SESSION_SHOW.format(tenant="acme", submitter="bob"), None),
    ("write_session_history", "acme-app", "$KV.AGENTBUS_SESSIONS.acme.x", "KV_AGENTBUS_SESSIONS"),
    (
        "start_a_workflow_as_another_submitter",
        "acme-app",
        WORKFLOW_SUBMIT.format(tenant="acme", submitter="alice"),
        "AGENTBUS_WORKFLOWS",
    ),
    (
        "start_a_workflow_in_another_tenant",
        "acme-app",
        WORKFLOW_SUBMIT.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_WORKFLOWS",
    ),
    (
        "cancel_another_tenants_workflow",
        "acme-app",
        WORKFLOW_CANCEL.format(tenant="globex", submitter="acme-app"),
        "AGENTBUS_WORKFLOWS",
    ),
    ("forge_workflow_events", "acme-app", WORKFLOW_EVENT.format(tenant="acme", run_id="x"), "AGENTBUS_WORKFLOW_EVENTS"),
    ("replay_another_tenants_workflow", "acme-app", WORKFLOW_REPLAY.format(tenant="globex", run_id="x"), None),
):
    _forbidden_publish(_name, _user, _subject, _stream)


# --- the JetStream API outside one's role (the server refuses every call of a person or application) -


def _forbidden_api(name: str, user: str, subject: str, body: dict[str, Any] | None = None) -> None:
    async def run(arena: Arena) -> None:
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            reply = await arena[user].nc.request(subject, json.dumps(body or {}).encode(), timeout=1)
            raise NotRefusedError(f"{subject} answered: {reply.data[:200]!r}")
        await arena.refused_by_server(user, f'publish to "{subject}"')

    run.__name__ = name
    ATTACKS.append(Attack(name, "JetStream API abuse", "server", run))


_PUSH_TO_ALICE = {
    "stream_name": "AGENTBUS_APPROVALS",
    "config": {
        "name": "evil",
        "filter_subject": "agentbus.approvals.pending.acme",
        "deliver_subject": "agentbus.approvals.decisions.acme.alice",
        "ack_policy": "none",
    },
}
for _name, _user, _subject, _request_body in (
    ("delete_the_tasks_stream", "acme-app", "$JS.API.STREAM.DELETE.AGENTBUS_TASKS", None),
    ("purge_the_decisions_stream", "bob", "$JS.API.STREAM.PURGE.AGENTBUS_APPROVAL_DECISIONS", None),
    ("purge_the_approvals_stream", "alice", "$JS.API.STREAM.PURGE.AGENTBUS_APPROVALS", None),
    ("update_the_events_stream", "acme-app", "$JS.API.STREAM.UPDATE.AGENTBUS_TASK_EVENTS", None),
    (
        "create_a_stream_over_decisions",
        "bob",
        "$JS.API.STREAM.CREATE.EVIL",
        {"name": "EVIL", "subjects": ["agentbus.>"]},
    ),
    ("list_streams", "acme-app", "$JS.API.STREAM.NAMES", None),
    ("read_stream_info", "bob", "$JS.API.STREAM.INFO.AGENTBUS_APPROVAL_DECISIONS", None),
    ("get_a_stored_decision", "bob", "$JS.API.STREAM.MSG.GET.AGENTBUS_APPROVAL_DECISIONS", {"seq": 1}),
    ("delete_a_stored_submission", "acme-app", "$JS.API.STREAM.MSG.DELETE.AGENTBUS_TASKS", {"seq": 1}),
    ("direct_get_run_state", "acme-app", "$JS.API.DIRECT.GET.KV_AGENTBUS_RUNS.$KV.AGENTBUS_RUNS.acme.x", None),
    ("create_an_unfiltered_events_consumer", "acme-app", "$JS.API.CONSUMER.CREATE.AGENTBUS_TASK_EVENTS", None),
    (
        "create_a_consumer_on_another_tenant",
        "acme-app",
        "$JS.API.CONSUMER.CREATE.AGENTBUS_TASK_EVENTS.x.agentbus.tasks.events.globex.*",
        None,
    ),
    (
        "create_a_wildcard_consumer",
        "acme-app",
        "$JS.API.CONSUMER.CREATE.AGENTBUS_TASK_EVENTS.x.agentbus.tasks.events.>",
        None,
    ),
    (
        "push_pending_approvals_onto_alices_decisions",
        "bob",
        "$JS.API.CONSUMER.CREATE.AGENTBUS_APPROVALS.evil.agentbus.approvals.pending.acme",
        _PUSH_TO_ALICE,
    ),
    (
        "delete_the_runners_consumer",
        "acme-app",
        "$JS.API.CONSUMER.DELETE.AGENTBUS_TASKS.agent-runner-submissions",
        None,
    ),
    (
        "pull_from_the_runners_consumer",
        "acme-app",
        "$JS.API.CONSUMER.MSG.NEXT.AGENTBUS_TASKS.agent-runner-submissions",
        {"batch": 1},
    ),
    (
        "pull_from_the_executors_decisions",
        "bob",
        "$JS.API.CONSUMER.MSG.NEXT.AGENTBUS_APPROVAL_DECISIONS.tool-executor-decisions",
        {"batch": 1},
    ),
    ("read_a_services_consumer", "acme-app", "$JS.API.CONSUMER.INFO.AGENTBUS_TASKS.agent-runner-submissions", None),
    ("list_consumers", "bob", "$JS.API.CONSUMER.LIST.AGENTBUS_APPROVAL_DECISIONS", None),
    ("read_account_info", "acme-app", "$JS.API.INFO", None),
):
    _forbidden_api(_name, _user, _subject, _request_body)


@attack("JetStream API abuse", "server")
async def ack_someone_elses_message(arena: Arena) -> None:
    subject = "$JS.ACK.AGENTBUS_TASKS.agent-runner-submissions.1.1.1.1.0"
    await arena["acme-app"].nc.publish(subject, b"+ACK")
    await arena.refused_by_server("acme-app", f'publish to "{subject}"')


@attack("JetStream API abuse", "server")
async def an_ordered_consumer_is_not_for_people(arena: Arena) -> None:
    with contextlib.suppress(nats.errors.TimeoutError):
        await arena["acme-app"].nc.jetstream().subscribe("agentbus.tasks.events.acme.x", ordered_consumer=True)
        raise NotRefusedError("a submitter created a JetStream consumer")
    await arena.refused_by_server("acme-app", "$JS.API.CONSUMER.CREATE")


# --- what a user may not read (the server refuses the subscription) -------------------------------


def _forbidden_subscription(name: str, user: str, subject: str) -> None:
    async def run(arena: Arena) -> None:
        await arena[user].nc.subscribe(subject)
        await arena.refused_by_server(user, f'subscription to "{subject}"')

    run.__name__ = name
    ATTACKS.append(Attack(name, "eavesdropping", "server", run))


for _name, _user, _subject in (
    ("read_every_inbox", "acme-app", "_INBOX.>"),
    ("read_alices_inbox", "bob", "_INBOX_approver-alice.>"),
    ("read_globexs_inbox", "acme-app", "_INBOX_submitter-globex-app.>"),
    ("read_another_tenants_approvals", "bob", "agentbus.approvals.pending.globex"),
    ("read_every_decision", "bob", "agentbus.approvals.decisions.>"),
    ("read_alices_verdicts", "bob", "agentbus.approvals.verdicts.acme.alice"),
    ("read_another_tenants_events", "acme-app", "agentbus.tasks.events.globex.>"),
    ("read_every_tenants_events", "acme-app", "agentbus.tasks.events.>"),
    ("read_llm_requests", "acme-app", "agentbus.llm.requests.>"),
    ("read_tool_calls", "bob", "agentbus.tools.calls.>"),
    ("read_budget_requests", "acme-app", "agentbus.budget.>"),
    ("read_usage", "acme-app", "agentbus.usage.>"),
    ("read_jetstream_advisories", "acme-app", "$JS.EVENT.>"),
    ("read_everything", "bob", ">"),
):
    _forbidden_subscription(_name, _user, _subject)


# --- decisions the executor refuses (verdict, audit, count; the approval stays pending) -------------


@attack("body/subject mismatch", "executor")
async def a_decision_naming_another_approver(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seq = await arena.decide("alice", approval, body={"approver": "bob"})
    await arena.refused_by_executor("alice", "acme", seq, "approver_mismatch", approval)


@attack("self-approval", "executor")
async def approving_ones_own_call(arena: Arena) -> None:
    approval = await arena.pending_approval(submitter="alice-as-submitter")
    seq = await arena.decide("alice", approval)
    await arena.refused_by_executor("alice", "acme", seq, "self_approval", approval)


@attack("self-approval", "runner")
async def claiming_another_submitter_in_the_body(arena: Arena) -> None:
    # alice may not pass her own task off as acme-app's to approve it: the runner believes the subject.
    task_id = await arena.submit(
        HIGH_TICKET.format(title="mine"), submitter="alice-as-submitter", submitted_by="acme-app"
    )
    events = await arena.wait_events("acme", task_id, lambda e: bool(e), submitter="alice-as-submitter")
    if [e["kind"] for e in events] != ["rejected"] or events[0]["error"]["code"] != "identity_mismatch":
        raise NotRefusedError(f"a submission naming another submitter ran: {events}")


@attack("self-approval", "executor")
async def approving_ones_own_call_without_naming_oneself(arena: Arena) -> None:
    # Omitting submitted_by changes nothing: the subject said alice submitted.
    approval = await arena.pending_approval(submitter="alice-as-submitter")
    if approval.requested_by != "alice":
        raise NotRefusedError(f"the approval does not name the server-enforced submitter: {approval.requested_by}")
    seq = await arena.decide("alice", approval)
    await arena.refused_by_executor("alice", "acme", seq, "self_approval", approval)


@attack("approver not allowed", "executor")
async def an_approver_outside_the_tools_groups(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seq = await arena.decide("dave", approval)
    await arena.refused_by_executor("dave", "acme", seq, "not_allowed", approval)


@attack("arguments mismatch", "executor")
async def approving_other_arguments(arena: Arena) -> None:
    approval = await arena.pending_approval()
    other = arguments_sha256({**approval.arguments, "priority": "low"})
    seq = await arena.decide("bob", approval, body={"arguments_sha256": other})
    await arena.refused_by_executor("bob", "acme", seq, "arguments_mismatch", approval)


@attack("unknown ids", "executor")
async def an_unknown_approval(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seq = await arena.decide("bob", approval, body={"approval_id": f"nope-{uuid.uuid4().hex[:8]}"})
    await arena.refused_by_executor("bob", "acme", seq, "unknown_approval", approval)


@attack("cross-tenant ids", "executor")
async def deciding_another_tenants_approval_from_ones_own_tenant(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seq = await arena.decide("carol", approval, tenant="globex")
    await arena.refused_by_executor("carol", "globex", seq, "unknown_approval", approval)


def _malformed(name: str, payload: Callable[[ApprovalRequested], bytes]) -> None:
    async def run(arena: Arena) -> None:
        approval = await arena.pending_approval()
        seq = await arena.decide("bob", approval, raw=payload(approval))
        await arena.refused_by_executor("bob", "acme", seq, "malformed", approval)

    run.__name__ = name
    ATTACKS.append(Attack(name, "malformed payloads", "executor", run))


def _decision(approval: ApprovalRequested, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "approval_id": approval.approval_id,
        "decision": "approve",
        "approver": "bob",
        "arguments_sha256": approval.arguments_sha256,
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


_malformed("a_decision_that_is_not_json", lambda a: b"approve it {")
_malformed("a_decision_with_an_extra_field", lambda a: _decision(a, execute_now=True))
_malformed("a_decision_without_its_hash", lambda a: _decision(a, arguments_sha256=None))
_malformed("a_decision_that_is_neither_approve_nor_deny", lambda a: _decision(a, decision="maybe"))
_malformed("a_decision_with_a_bad_approval_id", lambda a: _decision(a, approval_id="../../etc"))
_malformed("a_decision_that_is_a_list", lambda a: b"[]")
_malformed("a_decision_in_another_encoding", lambda a: _decision(a).decode().encode("utf-16"))


@attack("oversized payloads", "server")
async def an_oversized_decision(arena: Arena) -> None:
    approval = await arena.pending_approval()
    payload = _decision(approval, reason="x" * (2 * 1024 * 1024))
    with contextlib.suppress(nats.errors.Error):
        await arena["bob"].nc.jetstream().publish(APPROVAL_DECISION.format(tenant="acme", approver="bob"), payload)
        raise NotRefusedError("a 2 MiB decision was stored")
    await arena.still_pending(approval)


@attack("replays", "executor")
async def deciding_again_after_the_approval_was_resolved(arena: Arena) -> None:
    approval = await arena.pending_approval()
    first = await arena.decide("bob", approval, decision="deny")
    verdict = await arena.verdict("bob", "acme", first)
    if verdict.outcome != "accepted":
        raise NotRefusedError(f"the first decision was not accepted: {verdict}")
    again = await arena.decide("alice", approval)
    await arena.refused_by_executor("alice", "acme", again, "already_resolved")
    if arena.query(arena.executor_db(), "SELECT ticket_id FROM tickets WHERE call_id = ?", _call_of(arena, approval)):
        raise NotRefusedError("a denied call ran")


@attack("replays", "executor")
async def replaying_an_accepted_decision_with_a_new_message_id(arena: Arena) -> None:
    approval = await arena.pending_approval()
    first = await arena.decide("bob", approval)
    if (await arena.verdict("bob", "acme", first)).outcome != "accepted":
        raise NotRefusedError("the approval was not accepted")
    again = await arena.decide("bob", approval)
    await arena.refused_by_executor("bob", "acme", again, "already_resolved")
    await _exactly_one_ticket(arena, approval)


@attack("replays", "server")
async def replaying_a_decision_with_the_same_message_id(arena: Arena) -> None:
    approval = await arena.pending_approval()
    payload = _decision(approval)
    js = arena["bob"].nc.jetstream()
    subject = APPROVAL_DECISION.format(tenant="acme", approver="bob")
    first = await js.publish(subject, payload, headers={"Nats-Msg-Id": "atk-same"})
    second = await js.publish(subject, payload, headers={"Nats-Msg-Id": "atk-same"})
    if not second.duplicate and second.seq != first.seq:
        # Past the short window the server stores it again; then the executor must refuse it.
        await arena.refused_by_executor("bob", "acme", second.seq, "already_resolved")
    await _exactly_one_ticket(arena, approval)


@attack("expiry", "executor")
async def deciding_after_the_task_ran_out_of_time(arena: Arena) -> None:
    task_id = await arena.submit(HIGH_TICKET.format(title="late"), deadline_seconds=3)
    events = await arena.wait_events("acme", task_id, lambda e: any(x["kind"] == "failed" for x in e))
    approval_id = next(e["approval_id"] for e in events if e["kind"] == "approval_pending")
    async with asyncio.timeout(30):
        while (entry := (await arena.approvals("acme", "bob"))[approval_id]).resolution is None:
            await asyncio.sleep(0.2)
    if entry.resolution.outcome != "expired":
        raise NotRefusedError(f"the ended task's approval resolved {entry.resolution.outcome}")
    seq = await arena.decide("bob", entry.request)
    await arena.refused_by_executor("bob", "acme", seq, "already_resolved")
    if arena.query(arena.executor_db(), "SELECT ticket_id FROM tickets WHERE task_id = ?", task_id):
        raise NotRefusedError("the call of an ended task ran")


@attack("races", "executor")
async def two_approvers_approve_at_once(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seqs = await asyncio.gather(arena.decide("alice", approval), arena.decide("bob", approval))
    verdicts = [await arena.verdict(name, "acme", seq) for name, seq in zip(("alice", "bob"), seqs, strict=True)]
    outcomes = sorted(v.outcome for v in verdicts)
    if outcomes != ["accepted", "refused"]:
        raise NotRefusedError(f"two approvals of one call: {outcomes}")
    await _exactly_one_ticket(arena, approval)


@attack("races", "executor")
async def a_deny_and_an_approve_at_once(arena: Arena) -> None:
    approval = await arena.pending_approval()
    seqs = await asyncio.gather(arena.decide("alice", approval, decision="deny"), arena.decide("bob", approval))
    verdicts = [await arena.verdict(name, "acme", seq) for name, seq in zip(("alice", "bob"), seqs, strict=True)]
    accepted = [v for v in verdicts if v.outcome == "accepted"]
    if len(accepted) != 1:
        raise NotRefusedError(f"not exactly one decision won: {verdicts}")
    approved = accepted[0].approver == "bob"
    await asyncio.sleep(1)
    tickets = arena.query(
        arena.executor_db(), "SELECT ticket_id FROM tickets WHERE call_id = ?", _call_of(arena, approval)
    )
    if len(tickets) != (1 if approved else 0):
        raise NotRefusedError(f"{len(tickets)} tickets after the {'approval' if approved else 'denial'} won")


@attack("message-id pre-emption", "server")
async def predicting_another_approvers_message_id(arena: Arena) -> None:
    # bob publishes first under the id alice's decision will carry; past the decisions stream's 100 ms
    # window the server keeps both, so bob cannot make alice's decision vanish as a "duplicate".
    approval = await arena.pending_approval()
    predicted = f"decision:{approval.approval_id}:alice:approve"
    await (
        arena["bob"]
        .nc.jetstream()
        .publish(APPROVAL_DECISION.format(tenant="acme", approver="bob"), b"{}", headers={"Nats-Msg-Id": predicted})
    )
    await asyncio.sleep(0.3)
    seq = await arena.decide("alice", approval, msg_id=predicted)
    if (await arena.verdict("alice", "acme", seq)).outcome != "accepted":
        raise NotRefusedError("alice's decision did not take effect")
    await _exactly_one_ticket(arena, approval)


# --- submissions the runner refuses, and ids other tenants cannot take ------------------------------


def _rejected(name: str, category: str, body: Callable[[str], bytes], code: str) -> None:
    async def run(arena: Arena) -> None:
        task_id = f"atk-{uuid.uuid4().hex[:12]}"
        await (
            arena["acme-app"]
            .nc.jetstream()
            .publish(
                TASK_SUBMIT.format(tenant="acme", submitter="acme-app"), body(task_id), headers={"Nats-Msg-Id": task_id}
            )
        )
        events = await arena.wait_events("acme", task_id, lambda e: bool(e))
        if [e["kind"] for e in events] != ["rejected"] or events[0]["error"]["code"] != code:
            raise NotRefusedError(f"expected rejected {code}: {events}")

    run.__name__ = name
    ATTACKS.append(Attack(name, category, "runner", run))


def _body(task_id: str, **fields: Any) -> bytes:
    return json.dumps({"task_id": task_id, "tenant": "acme", "agent": "ops", "input": "hi", **fields}).encode()


_rejected(
    "a_submission_for_another_tenant_in_its_body",
    "body/subject mismatch",
    lambda t: _body(t, tenant="globex"),
    "tenant_mismatch",
)
_rejected(
    "a_submission_naming_another_submitter",
    "body/subject mismatch",
    lambda t: _body(t, submitted_by="globex-app"),
    "identity_mismatch",
)
_rejected("a_submission_that_is_not_json", "malformed payloads", lambda t: b"{not json", "malformed_json")
_rejected(
    "a_submission_without_an_input",
    "malformed payloads",
    lambda t: json.dumps({"task_id": t, "tenant": "acme", "agent": "ops"}).encode(),
    "schema_violation",
)
_rejected(
    "a_submission_with_an_oversized_input",
    "oversized payloads",
    lambda t: _body(t, input="x" * 100_001),
    "schema_violation",
)
_rejected("a_submission_for_an_unknown_agent", "unknown ids", lambda t: _body(t, agent="root-shell"), "unknown_agent")


@attack("replays", "runner")
async def resubmitting_a_task_with_another_input(arena: Arena) -> None:
    task_id = await arena.submit('create_ticket(title="first", priority="low")')
    await arena.wait_events("acme", task_id, lambda e: any(x["kind"] == "completed" for x in e))
    await arena.submit('create_ticket(title="second", priority="low")', task_id=task_id)
    await asyncio.sleep(0.2)  # past the stream's de-duplication window: the runner itself must refuse it
    await arena.submit('create_ticket(title="third", priority="low")', task_id=task_id)
    await asyncio.sleep(1.5)
    titles = arena.query(arena.executor_db(), "SELECT title FROM tickets WHERE task_id = ?", task_id)
    if titles != [("first",)]:
        raise NotRefusedError(f"a resubmitted task id ran again: {titles}")


@attack("cross-tenant ids", "runner")
async def another_tenant_cannot_take_a_task_id(arena: Arena) -> None:
    task_id = f"shared-{uuid.uuid4().hex[:8]}"
    await arena.submit("echo", tenant="globex", submitter="globex-app", task_id=task_id, agent="echo")
    await asyncio.sleep(0.3)
    await arena.submit("echo", task_id=task_id, agent="echo")
    events = await arena.wait_events("acme", task_id, lambda e: any(x["kind"] == "completed" for x in e))
    if events[0]["kind"] != "accepted":
        raise NotRefusedError(f"acme's task was taken by globex's: {events}")


@attack("cross-tenant ids", "runner")
async def another_tenant_cannot_cancel_a_task(arena: Arena) -> None:
    approval = await arena.pending_approval()
    cancel = json.dumps({"task_id": approval.task_id, "tenant": "globex"}).encode()
    await (
        arena["globex-app"].nc.jetstream().publish(TASK_CANCEL.format(tenant="globex", submitter="globex-app"), cancel)
    )
    await asyncio.sleep(1)
    events = await arena.events("acme", approval.task_id)
    if any(e["kind"] == "cancelled" for e in events):
        raise NotRefusedError("globex cancelled acme's task")
    await arena.still_pending(approval)


def _call_of(arena: Arena, approval: ApprovalRequested) -> str:
    rows = arena.query(arena.executor_db(), "SELECT call_id FROM approvals WHERE approval_id = ?", approval.approval_id)
    return str(rows[0][0]) if rows else ""


async def _exactly_one_ticket(arena: Arena, approval: ApprovalRequested) -> None:
    call_id = _call_of(arena, approval)
    async with asyncio.timeout(20):
        while not (
            tickets := arena.query(arena.executor_db(), "SELECT ticket_id FROM tickets WHERE call_id = ?", call_id)
        ):
            await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    tickets = arena.query(arena.executor_db(), "SELECT ticket_id FROM tickets WHERE call_id = ?", call_id)
    if len(tickets) != 1:
        raise NotRefusedError(f"{len(tickets)} tickets for one approved call")
