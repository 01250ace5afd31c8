"""Helpers for cross-service tests: submit raw bytes, collect a task's events."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

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


async def publish_submission(nc: NatsClient, payload: bytes, tenant: str = "acme", msg_id: str | None = None) -> bool:
    """Publish raw bytes on the submit subject; True if JetStream called it a duplicate."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    ack = await nc.jetstream().publish(f"agentbus.tasks.submit.{tenant}", payload, headers=headers)
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
