"""What the executor's tests share: test tools, calls and decisions, and a stand-in for the runner that
collects ToolCallUpdates from the runner's own durable consumer on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agentbus.contracts.approvals import (
    ApprovalDecisionVerdict,
    ApprovalsListReply,
    ApprovalsListRequest,
    arguments_sha256,
)
from agentbus.contracts.registry import (
    APPROVAL_DECISION,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS_LIST,
    RUNNER_TOOL_UPDATES,
    TOOL_CALL,
    TOOL_WITHDRAW,
    USAGE_RECORDED,
    budget_subject,
)
from agentbus.contracts.tools import ToolCallRequested, ToolCallUpdate, ToolCallWithdrawn
from agentbus.tool_executor.app import ToolExecutorApp
from agentbus.tool_executor.settings import ExecutorSettings
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

REPO_ROOT = Path(__file__).resolve().parents[3]
REPO_TOOLS = REPO_ROOT / "tools"

APPROVERS_YAML = """
groups:
  "*":
    ops-leads: [alice, bob]
    platform: [carol]
  acme:
    acme-admins: [dora]
"""

# Tools only the tests use. `append_marker` is a non-idempotent shell effect that leaves one line per run
# in a file, so a test can count runs; it sleeps so that a test can kill the executor while it runs.
TEST_TOOLS = {
    "append_marker.yaml": """
name: append_marker
description: Append a line to a file, then sleep.
kind: shell
risk: high
parameters:
  type: object
  properties:
    path: {type: string}
    sleep: {type: number, minimum: 0, default: 0}
  required: [path]
  additionalProperties: false
approval:
  policy: always
  approvers: {"*": ["group:ops-leads"]}
timeout_seconds: 60
shell:
  command: ["/bin/sh", "-c", "echo \\"$$\\" >> '{path}'; sleep {sleep}"]
""",
    "marker_now.yaml": """
name: marker_now
description: Append a line to a file without approval.
kind: shell
parameters:
  type: object
  properties:
    path: {type: string}
  required: [path]
  additionalProperties: false
approval: {policy: never}
timeout_seconds: 20
shell:
  command: ["/bin/sh", "-c", "echo run >> '{path}'"]
""",
    "slow_marker.yaml": """
name: slow_marker
description: Append a line to a file, then sleep, without approval.
kind: shell
parameters:
  type: object
  properties:
    path: {type: string}
    sleep: {type: number, minimum: 0}
  required: [path, sleep]
  additionalProperties: false
approval: {policy: never}
timeout_seconds: 30
shell:
  command: ["/bin/sh", "-c", "echo run >> '{path}'; sleep {sleep}; echo done >> '{path}'"]
""",
    "self_service.yaml": """
name: self_service
description: Needs approval, and the submitter may approve it.
kind: shell
parameters: {type: object, properties: {note: {type: string}}, additionalProperties: false}
approval:
  policy: always
  approvers: {"*": [alice, bob]}
  allow_self_approval: true
shell: {command: [echo, "{note}"]}
""",
    "acme_only.yaml": """
name: acme_only
description: Only acme's admins may approve it.
kind: python
parameters: {type: object, properties: {name: {type: string}, image: {type: string}}, required: [name, image]}
approval:
  policy: always
  approvers: {acme: ["group:acme-admins"]}
python: {callable: "agentbus.tool_executor.builtins.kubernetes:render_manifest"}
""",
    "short_lived.yaml": """
name: short_lived
description: An approval that expires after one second.
kind: python
parameters: {type: object, properties: {name: {type: string}, image: {type: string}}, required: [name, image]}
approval:
  policy: always
  approvers: {"*": [alice]}
  expires_after_seconds: 1
python: {callable: "agentbus.tool_executor.builtins.kubernetes:render_manifest"}
""",
}


StartExecutor = Callable[..., Awaitable[ToolExecutorApp]]
"""Starts an executor in this process with settings overrides."""


def prepare_config(root: Path) -> tuple[Path, Path]:
    """A tools folder (the repository's tools, less its MCP tool servers, plus the test tools) and an approvers
    file under `root`."""
    tools = root / "tools"
    tools.mkdir(parents=True, exist_ok=True)
    for path in REPO_TOOLS.glob("*.yaml"):
        # MCP tool servers are tested with servers of their own (test_executor_mcp.py).
        if "\nkind: mcp\n" not in path.read_text():
            shutil.copy(path, tools / path.name)
    for name, text in TEST_TOOLS.items():
        (tools / name).write_text(text)
    approvers = root / "approvers.yaml"
    approvers.write_text(APPROVERS_YAML)
    return tools, approvers


def executor_settings(nats_url: str, root: Path, **overrides: Any) -> ExecutorSettings:
    tools, approvers = prepare_config(root)
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "tools_dir": tools,
        "approvers_file": approvers,
        "database_url": f"sqlite+aiosqlite:///{root / 'executor.db'}",
        "expiry_sweep_seconds": 0.2,
        "execution_lease_seconds": 2.0,
        "drain_timeout_seconds": 2.0,
        **overrides,
    }
    return ExecutorSettings(**values)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_call(
    tool: str, arguments: dict[str, Any], *, tenant: str = "acme", submitted_by: str | None = "sam", **extra: Any
) -> ToolCallRequested:
    task_id = new_id("task")
    return ToolCallRequested(
        call_id=f"{task_id}.1.0",
        tool_call_id="call_1",
        task_id=task_id,
        tenant=tenant,
        agent="ops",
        tool=tool,
        arguments=arguments,
        step=1,
        submitted_by=submitted_by,
        **extra,
    )


async def publish_call(nc: NatsClient, call: ToolCallRequested) -> bool:
    """Publish as the runner does; True when JetStream dropped it as a duplicate."""
    ack = await nc.jetstream().publish(
        TOOL_CALL.format(tenant=call.tenant),
        call.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"call:{call.call_id}"},
    )
    return bool(ack.duplicate)


def decision_payload(
    approval_id: str, approver: str, decision: str, sha: str, reason: str | None = None, **extra: Any
) -> bytes:
    body: dict[str, Any] = {
        "approval_id": approval_id,
        "decision": decision,
        "approver": approver,
        "arguments_sha256": sha,
        **extra,
    }
    if reason is not None:
        body["reason"] = reason
    return json.dumps(body).encode()


async def publish_decision(nc: NatsClient, tenant: str, approver_token: str, payload: bytes) -> int:
    """Publish a decision on the approver's subject; returns its stream sequence."""
    ack = await nc.jetstream().publish(APPROVAL_DECISION.format(tenant=tenant, approver=approver_token), payload)
    return int(ack.seq)


def sha(call: ToolCallRequested) -> str:
    return arguments_sha256(call.arguments)


async def publish_withdrawal(nc: NatsClient, call: ToolCallRequested, reason: str = "task cancelled") -> None:
    """Withdraw a call as the runner does when its task ends."""
    withdrawal = ToolCallWithdrawn(call_id=call.call_id, task_id=call.task_id, tenant=call.tenant, reason=reason)
    await nc.jetstream().publish(
        TOOL_WITHDRAW.format(tenant=call.tenant),
        withdrawal.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"withdraw:{call.call_id}"},
    )


