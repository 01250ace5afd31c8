"""Helpers for cross-service tests: submit raw bytes, collect a task's events."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentbus.contracts.approvals import ApprovalDecision, arguments_sha256
from agentbus.contracts.registry import APPROVAL_DECISION, APPROVAL_PENDING
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENTS_DIR = REPO_ROOT / "agents"
TRACES_FILE_NAME = "traces.jsonl"

TERMINAL = {"rejected", "completed", "failed", "cancelled", "budget_exceeded"}


def new_task_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def submission(task_id: str, tenant: str = "acme", agent: str = "echo", text: str = "hello", **extra: Any) -> bytes:
    return json.dumps({"task_id": task_id, "tenant": tenant, "agent": agent, "input": text, **extra}).encode()


SUBMITTER = "acme-app"


async def publish_submission(
    nc: NatsClient, payload: bytes, tenant: str = "acme", msg_id: str | None = None, submitter: str = SUBMITTER
) -> bool:
    """Publish raw bytes on the submit subject as `submitter`; True if JetStream called it a duplicate."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    ack = await nc.jetstream().publish(f"agentbus.tasks.submit.{tenant}.{submitter}", payload, headers=headers)
    return bool(ack.duplicate)


async def task_events(
    nc: NatsClient, task_id: str, tenant: str = "acme", timeout: float = 20.0, settle: float = 0.0
) -> list[dict[str, Any]]:
    """A task's events from seq 1 up to its terminal event, then any arriving within `settle` seconds."""
    sub = await nc.jetstream().subscribe(
        f"agentbus.tasks.events.{tenant}.{task_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not events or events[-1]["kind"] not in TERMINAL:
                events.append(json.loads((await sub.next_msg(timeout=timeout)).data))
        if settle:
            try:
                while True:
                    events.append(json.loads((await sub.next_msg(timeout=settle)).data))
            except TimeoutError:
                pass
    finally:
        await sub.unsubscribe()
    return events


async def first_message(
    nc: NatsClient, subject: str, matches: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> dict[str, Any]:
    """Replay `subject` from its first stored message until one matches; TimeoutError otherwise."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        async with asyncio.timeout(timeout):
            while True:
                message: dict[str, Any] = json.loads((await sub.next_msg(timeout=timeout)).data)
                if matches(message):
                    return message
    finally:
        await sub.unsubscribe()


async def stored_messages(
    nc: NatsClient, subject: str, matches: Callable[[dict[str, Any]], bool], idle: float = 0.5
) -> list[dict[str, Any]]:
    """Every stored message of `subject` that matches, read until none arrives for `idle` seconds."""
    sub = await nc.jetstream().subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    found = []
    try:
        while True:
            message = json.loads((await sub.next_msg(timeout=idle)).data)
            if matches(message):
                found.append(message)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def first_event(nc: NatsClient, task_id: str, kind: str) -> dict[str, Any]:
    return await first_message(nc, f"agentbus.tasks.events.acme.{task_id}", lambda e: e["kind"] == kind)


async def approval_request(nc: NatsClient, approval_id: str) -> dict[str, Any]:
    return await first_message(
        nc, APPROVAL_PENDING.format(tenant="acme"), lambda r: r["approval_id"] == approval_id, timeout=10.0
    )


async def decide(nc: NatsClient, request: dict[str, Any], approver: str, decision: str, **extra: Any) -> None:
    payload = ApprovalDecision(
        approval_id=request["approval_id"],
        decision=decision,  # type: ignore[arg-type]
        approver=approver,
        arguments_sha256=arguments_sha256(request["arguments"]),
        **extra,
    )
    await nc.jetstream().publish(
        APPROVAL_DECISION.format(tenant="acme", approver=approver), payload.model_dump_json().encode()
    )


SETTLE_PROBE = "agentbus-test.settle-probe"
"""A subject no restricted user may publish to: its refusal marks the end of the errors before it."""


class Violations:
    """The permission violations the server reported on one connection, in the order it sent them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = asyncio.Event()

    async def record(self, error: Exception) -> None:
        self.seen.append(str(error))
        self._changed.set()

    async def settle(self, nc: NatsClient) -> list[str]:
        """Every violation caused by what was sent before this call (errors arrive asynchronously, and a
        PING/PONG round trip does not order them): send one more refused publish and wait for its error."""
        await nc.publish(SETTLE_PROBE, b"")
        async with asyncio.timeout(30):
            while not any(SETTLE_PROBE in v for v in self.seen):
                self._changed.clear()
                await self._changed.wait()
        self.seen = [v for v in self.seen if SETTLE_PROBE not in v]
        return self.seen


class User:
    """A connection as one NATS user, with the permission violations the server reported to it."""

    def __init__(self, nc: NatsClient, violations: Violations) -> None:
        self.nc = nc
        self.violations = violations

    async def settle(self) -> list[str]:
        return await self.violations.settle(self.nc)
