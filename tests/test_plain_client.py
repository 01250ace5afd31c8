"""The public contract, exercised by a plain nats-py client that imports nothing from agentbus."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import nats
from agentbus.runtime.server import NatsServerProcess
from agentbus.runtime.service import BusService
from nats.js.api import DeliverPolicy

TERMINAL = {"rejected", "completed", "failed", "cancelled", "budget_exceeded"}


async def _events_until_terminal(js: Any, tenant: str, task_id: str, timeout: float = 20) -> list[dict[str, Any]]:
    sub = await js.subscribe(
        f"agentbus.tasks.events.{tenant}.{task_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not events or events[-1]["kind"] not in TERMINAL:
                msg = await sub.next_msg(timeout=timeout)
                events.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return events


async def test_plain_nats_client_submits_and_receives_accepted_to_completed(
    bootstrapped_nats: NatsServerProcess, suite: list[BusService]
) -> None:
    nc = await nats.connect(bootstrapped_nats.url)
    js = nc.jetstream()
    task_id = f"plain-{uuid.uuid4().hex[:12]}"
    submission = {
        "schema_version": 1,
        "task_id": task_id,
        "tenant": "acme",
        "agent": "assistant",
        "input": "What is calculator(6*7) and how many words in word_count(to be or not to be)?",
    }
    ack = await js.publish(
        "agentbus.tasks.submit.acme.acme-app", json.dumps(submission).encode(), headers={"Nats-Msg-Id": task_id}
    )
    assert not ack.duplicate
    events = await _events_until_terminal(js, "acme", task_id)
    await nc.close()

    kinds = [e["kind"] for e in events]
    assert kinds == ["accepted", "step", "step", "step", "completed"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    completed = events[-1]
    assert "calculator(expression='6*7') = 42" in completed["output"]
    assert "word_count(text='to be or not to be') = 6" in completed["output"]
    assert completed["usage"]["prompt_tokens"] > 0
    assert completed["usage"]["completion_tokens"] > 0
    assert completed["steps"] == 3