async def list_approvals(nc: NatsClient, tenant: str, **request: Any) -> ApprovalsListReply:
    """Ask the executor for a tenant's approvals, as an approver does."""
    body = ApprovalsListRequest(**request).model_dump_json().encode()
    reply = await nc.request(APPROVALS_LIST.format(tenant=tenant), body, timeout=10)
    return ApprovalsListReply.model_validate_json(reply.data)


class Verdicts:
    """The verdicts on a tenant's decisions, heard live on the approvers' verdict subjects, by decision seq."""

    def __init__(self, nc: NatsClient, tenant: str) -> None:
        self._nc = nc
        self._subject = APPROVAL_VERDICT.format(tenant=tenant, approver="x").rsplit(".", 1)[0] + ".*"
        self.heard: list[tuple[str, ApprovalDecisionVerdict]] = []
        self._changed = asyncio.Event()
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Verdicts:
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_verdict)
        await self._nc.flush()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_verdict(self, msg: Msg) -> None:
        self.heard.append((msg.subject, ApprovalDecisionVerdict.model_validate_json(msg.data)))
        self._changed.set()

    def of(self, decision_seq: int) -> list[ApprovalDecisionVerdict]:
        return [verdict for _, verdict in self.heard if verdict.decision_seq == decision_seq]

    async def wait_for(self, decision_seq: int, count: int = 1, timeout: float = 20.0) -> ApprovalDecisionVerdict:
        async with asyncio.timeout(timeout):
            while len(self.of(decision_seq)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(decision_seq)[-1]


class RunnerStandIn:
    """Reads ToolCallUpdates from the runner's durable consumer, as the runner would, grouped by call id."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._updates: dict[str, list[ToolCallUpdate]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sub = await self._nc.jetstream().pull_subscribe_bind(
            durable=RUNNER_TOOL_UPDATES.durable, stream=RUNNER_TOOL_UPDATES.stream
        )
        self._task = asyncio.create_task(self._pull(sub))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _pull(self, sub: Any) -> None:
        while True:
            try:
                msgs = await sub.fetch(64, timeout=0.5)
            except TimeoutError:
                continue
            for msg in msgs:
                update = ToolCallUpdate.model_validate_json(msg.data)
                self._updates[update.call_id].append(update)
                await msg.ack()
            self._changed.set()

    def updates(self, call_id: str) -> list[ToolCallUpdate]:
        return list(self._updates[call_id])

    def kinds(self, call_id: str) -> list[str]:
        return [u.kind for u in self._updates[call_id]]

    async def wait_for(self, call_id: str, kind: str, timeout: float = 20.0) -> ToolCallUpdate:
        async with asyncio.timeout(timeout):
            while True:
                for update in self._updates[call_id]:
                    if update.kind == kind:
                        return update
                self._changed.clear()
                await self._changed.wait()

    async def settle(self, seconds: float) -> None:
        """Let anything still in flight arrive."""
        await asyncio.sleep(seconds)


async def stream_payloads(nc: NatsClient, subject: str, idle: float = 0.5) -> list[dict[str, Any]]:
    """Every message stored on `subject` (a limits stream), oldest first."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    found = []
    try:
        while True:
            found.append(json.loads((await sub.next_msg(timeout=idle)).data))
    except TimeoutError:
        return found
    finally:
        await sub.unsubscribe()


async def pending_requests(nc: NatsClient, tenant: str) -> list[dict[str, Any]]:
    return await stream_payloads(nc, APPROVAL_PENDING.format(tenant=tenant))


async def resolutions(nc: NatsClient, tenant: str) -> list[dict[str, Any]]:
    return await stream_payloads(nc, APPROVAL_RESOLVED.format(tenant=tenant))


async def usage_records(nc: NatsClient, tenant: str) -> list[dict[str, Any]]:
    return await stream_payloads(nc, budget_subject(USAGE_RECORDED, tenant))


async def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(interval)
